"""The install the README describes is the one the benchmarks measure: uvloop, by default.

uvloop is a regular dependency (with a marker for the platforms it lacks), and ``serve`` runs
its event loop on it whenever it is importable.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from clipia_proxy import cli

ROOT = Path(__file__).resolve().parent.parent


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(text) for text in project["dependencies"]]


def test_uvloop_is_a_regular_dependency_where_it_installs() -> None:
    (uvloop,) = [r for r in runtime_requirements() if r.name == "uvloop"]
    assert uvloop.marker is not None
    for environment, holds in [
        ({"sys_platform": "linux", "platform_python_implementation": "CPython"}, True),
        ({"sys_platform": "darwin", "platform_python_implementation": "CPython"}, True),
        ({"sys_platform": "win32", "platform_python_implementation": "CPython"}, False),
        ({"sys_platform": "linux", "platform_python_implementation": "PyPy"}, False),
    ]:
        assert uvloop.marker.evaluate(environment) is holds, environment


def test_every_runtime_pin_has_a_lower_bound() -> None:
    for requirement in runtime_requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators & {">=", "~=", "=="}, f"{requirement} has no lower bound"


def test_the_command_line_runs_its_loop_on_uvloop() -> None:
    import uvloop  # a regular dependency on this platform (the marker holds)

    seen: list[type[asyncio.AbstractEventLoop]] = []

    async def note_loop() -> None:
        seen.append(type(asyncio.get_running_loop()))

    cli._run(note_loop())
    assert seen == [uvloop.Loop]

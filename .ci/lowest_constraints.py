"""Print a pip constraints file that pins each runtime dependency to the lowest version allowed.

pip has no ``--resolution lowest``: this reads ``pyproject.toml`` and, for every requirement of
``[project] dependencies`` and of the extras named on the command line (default: the runtime
extras), writes ``name==lower-bound`` from its ``>=``, ``~=`` or ``==`` specifier. A requirement
whose environment marker does not hold here is left out; one without a lower bound fails (a
pin must say which versions it supports). ``.ci/run`` installs the package with these
constraints in a second venv and runs the suite there.

Usage: ``python .ci/lowest_constraints.py [extra ...] > constraints.txt``.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

RUNTIME_EXTRAS = ("redis", "postgres")


def lower_bound(requirement: Requirement) -> str:
    """Return the lowest version ``requirement`` admits; raise if it names none."""
    for spec in requirement.specifier:
        if spec.operator in {">=", "~=", "=="}:
            return spec.version
    raise SystemExit(f"{requirement}: no lower bound (>=, ~= or ==); add one")


def main(argv: list[str]) -> int:
    """Print the constraints for the dependencies and the extras named in ``argv``."""
    project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = argv or list(RUNTIME_EXTRAS)
    lines: dict[str, str] = {}
    texts = list(project["dependencies"])
    for extra in extras:
        texts.extend(project["optional-dependencies"][extra])
    for text in texts:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        lines[requirement.name.lower()] = f"{requirement.name}=={lower_bound(requirement)}"
    sys.stdout.write("".join(lines[name] + "\n" for name in sorted(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

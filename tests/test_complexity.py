"""No function of the package or the benchmark is above complexity 20 (radon's measure, rank D+).

A function past 20 interleaves too many decisions to be read top to bottom or tested case by
case: split it (a pure decision apart from its I/O, as ``relay.Relay`` is from the stream loop).
The benchmark (``bench/``) is held to the same limit: the README's figures come from it.
``radon cc -s -n D clipia_proxy bench`` lists the same functions from the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from radon.complexity import cc_visit
from radon.visitors import Class, Function

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("clipia_proxy", "bench")
LIMIT = 20


def _functions(blocks: list[Function | Class]) -> Iterator[Function]:
    """Every function, method and closure among radon's blocks, nested ones included."""
    for block in blocks:
        if isinstance(block, Class):
            yield from _functions([*block.methods, *block.inner_classes])
        else:
            yield block
            yield from _functions(block.closures)


def too_complex(source: str) -> list[str]:
    """Return ``name (complexity)`` for each function of ``source`` above the limit."""
    # radon lists a method both at the top level and in its class: one line each.
    found = {
        (function.lineno, f"{function.fullname} ({function.complexity})")
        for function in _functions(cc_visit(source))
        if function.complexity > LIMIT
    }
    return [name for _, name in sorted(found)]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_above_the_limit(package: str) -> None:
    paths = sorted((ROOT / package).rglob("*.py"))
    assert paths, f"no Python file under {package}/"
    found = {
        str(path.relative_to(ROOT)): names
        for path in paths
        if (names := too_complex(path.read_text(encoding="utf-8")))
    }
    assert found == {}


def test_the_check_sees_methods_and_closures() -> None:
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(LIMIT))
    flat = f"def f(x):\n{branches}    return -1\n"
    method = "class C:\n" + "\n".join("    " + line for line in flat.splitlines()) + "\n"
    closure = "def outer():\n" + "\n".join("    " + line for line in flat.splitlines()) + "\n"
    assert too_complex(flat) == [f"f ({LIMIT + 1})"]
    assert too_complex(method) == [f"C.f ({LIMIT + 1})"]
    assert [name.split(" ")[0] for name in too_complex(closure)] == ["f"]
    shorter = "def f(x):\n" + "".join(
        f"    if x == {i}:\n        return {i}\n" for i in range(LIMIT - 1)
    )
    assert too_complex(shorter) == []

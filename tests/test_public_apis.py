"""The package uses aiohttp through its public API only (a grep of the source, by its syntax tree).

Private internals tie the project to one minor version: a new aiohttp release may rename them
without notice. Forbidden, anywhere in ``clipia_proxy``:

- importing an aiohttp module other than ``aiohttp``, ``aiohttp.web``, ``aiohttp.abc``,
  ``aiohttp.hdrs`` and the HTTP exception modules (``aiohttp.client_proto``,
  ``aiohttp.streams``, ``aiohttp.helpers`` … are internals), or an underscore name from aiohttp;
- overriding an underscore method of an aiohttp class in a subclass (a private hook);
- reading or writing an underscore attribute that aiohttp itself uses (``obj._loop``,
  ``protocol._read_timeout``, ``response._connection`` …) on anything but ``self``/``cls``.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import aiohttp

PACKAGE = Path(__file__).resolve().parent.parent / "clipia_proxy"
PUBLIC_MODULES = frozenset(
    {
        "aiohttp",
        "aiohttp.web",
        "aiohttp.abc",
        "aiohttp.hdrs",
        "aiohttp.http",
        "aiohttp.http_exceptions",
    }
)
"""``aiohttp.http``/``http_exceptions``: the HTTP parser's exception types, named in its API."""


def sources() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@functools.cache
def aiohttp_private_names() -> frozenset[str]:
    """Every ``_name`` (not dunder) aiohttp's own source uses as an attribute or defines."""
    names: set[str] = set()
    for path in Path(aiohttp.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            else:
                continue
            if name.startswith("_") and not name.startswith("__"):
                names.add(name)
    return frozenset(names)


def aiohttp_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to aiohttp modules or objects (``aiohttp``, ``web``, imported names)."""
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aiohttp":
                    aliases.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
            aliases.update(alias.asname or alias.name for alias in node.names)
    return aliases


def root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_the_checks_know_aiohttps_internals() -> None:
    """The scan would see what the old upstream pool used (it fails loudly if aiohttp changes)."""
    private = aiohttp_private_names()
    assert {"_read_timeout", "_reschedule_timeout", "_drop_timeout", "_payload"} <= private


def test_no_aiohttp_internals_are_imported() -> None:
    problems: list[str] = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                names = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "aiohttp" and module not in PUBLIC_MODULES:
                    problems.append(f"{path.name}:{node.lineno}: imports {module}")
                if module.split(".")[0] == "aiohttp":
                    problems.extend(
                        f"{path.name}:{node.lineno}: imports {module}.{name}"
                        for name in names
                        if name.startswith("_")
                    )
    assert problems == []


def test_no_private_aiohttp_hook_is_overridden() -> None:
    """A subclass of an aiohttp class overrides none of aiohttp's underscore methods."""
    private = aiohttp_private_names()
    problems: list[str] = []
    for path, tree in sources():
        aliases = aiohttp_aliases(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(root_name(base) in aliases for base in node.bases):
                continue
            problems.extend(
                f"{path.name}:{item.lineno}: {node.name}.{item.name} overrides aiohttp's"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in private
            )
    assert problems == []


@functools.cache
def own_private_names() -> frozenset[str]:
    """``_name`` attributes the package's own classes define (``self._name = …``, methods)."""
    names: set[str] = set()
    for _, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if isinstance(statement, ast.Assign) and isinstance(
                        statement.value, ast.Tuple
                    ):  # __slots__
                        names.update(
                            item.value
                            for item in statement.value.elts
                            if isinstance(item, ast.Constant) and isinstance(item.value, str)
                        )
    return frozenset(name for name in names if name.startswith("_"))


def test_no_private_aiohttp_attribute_is_touched() -> None:
    # A name the package's own classes also define (Secret._value) is theirs, not aiohttp's.
    private = aiohttp_private_names() - own_private_names()
    problems: list[str] = []
    for path, tree in sources():
        aliases = aiohttp_aliases(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            owner = root_name(node.value)
            direct = isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}
            if owner in aliases or (node.attr in private and not direct):
                problems.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert problems == []

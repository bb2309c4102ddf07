"""Every config key is documented: in README's configuration reference and in config.example.yaml.

The keys are read from the config structs themselves (``clipia_proxy.config.Config`` and the
structs its fields name, recursively), so a key added to the code without documentation fails
here. README: a row of the reference table names the key (`` `a.b.c` ``), or the row of its
nearest documented parent names it in backticks (``teams[].keys[]`` lists ``limits``).
config.example.yaml: the key is set, or shown commented out (``# key: value``).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from clipia_proxy.config import Config

ROOT = Path(__file__).resolve().parent.parent
NOT_KEYS = {"source", "warnings"}  # filled in by the loader, never read from a file


def _struct_in(annotation: Any) -> tuple[type[msgspec.Struct] | None, str]:
    """Return the struct a field holds (if any) and how its path continues ("", "[]", ".*")."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation, ""
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found, suffix = _struct_in(arg)
            if found is not None:
                return found, suffix
    if origin in (tuple, list) and args:
        found, _ = _struct_in(args[0])
        return found, "[]"
    if origin is dict and len(args) == 2:
        found, _ = _struct_in(args[1])
        return found, ".*"
    return None, ""


def config_keys(struct: type[msgspec.Struct] = Config, prefix: str = "") -> Iterator[str]:
    """Yield every key path of the config file: ``server.port``, ``teams[].keys[].limits.rpm``."""
    hints = typing.get_type_hints(struct)
    for name in struct.__struct_fields__:
        if struct is Config and name in NOT_KEYS:
            continue
        path = f"{prefix}{name}"
        yield path
        inner, suffix = _struct_in(hints[name])
        if inner is not None:
            yield from config_keys(inner, f"{path}{suffix}.")


def readme_rows() -> dict[str, str]:
    """The configuration reference table: documented key path -> the whole row."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Configuration reference") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split(" | ", 1)[0]
        names = re.findall(r"`([^`]+)`", cell)
        first = names[0]
        rows[first] = line
        parent = first.rsplit(".", 1)[0] + "." if "." in first else ""
        for sibling in names[1:]:
            rows[f"{parent}{sibling}"] = line
    return rows


def documented_in_readme(path: str, rows: dict[str, str]) -> bool:
    """``path`` has a row, rows for its keys (a section), or its nearest parent's row names it."""
    if path in rows or f"{path}[]" in rows:
        return True
    if any(row.startswith((f"{path}.", f"{path}[].")) for row in rows):
        return True
    leaf = re.split(r"[.\[\]*]+", path.rstrip(".[]*"))[-1]
    parent = path
    while "." in parent:
        parent = parent.rsplit(".", 1)[0].removesuffix(".*")
        if parent in rows:
            return bool(re.search(rf"`[^`]*\b{re.escape(leaf)}\b[^`]*`", rows[parent]))
    return False


def example_keys() -> set[str]:
    """Key paths set in config.example.yaml, counting commented-out ``# key: value`` lines."""
    text = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    uncommented = re.sub(r"^(\s*)# ([a-z_]+:)", r"\1\2", text, flags=re.MULTILINE)
    found: set[str] = set()

    def walk(node: object, struct: type[msgspec.Struct], prefix: str) -> None:
        if not isinstance(node, dict):
            return
        hints = typing.get_type_hints(struct)
        for key, value in node.items():
            if key not in struct.__struct_fields__:
                continue
            path = f"{prefix}{key}"
            found.add(path)
            inner, suffix = _struct_in(hints[key])
            if inner is None:
                continue
            if suffix == "[]":
                for item in value or []:
                    walk(item, inner, f"{path}[].")
            elif suffix == ".*":
                for item in (value or {}).values():
                    walk(item, inner, f"{path}.*.")
            else:
                walk(value, inner, f"{path}.")

    walk(yaml.safe_load(uncommented), Config, "")
    return found


def test_the_struct_walk_finds_nested_keys() -> None:
    keys = set(config_keys())
    assert {
        "server.port",
        "teams[].keys[].limits.concurrency",
        "attribution.tags.*.metric",
        "mcp.allowed_origins",
    } <= keys
    assert "source" not in keys


def test_the_readme_check_can_fail() -> None:
    rows = readme_rows()
    assert documented_in_readme("upstream.transport", rows)
    assert documented_in_readme("teams[].keys[].limits.rpm", rows)
    assert not documented_in_readme("upstream.no_such_key", rows)
    assert not documented_in_readme("teams[].keys[].no_such_key", rows)


@pytest.mark.parametrize("path", list(config_keys()))
def test_every_config_key_is_in_the_readme_reference(path: str) -> None:
    assert documented_in_readme(path, readme_rows()), f"README has no row for {path}"


@pytest.mark.parametrize("path", list(config_keys()))
def test_every_config_key_is_in_the_example(path: str) -> None:
    assert path in example_keys(), f"config.example.yaml neither sets nor shows {path}"

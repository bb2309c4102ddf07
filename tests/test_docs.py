"""The project explains itself: its Markdown points at nothing outside the repository.

No link to a file outside the repository (``../shared/…``, the design notes it was built from)
and no mention of an issue tracker's numbers: a reader of the repository has neither. Every
Markdown file of the repository is read (README.md, docs/, bench/, deploy/), and the relative
links of each must name a file that exists. Code and config (docstrings, comments, rules
files) cite docs/ too, never the notes outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".ci-venv", ".ci-venv-lowest", ".venv", "node_modules", ".hypothesis"}
OUTSIDE = re.compile(
    r"\.\./shared|shared/(?:DESIGN|UPSTREAM|STYLE|HARDENING)"  # the notes outside the repo
    r"|\b(?:DESIGN|UPSTREAM|STYLE|HARDENING)(?:\.md)?\s*§"  # their sections, by name
    r"|\bissues?\s*#?\d|(?<![\w&])#\d+\b(?!-)",  # an issue tracker's numbers
    re.IGNORECASE,
)
LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)\s#]+)")


def markdown_files() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*.md")):
        if not SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts):
            found.append(path)
    return found


def test_the_docs_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/architecture.md", "bench/README.md"} <= names


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_pointer_outside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    hits = [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for m in OUTSIDE.finditer(text)
    ]
    assert not hits, "\n".join(hits)
    broken = [
        target
        for target in LINK.findall(text)
        if not (path.parent / target).resolve().exists()
        or not (path.parent / target).resolve().is_relative_to(ROOT)
    ]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


NOTES = re.compile(
    r"\.\./shared|shared/(?:DESIGN|UPSTREAM|STYLE|HARDENING)"
    r"|\b(?:DESIGN|UPSTREAM|STYLE|HARDENING)(?:\.md\b|\s*§)"
)
"""The notes outside the repository, as code and config may name them (issue-like ``#N`` is
allowed there: code cites other projects' bug reports, such as ``litellm#5762``)."""
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".json", ".sh", ".cfg"}
GENERATED_DIRS = {".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", "build", "dist"}


def source_files() -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if (SKIPPED_DIRS | GENERATED_DIRS).intersection(parts) or path == Path(__file__).resolve():
            continue
        if path.is_file() and (path.suffix in SOURCE_SUFFIXES or parts == (".ci", "run")):
            found.append(path)
    return found


def test_code_and_config_point_at_nothing_outside_the_repository() -> None:
    """Docstrings and comments (the package, tests, bench, deploy, CI) cite docs/, not notes."""
    hits: list[str] = []
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        hits.extend(
            f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for m in NOTES.finditer(text)
        )
    assert len(source_files()) > 100
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    ["HARDENING §3.1 to §3.4", "OpenAI envelope with DESIGN §5.3's code", "(UPSTREAM.md, x)"],
)
def test_the_notes_pattern_catches_what_it_must(line: str) -> None:
    assert NOTES.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "see `../shared/DESIGN.md` §4",
        "the core gateway of issue #2",
        "issue 13's target",
        "because DESIGN §5.3 has none",
        "(HARDENING §5.3 asks for soak runs)",
        "fixed in #42",
    ],
)
def test_the_pattern_catches_what_it_must(line: str) -> None:
    assert OUTSIDE.search(line)


@pytest.mark.parametrize(
    "line",
    ["`teams[2].budget.month`", "`#8a2be2` in the dashboard", "x-ratelimit-remaining", "C#"],
)
def test_the_pattern_spares_ordinary_text(line: str) -> None:
    assert not OUTSIDE.search(line)


def test_architecture_names_every_config_section_and_command() -> None:
    """docs/architecture.md's contract tables keep up with the code (sections and commands)."""
    from clipia_proxy.cli import build_parser
    from clipia_proxy.config import Config

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    contracts = text[text.index("## 5. Contracts") : text.index("### 5.3 HTTP")]
    for name in Config.__struct_fields__:
        if name not in {"source", "warnings"}:
            assert f"| `{name}" in contracts, f"config section {name!r} is missing"
    listed = re.search(r"\{([a-z,-]+)\}", build_parser().format_usage())
    assert listed is not None
    for command in listed[1].split(","):
        assert f"| `{command}" in contracts, f"command {command!r} is missing"

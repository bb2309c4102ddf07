"""``bench.instructions``: reading a callgrind dump and the command's settings.

The measurement itself needs valgrind and a minute of CPU: it is run by hand, like
``bench.run`` (see bench/README.md); here only its own logic is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.instructions import instructions, parse_args

# The head of a dump `callgrind_control -d` writes (callgrind 3.19).
_DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python -m clipia_proxy serve --config gateway.yaml
part: 2

desc: Trigger: dump stream

positions: line
events: Ir
summary: 690630063


ob=(2) ???
fn=(1098) 0x0000000004936778
0 2435
"""


def test_the_dump_count_is_read(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.4242.2"
    dump.write_text(_DUMP)
    assert instructions(dump) == 690_630_063


def test_a_final_dump_with_totals_is_read(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.4242"
    dump.write_text(_DUMP.replace("summary: 690630063", "totals: 12345"))
    assert instructions(dump) == 12_345


def test_a_dump_without_a_count_is_an_error(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.4242.1"
    dump.write_text(_DUMP.replace("summary: 690630063\n", ""))
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions(dump)


def test_defaults_are_the_documented_ones() -> None:
    args = parse_args([])
    assert (args.requests, args.stream_requests, args.max_tokens) == (400, 400, 16)
    assert args.gateway_log_level == "INFO"
    assert (args.tree / "clipia_proxy").is_dir()

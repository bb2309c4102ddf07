"""Count the gateway's CPU instructions per request: a noise-free A/B measure (valgrind).

``python -m bench.run`` measures CPU time, which moves by 15-30 % from run to run on a shared
machine. This runs one gateway (the core configuration: memory store, no quotas) under
valgrind's callgrind, warms it up, then counts the user-space instructions it executes for
``--requests`` non-streamed and ``--stream-requests`` streamed chat requests (concurrency 4)
against the emulator. The same code gives the same count within about 1 %, so two trees
can be compared in one run each::

    python -m bench.instructions --tree /path/to/old/checkout
    python -m bench.instructions            # this checkout

The tree's own ``clipia_proxy`` and ``bench.emulator`` run (its directory is put on
``PYTHONPATH``); the config is written by this checkout's ``bench.run.gateway_config``.
Kernel time (the socket system calls) is not counted: it is about the same for any code.
Needs ``valgrind`` on ``PATH``; a run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import aiohttp

if __package__ in (None, ""):  # `python bench/instructions.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import Target, run_load
from bench.procs import HOST, ROOT, Child, free_ports, python, wait_ready
from bench.run import MODEL, UPSTREAM_KEY_ENV, gateway_config
from clipia_proxy.auth import generate_key

CONCURRENCY: Final = 4
WARMUP: Final = 60
"""Requests of each kind sent before counting (pools, caches, code paths)."""
_SUMMARY: Final = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="The gateway's instructions per request under callgrind (see the docstring).",
    )
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout to run (default: this)")
    parser.add_argument("--requests", type=int, default=400, help="non-stream requests (400)")
    parser.add_argument("--stream-requests", type=int, default=400, help="stream requests (400)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--gateway-log-level",
        default="INFO",
        help="INFO (default): one access line per request; WARNING turns it off",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy the callgrind dumps here (for callgrind_annotate --inclusive=yes)",
    )
    return parser.parse_args(argv)


def instructions(dump: Path) -> int:
    """Return the instruction count a callgrind dump file holds."""
    found = _SUMMARY.search(dump.read_text(errors="replace"))
    if found is None:
        raise RuntimeError(f"no instruction count in {dump}")
    return int(found.group(1))


class Counted:
    """The gateway under callgrind: zero its counters, dump them, read what a dump counted."""

    def __init__(self, child: Child, out_dir: Path) -> None:
        self.child = child
        self.out_dir = out_dir

    def zero(self) -> None:
        subprocess.run(
            ["callgrind_control", "-z", str(self.child.pid)], check=True, capture_output=True
        )

    def dump(self, label: str) -> int:
        """Write the counters since the last zero; return how many instructions they hold."""
        before = set(self.out_dir.glob("callgrind.*"))
        subprocess.run(
            ["callgrind_control", "-d", label, str(self.child.pid)], check=True, capture_output=True
        )
        (new,) = set(self.out_dir.glob("callgrind.*")) - before
        return instructions(new)


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Start the emulator and the counted gateway; return instructions per request by kind."""
    tree = args.tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    env[UPSTREAM_KEY_ENV] = "clipia_test_bench" + os.urandom(12).hex()
    emu_port, port, admin_port = free_ports(3)
    team_key = generate_key()
    config = tmp / "gateway.yaml"
    config.write_text(
        gateway_config(
            port=port,
            admin_port=admin_port,
            emulator_port=emu_port,
            team_key=team_key,
            store="memory",
            quotas=False,
        )
    )
    emulator = Child(
        "emulator",
        [python(), "-m", "bench.emulator", "--port", str(emu_port)],
        env=env,
        log_path=tmp / "emulator.log",
        cwd=tree,
    )
    serve = ["-m", "clipia_proxy", "serve", "--config", str(config)]
    gateway = Child(
        "gateway",
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={tmp}/callgrind.%p",
            python(),
            *serve,
            *("--log-level", args.gateway_log_level),
        ],
        env=env,
        log_path=tmp / "gateway.log",
        cwd=tree,
    )
    counted = Counted(gateway, tmp)
    target = Target("gateway", f"http://{HOST}:{port}/v1", team_key, MODEL)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, emulator, f"http://{HOST}:{emu_port}/v1/models", within=30)
            await wait_ready(session, gateway, f"http://{HOST}:{admin_port}/readyz", within=600)
            await _wait_listening(port, within=60)  # the admin port may answer first
            per_request: dict[str, float] = {}
            for stream, count in ((False, args.requests), (True, args.stream_requests)):

                async def send(requests: int, stream: bool = stream) -> None:
                    result = await run_load(
                        session,
                        target,
                        stream=stream,
                        concurrency=CONCURRENCY,
                        requests=requests,
                        max_tokens=args.max_tokens,
                        max_seconds=3600,
                    )
                    if result.ok != requests:
                        raise RuntimeError(f"{result.errors} failed: {result.error_samples}")

                await send(WARMUP)
                counted.zero()
                await send(count)
                kind = "stream" if stream else "nonstream"
                per_request[kind] = counted.dump(kind) / count
            return per_request
    finally:
        gateway.stop(timeout=120)
        emulator.stop()


async def _wait_listening(port: int, *, within: float) -> None:
    """Wait until ``port`` on ``HOST`` accepts a connection."""
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            writer.close()
            await writer.wait_closed()
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="clipia-instructions-") as tmp:
        per_request = asyncio.run(measure(args, Path(tmp)))
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in Path(tmp).glob("callgrind.*"):
                shutil.copy(dump, args.keep / dump.name)
    print(
        f"{args.tree}: log level {args.gateway_log_level}, max_tokens {args.max_tokens}, "
        f"concurrency {CONCURRENCY}"
    )
    for kind, count in per_request.items():
        print(f"  {kind:<10} {count / 1000:10.1f} k instructions per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

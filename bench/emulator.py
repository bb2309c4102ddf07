"""``python -m bench.emulator --port N``: the Clipia emulator with the per-key RPM limit lifted.

The stock ``python -m clipia_proxy emulator`` keeps Clipia's default of 120 chat requests per
key per minute, which a benchmark passes in a fraction of a second. This runs the very same
emulator application (:func:`clipia_proxy.emulator.run_emulator`) in its own process, on uvloop
when installed, with an effectively unlimited RPM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, Final

from clipia_proxy.emulator import EmulatorState, run_emulator

UNLIMITED_RPM: Final = 1_000_000_000


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # optional speed-up, as the gateway uses it

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    state = EmulatorState(seed=args.seed, rpm=UNLIMITED_RPM)
    with contextlib.suppress(KeyboardInterrupt):
        _run(run_emulator(host=args.host, port=args.port, state=state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

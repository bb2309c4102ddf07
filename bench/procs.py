"""Child processes of the benchmark: the emulator, the gateway, LiteLLM's proxy.

Each runs as a separate OS process started with ``subprocess``; its output goes to a log file in
the run's temporary directory. :class:`Child` stops its process (SIGTERM, then SIGKILL) and is
always stopped from a ``finally`` in :mod:`bench.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Final

import aiohttp
import psutil

ROOT: Final = Path(__file__).resolve().parent.parent
"""The repository root (the working directory of every child)."""

HOST: Final = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment with the repo on ``PYTHONPATH`` and ``extra`` added."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ChildDiedError(RuntimeError):
    """A child process exited before it was ready."""


class Child:
    """One child process, its log file and its psutil handle.

    ``cwd`` defaults to the repository root; the benchmark passes its temporary directory, so a
    relative path in a child's defaults (the gateway's ``./clipia-proxy.db``) lands there.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name: Final = name
        self.argv: Final = list(argv)
        self.log_path: Final = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.popen: Final = subprocess.Popen(
            self.argv,
            cwd=cwd if cwd is not None else ROOT,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.process: Final = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        """Return the end of the child's output (for error messages)."""
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def tree(self) -> list[psutil.Process]:
        """Return the process and its descendants (LiteLLM may fork workers)."""
        procs = [self.process]
        with contextlib.suppress(psutil.Error):
            procs.extend(self.process.children(recursive=True))
        return procs

    def cpu_seconds(self) -> float:
        """Return user + system CPU seconds used so far by the process tree."""
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        """Return the resident set size of the process tree."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += int(proc.memory_info().rss)
        return total

    def tcp_connections(self) -> int:
        """Return how many TCP sockets the process tree has open (listening ones excluded)."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.Error):
                total += sum(
                    1 for c in proc.net_connections(kind="tcp") if c.status != psutil.CONN_LISTEN
                )
        return total

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process: SIGTERM (graceful), then SIGKILL after ``timeout`` seconds."""
        try:
            if self.popen.poll() is None:
                children: list[psutil.Process] = []
                with contextlib.suppress(psutil.Error):
                    children = self.process.children(recursive=True)
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout)
                for child in children:  # workers left behind by a parent that died first
                    with contextlib.suppress(psutil.Error):
                        child.kill()
        finally:
            self._log.close()


async def wait_ready(
    session: aiohttp.ClientSession, child: Child, url: str, *, within: float
) -> None:
    """Poll ``url`` until it answers 200; raise if ``child`` dies or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildDiedError(
                f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
            )
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                await resp.read()
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.05)
    raise ChildDiedError(
        f"{child.name} not ready at {url} after {within:.0f}s ({last}):\n{child.log_tail()}"
    )


def python() -> str:
    """Return the interpreter the children run on (the one running the benchmark)."""
    return sys.executable

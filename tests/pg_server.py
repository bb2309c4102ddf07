"""A real PostgreSQL for tests: CLIPIA_TEST_POSTGRES_DSN, else a throw-away cluster.

The cluster is Debian's PostgreSQL (``initdb`` and ``pg_ctl`` from the newest version folder
under /usr/lib/postgresql, or PATH). PostgreSQL refuses to run as root, so when the tests run
as root the cluster belongs to ``nobody`` (``setpriv``), in its own temp folder, on a free
127.0.0.1 port, with fsync off (a test cluster: nothing to keep). Never a silent skip: without
a server the PostgreSQL tests fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_NOBODY = 65534


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_bin() -> Path:
    """Return the folder of ``initdb`` and ``pg_ctl``, or raise."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server: install Debian's postgresql package (initdb, pg_ctl)")


def _as_owner(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", *command]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the DSN of a running PostgreSQL (started and stopped here)."""
    dsn = os.environ.get("CLIPIA_TEST_POSTGRES_DSN")
    if dsn:
        yield dsn
        return
    binary = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="clipia-pg-"))
    data = root / "data"
    log = root / "server.log"
    if os.geteuid() == 0:
        os.chown(root, _NOBODY, _NOBODY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    subprocess.run(
        _as_owner(
            [
                str(binary / "initdb"),
                "-D",
                str(data),
                "-U",
                "clipia",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
        env=env,
        cwd=root,
    )
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    started = subprocess.run(
        _as_owner(
            [str(binary / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]
        ),
        capture_output=True,
        env=env,
        cwd=root,
        check=False,
    )
    if started.returncode != 0:
        text = log.read_text(errors="replace") if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr.decode()} {text}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"postgresql://clipia@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_owner([str(binary / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            env=env,
            cwd=root,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)

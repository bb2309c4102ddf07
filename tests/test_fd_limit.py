"""``clipia-proxy serve`` at its file descriptor limit: the probes still answer.

The gateway runs as a real process with ``RLIMIT_NOFILE`` at 256; more idle connections than
that are opened to its data port. The admin probes must keep answering on new connections (the
data port's cap is fitted under the limit), a request on the data port gets the 503 envelope or
is served, and stderr holds no traceback.
"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import aiohttp
import pytest

from clipia_proxy.auth import generate_key, hash_key
from tests.harness import serve

pytestmark = pytest.mark.e2e

NOFILE = 256
IDLE = 400


def _limit_fds() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


async def _healthz(port: int) -> int:
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        return response.status


async def test_probes_answer_with_more_idle_connections_than_descriptors(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: 0, admin_port: 0, header_timeout_seconds: 30}}
upstream: {{base_url: "http://127.0.0.1:9/v1", api_key_env: CLIPIA_API_KEY}}
store: {{backend: sqlite, sqlite_path: {tmp_path}/ledger.db}}
teams:
  - id: search
    keys: [{{id: s, sha256: {hash_key(generate_key())}}}]
""",
        encoding="utf-8",
    )
    env = {"CLIPIA_API_KEY": "clipia_live_" + "x" * 32}
    stderr_path = tmp_path / "stderr.log"
    # Listening means both ports accept (after start-up work such as the catalog warm-up).
    served = await serve(config, env=env, log=stderr_path, within=30, preexec_fn=_limit_fds)
    proc, port, admin_port = served.process, served.port, served.admin_port
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(IDLE):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
        await asyncio.sleep(0.5)  # let the gateway accept (or refuse) them all
        statuses = [await _healthz(admin_port) for _ in range(10)]
        assert statuses == [200] * 10
        assert proc.returncode is None
    finally:
        for writer in held:
            writer.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    log = stderr_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
    assert "ModuleNotFoundError" not in log
    assert "does not fit the file descriptor limit" in log  # the cap was fitted, and said so

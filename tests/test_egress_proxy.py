"""Chat through a corporate egress proxy: a real forward proxy (proxy.py) on 127.0.0.1.

The upstream is the emulator over real TLS (a trustme CA the gateway trusts through
``SSL_CERT_FILE``, as an operator would add a corporate CA); the gateway reaches it through the
proxy with ``CONNECT`` and the proxy's own access log shows the tunnel. Nothing here leaves
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import trustme
from yarl import URL

from clipia_proxy.config import Secret, UpstreamConfig
from clipia_proxy.server import Running
from clipia_proxy.upstream import UpstreamClient, UpstreamNotSent, env_proxy
from tests.harness import Emulator, start_emulator, start_gateway, stop_stack, team_keys
from tests.transports import pytest_generate_tests, transport_kind

__all__ = ["pytest_generate_tests", "transport_kind"]  # one run per transport

pytestmark = pytest.mark.timeout(120)

HELLO: dict[str, object] = {
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "Hello there"}],
}


@dataclass
class ForwardProxy:
    """A proxy.py process: its URL and its access log."""

    url: str
    log: Path

    def tunnels(self) -> list[str]:
        """The ``CONNECT host:port`` lines of the access log so far."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return re.findall(r" - CONNECT (\S+) - ", text)

    def wait_for_tunnels(self, count: int, within: float = 20.0) -> list[str]:
        """Wait (bounded) until the log shows ``count`` tunnels (written when each closes)."""
        deadline = time.monotonic() + within
        while len(found := self.tunnels()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found


@contextlib.contextmanager
def run_forward_proxy(folder: Path, *extra: str) -> Iterator[ForwardProxy]:
    """Run proxy.py on 127.0.0.1 (a free port) until the block ends."""
    port_file, log = folder / "port", folder / "access.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "--hostname",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--num-acceptors",
            "1",
            "--num-workers",
            "1",
            "--threaded",
            "--log-file",
            str(log),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, "proxy.py exited at start-up"
            assert time.monotonic() < deadline, "proxy.py did not start within 30 s"
            time.sleep(0.05)
        yield ForwardProxy(f"http://127.0.0.1:{port_file.read_text().strip()}", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    """A real forward proxy, open to all, for the module."""
    with run_forward_proxy(tmp_path_factory.mktemp("proxy")) as proxy:
        yield proxy


PROXY_USER, PROXY_PASSWORD = "gateway", "proxy-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def guarded_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForwardProxy]:
    """A real forward proxy that requires Basic credentials (407 without them)."""
    folder = tmp_path_factory.mktemp("guarded-proxy")
    with run_forward_proxy(folder, "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}") as proxy:
        yield proxy


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A throw-away CA that the gateway trusts (``SSL_CERT_FILE``), like a corporate CA."""
    authority = trustme.CA()
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return authority


@pytest.fixture
async def tls_upstream(trusted_ca: trustme.CA) -> AsyncIterator[Emulator]:
    """The emulator served over TLS as ``localhost``."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trusted_ca.issue_cert("localhost").configure_cert(server_tls)
    emulator = await start_emulator(ssl_context=server_tls)
    try:
        yield emulator
    finally:
        await emulator.stop()


@contextlib.asynccontextmanager
async def gateway(
    upstream: Emulator, settings: dict[str, object]
) -> AsyncIterator[tuple[Running, str]]:
    """A gateway (``server.start``, as ``serve`` runs it) in front of ``upstream``."""
    stack = await start_gateway(upstream, team_keys(), store="{backend: memory}", upstream=settings)
    try:
        yield stack.running, stack.keys["search"]
    finally:
        await stop_stack(stack)


async def chat_plain_and_streamed(running: Running, key: str) -> list[Any]:
    """One plain and one streamed chat; return the plain answer and the stream's bytes."""
    base = f"http://127.0.0.1:{running.port}/v1"
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(f"{base}/chat/completions", json=HELLO, headers=headers) as reply:
            assert reply.status == 200, await reply.text()
            plain = msgspec.json.decode(await reply.read())
        async with session.post(
            f"{base}/chat/completions", json={**HELLO, "stream": True}, headers=headers
        ) as reply:
            assert reply.status == 200, await reply.text()
            streamed = await reply.read()
    return [plain, streamed]


async def test_chat_plain_and_streamed_through_the_egress_proxy(
    forward_proxy: ForwardProxy, tls_upstream: Emulator
) -> None:
    before = len(forward_proxy.tunnels())
    async with gateway(tls_upstream, {"proxy_url": forward_proxy.url}) as (running, key):
        plain, streamed = await chat_plain_and_streamed(running, key)
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["content"]
    assert streamed.rstrip().endswith(b"data: [DONE]")
    assert b'"chat.completion.chunk"' in streamed
    chats = [r for r in tls_upstream.state.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == 2
    assert all(dict(r.headers)["Host"].startswith("localhost:") for r in chats)
    # The gateway stopped (its connections closed): the proxy logged every tunnel it made.
    port = URL(tls_upstream.base_url).port
    tunnels = await asyncio.to_thread(forward_proxy.wait_for_tunnels, before + 1)
    assert f"localhost:{port}" in tunnels[before:]


async def test_https_proxy_from_the_environment_when_trusted(
    forward_proxy: ForwardProxy, tls_upstream: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    port = URL(tls_upstream.base_url).port
    before = len(forward_proxy.tunnels())
    async with gateway(tls_upstream, {"trust_env": "true"}) as (running, key):
        await chat_plain_and_streamed(running, key)
    tunnels = await asyncio.to_thread(forward_proxy.wait_for_tunnels, before + 1)
    assert f"localhost:{port}" in tunnels[before:]

    # NO_PROXY names the upstream: direct connections, no new tunnel.
    monkeypatch.setenv("NO_PROXY", "example.org, .localhost, localhost")
    before = len(forward_proxy.tunnels())
    requests = len(tls_upstream.state.requests)
    async with gateway(tls_upstream, {"trust_env": "true"}) as (running, key):
        await chat_plain_and_streamed(running, key)
    assert len(tls_upstream.state.requests) > requests
    # A tunnel is logged when it closes, in order: had the NO_PROXY gateway made one, it
    # would be logged before the next gateway's (the first stopped before the second began).
    async with gateway(tls_upstream, {"proxy_url": forward_proxy.url}) as (running, key):
        await chat_plain_and_streamed(running, key)
    tunnels = await asyncio.to_thread(forward_proxy.wait_for_tunnels, before + 1)
    assert len(tunnels) == before + 1


async def test_environment_proxies_are_ignored_unless_trusted(
    forward_proxy: ForwardProxy, tls_upstream: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # nothing listens: would fail
    async with gateway(tls_upstream, {}) as (running, key):
        plain, _ = await chat_plain_and_streamed(running, key)
    assert plain["object"] == "chat.completion"


async def test_an_unreachable_proxy_is_not_sent_and_retried() -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    config = UpstreamConfig(
        base_url="https://localhost:9/v1", api_key_env=None, proxy_url="http://127.0.0.1:1"
    )
    client = UpstreamClient(config, Secret("clipia_live_proxy"), sleep=sleep)
    await client.start()
    try:
        with pytest.raises(UpstreamNotSent):
            await client.send("POST", "/chat/completions", request_id="r1", body=b"{}")
    finally:
        await client.close()
    assert len(sleeps) == config.retries


@pytest.mark.parametrize(
    ("environ", "url", "expected"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.clipia.ai/v1", "http://p:3128"),
        ({"https_proxy": "http://p:3128"}, "https://api.clipia.ai/v1", "http://p:3128"),
        ({"HTTP_PROXY": "http://p:3128"}, "https://api.clipia.ai/v1", None),
        ({"HTTP_PROXY": "http://p:3128"}, "http://api.clipia.ai/v1", "http://p:3128"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, "https://api.clipia.ai/v1", None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "clipia.ai"}, "https://api.clipia.ai", None),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".clipia.ai"}, "https://api.clipia.ai", None),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.clipia.ai:443"},
            "https://api.clipia.ai",
            None,
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.clipia.ai:8443"},
            "https://api.clipia.ai",
            "http://p:1",
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "pia.ai"},
            "https://api.clipia.ai",
            "http://p:1",
        ),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "10.0.0.1"}, "https://10.0.0.1/v1", None),
        ({}, "https://api.clipia.ai/v1", None),
    ],
)
def test_env_proxy_rules(environ: dict[str, str], url: str, expected: str | None) -> None:
    found = env_proxy(URL(url), environ)
    assert (str(found) if found is not None else None) == expected


def test_env_proxy_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HTTPS_PROXY", "http://corp-proxy:3128")
    assert env_proxy(URL("https://api.clipia.ai/v1")) == URL("http://corp-proxy:3128")


async def test_proxy_credentials_from_the_url(
    guarded_proxy: ForwardProxy, tls_upstream: Emulator, log_capture: list[str]
) -> None:
    host = URL(guarded_proxy.url).with_user(PROXY_USER).with_password(PROXY_PASSWORD)
    async with gateway(tls_upstream, {"proxy_url": str(host)}) as (running, key):
        plain, streamed = await chat_plain_and_streamed(running, key)
    assert plain["object"] == "chat.completion"
    assert streamed.rstrip().endswith(b"data: [DONE]")
    # Without them the proxy refuses the tunnel (407): nothing reached Clipia, a 502.
    requests = len(tls_upstream.state.requests)
    async with (
        gateway(tls_upstream, {"proxy_url": guarded_proxy.url}) as (running, key),
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{running.port}/v1/chat/completions",
            json=HELLO,
            headers={"Authorization": f"Bearer {key}"},
        ) as reply,
    ):
        assert reply.status == 502
        assert (await reply.json())["error"]["code"] == "upstream_unavailable"
    assert len(tls_upstream.state.requests) == requests
    assert all(PROXY_PASSWORD not in line for line in log_capture)


async def test_a_tunnel_the_proxy_refuses_is_not_sent_and_retried(
    guarded_proxy: ForwardProxy, tls_upstream: Emulator
) -> None:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    config = UpstreamConfig(
        base_url=tls_upstream.base_url, api_key_env=None, proxy_url=guarded_proxy.url
    )
    client = UpstreamClient(config, Secret(tls_upstream.clipia_key), sleep=sleep)
    await client.start()
    try:
        with pytest.raises(UpstreamNotSent):
            await client.send("POST", "/chat/completions", request_id="r1", body=b"{}")
    finally:
        await client.close()
    assert len(sleeps) == config.retries  # a 407 to CONNECT: Clipia saw nothing
    assert tls_upstream.state.requests == []

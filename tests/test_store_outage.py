"""Store outages lose nothing: a real redis-server stopped and restarted, or paused (slow).

Gateways in the test's loop on loopback, the emulator upstream, the real openai SDK with its
defaults. Under ``fail_open`` requests served while Redis is down are journaled and written
into the ledger once it is back (their spend then counts against the budget); a request sent
upstream is never recorded ``not_sent``; one refused before sending is never billed; and
``GET /v1/key`` answers 503 ``quota_store_unavailable`` while the store is down.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionMessageParam

from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Outcome, RecordState
from clipia_proxy.wire import decode_json
from tests.audit import CHAT_PATH, Cluster, audit, emulator_served, start_cluster
from tests.conftest import Stack
from tests.fault_proxy import FaultProxy
from tests.redis_server import redis_executable

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Redis:
    """A redis-server of this test alone, persistent (AOF), that can be stopped and restarted."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="clipia-outage-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waited below
            [
                redis_executable(),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir),
                *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                return

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            await asyncio.to_thread(process.wait, 10)

    async def pause(self, milliseconds: int) -> None:
        """Make every client wait ``milliseconds`` (CLIENT PAUSE ALL): a slow Redis."""
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.client_pause(milliseconds, all=True)
        finally:
            await client.aclose()


@pytest.fixture
def redis_dir() -> Iterator[Redis]:
    server = Redis()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.kill()
            server.process.wait()
        shutil.rmtree(server.dir, ignore_errors=True)


def teams(day: str) -> str:
    return f"""
teams:
  - id: search
    keys: [{{{{id: search-1, sha256: {{search}}}}}}]
    models: {{{{allow: ["*"]}}}}
    budget: {{{{day: {day}}}}}
  - id: research
    keys: [{{{{id: research-1, sha256: {{research}}}}}}]
    models: {{{{allow: ["*"]}}}}
"""


async def start(
    server: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ledger: str,
    *,
    on_error: str,
    day: str,
) -> Cluster:
    env = f"CLIPIA_OUTAGE_REDIS_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(env, server.url)
    store = (
        f"{{backend: redis, redis_url_env: {env}, redis_key_prefix: outage, timeout_seconds: 0.5,"
        f" on_error: {on_error}, journal_path: {tmp_path}/outage.jsonl}}\n{ledger}"
    )
    return await start_cluster(
        1,
        teams=teams(day),
        store=store,
        upstream="first_byte_timeout_seconds: 1",
        extra="accounting: {lease_seconds: 2}",
    )


@pytest.fixture
async def clusters() -> AsyncIterator[list[Cluster]]:
    started: list[Cluster] = []
    try:
        yield started
    finally:
        for cluster in started:
            await cluster.stop()


async def sdk_chat(gateway: Stack, *, stream: bool) -> tuple[int, str]:
    """One chat request with the openai SDK (its defaults: 2 retries); (status, request id)."""
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.keys["search"])
    try:
        if stream:
            raw_stream = await client.chat.completions.with_raw_response.create(
                model="gpt-5.5", messages=PROMPT, max_tokens=20, stream=True
            )
            async for _chunk in raw_stream.parse():
                pass
            return raw_stream.status_code, raw_stream.headers["x-request-id"]
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=PROMPT, max_tokens=20
        )
        raw.parse()
        return raw.status_code, raw.headers["x-request-id"]
    finally:
        await client.close()


async def key_info(gateway: Stack) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway.base_url}/key", headers=gateway.auth()) as response,
    ):
        body = decode_json(await response.read())
    assert isinstance(body, dict)
    return response.status, body


async def journal_replayed(gateway: Stack) -> None:
    journal = gateway.running.app[QUOTAS].journal
    assert journal is not None
    async with asyncio.timeout(15):
        while True:
            if not journal.pending:
                return
            await asyncio.sleep(0.05)


async def test_redis_down_under_fail_open_is_journaled_and_counted_when_back(
    redis_dir: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clusters: list[Cluster],
    ledger_section: str,
) -> None:
    server = redis_dir
    await server.start()
    cluster = await start(
        server, tmp_path, monkeypatch, ledger_section, on_error="fail_open", day="0.05"
    )
    clusters.append(cluster)
    gateway = cluster.gateways[0]
    assert (await sdk_chat(gateway, stream=False))[0] == 200  # the store up: reserved

    await server.stop()
    served = [await sdk_chat(gateway, stream=bool(i % 2)) for i in range(20)]
    assert {status for status, _ in served} == {200}  # fail_open: served
    status, body = await key_info(gateway)
    assert status == 503
    assert body["error"]["code"] == "quota_store_unavailable"  # type: ignore[index]

    await server.start()
    await journal_replayed(gateway)
    records = await audit(cluster.gateways, cluster.emulator)
    assert len(records) == 21
    assert {request_id for _, request_id in served} <= {r.request_id for r in records}
    assert all(r.state is RecordState.SETTLED for r in records)
    billed = sum(s.cost for s in emulator_served(cluster.emulator).values())
    assert sum(r.cost for r in records) == billed
    # The spend counts against the budget now: over it, the next request is refused.
    status, body = await key_info(gateway)
    assert status == 200
    data = body["data"]
    assert isinstance(data, dict)
    assert Decimal(str(data["usage"])) == Decimal(billed) / MICRO_PER_CREDIT
    assert Decimal(billed) / MICRO_PER_CREDIT > Decimal("0.05")
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=gateway.keys["search"], max_retries=0
    )
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-5.5", messages=PROMPT, max_tokens=20)
    finally:
        await client.close()
    assert (refused.value.status_code, refused.value.code) == (402, "budget_exceeded")


async def test_slow_redis_under_fail_open_records_what_was_served(
    redis_dir: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clusters: list[Cluster],
    ledger_section: str,
) -> None:
    """3 s of CLIENT PAUSE against a 0.5 s timeout: served, billed, never ``not_sent``."""
    server = redis_dir
    await server.start()
    cluster = await start(
        server, tmp_path, monkeypatch, ledger_section, on_error="fail_open", day="1000"
    )
    clusters.append(cluster)
    gateway = cluster.gateways[0]
    assert (await sdk_chat(gateway, stream=True))[0] == 200
    await server.pause(3000)
    served = await asyncio.gather(*(sdk_chat(gateway, stream=bool(i % 2)) for i in range(6)))
    assert {status for status, _ in served} == {200}
    await journal_replayed(gateway)
    records = await audit(cluster.gateways, cluster.emulator)
    by_id = {r.request_id: r for r in records}
    bills = emulator_served(cluster.emulator)
    for _, request_id in served:
        record = by_id[request_id]
        assert record.outcome is not Outcome.NOT_SENT
        assert record.cost == bills[request_id].cost > 0


async def test_lost_reply_under_fail_closed_never_bills_what_was_refused(
    redis_dir: Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clusters: list[Cluster],
    ledger_section: str,
) -> None:
    """The reservation lands, its reply is lost and Redis refuses connections for a moment.

    The request is refused (503, never sent); the void that must close its record cannot be
    written then. Leases of 2 s: the reconciler (every 1 s) charged such a record its whole
    reservation as ``crashed``; now the journaled void closes it at 0 first.
    """
    server = redis_dir
    await server.start()
    proxy = FaultProxy("127.0.0.1", server.port)
    await proxy.start()
    proxied = Redis()
    proxied.port = proxy.port  # the gateway reaches Redis through the proxy
    try:
        cluster = await start(
            proxied, tmp_path, monkeypatch, ledger_section, on_error="fail_closed", day="1000"
        )
        clusters.append(cluster)
        gateway = cluster.gateways[0]
        assert (await sdk_chat(gateway, stream=False))[0] == 200  # a pooled connection
        store = gateway.running.app[QUOTAS].store
        async with asyncio.timeout(5):  # its settlement is written (no reply of it in flight)
            while True:
                if not await store.dispatched():
                    break
                await asyncio.sleep(0.02)
        # The reservation's reply is lost (a reconciler pass may not take the fault instead)...
        proxy.drop_only_after = b'"lease_seconds"'  # an argument only a reservation carries
        proxy.drop_replies = 1
        proxy.refuse = True  # ...and new connections are refused (the void's, the retries')
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{gateway.base_url}/chat/completions",
                json={"model": "gpt-5.5", "messages": PROMPT, "max_tokens": 20},
                headers=gateway.auth(),
            ) as response,
        ):
            assert response.status == 503
            refused = response.headers["X-Request-Id"]
            body = decode_json(await response.read())
        assert body["error"]["code"] == "quota_store_unavailable"  # type: ignore[index]
        assert proxy.dropped == 1
        proxy.refuse = False
        await journal_replayed(gateway)
        await asyncio.sleep(2.5)  # past the lease of 2 s, and reconciler passes after it
        # The reservation that landed was released (the journaled void), never charged.
        status, info = await key_info(gateway)
        assert status == 200
        data = info["data"]
        assert isinstance(data, dict)
        for budget in data["budgets"]:
            assert Decimal(str(budget["reserved"])) == 0
        record = await store.record(refused)
        if record is not None:
            assert (record.state, record.cost, record.outcome) == (
                RecordState.SETTLED,
                0,
                Outcome.NOT_SENT,
            )
        assert refused not in {
            r.request_id for r in cluster.emulator.requests if r.path == CHAT_PATH
        }
        records = await audit(cluster.gateways, cluster.emulator)
        assert sum(r.cost for r in records) == sum(
            s.cost for s in emulator_served(cluster.emulator).values()
        )
    finally:
        await proxy.close()

"""Redis loses the counters: three replicas rebuild them from the PostgreSQL ledger.

A dedicated redis-server per test (it is flushed and restarted empty), a fresh PostgreSQL
schema, the emulator upstream and three in-process gateways sharing both. After ``FLUSHALL``
and after a restart without persistence, ``/v1/key`` shows the spend from before plus what
followed, the ledger equals what the upstream billed to the micro-credit, and no team spends
a credit past its budget. Redis memory stays flat with traffic (no per-request records).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from decimal import Decimal

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.model import MICRO_PER_CREDIT
from clipia_proxy.quotas.redis import RedisStore
from tests.audit import Cluster, settle_all, start_cluster
from tests.conftest import Stack, fresh_postgres_schema
from tests.harness import STORE_TIMEOUT, decided
from tests.redis_server import redis_executable

TEAMS = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    budget: {{month: 1000}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models: {{allow: ["gpt-5.5"]}}
    caps: {{max_tokens: 200}}
    budget: {{month: 0.5}}
"""
BODY = {"model": "gpt-5.5", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


class RedisProcess:
    """A redis-server on a fixed loopback port that can be killed and started again empty."""

    def __init__(self, *args: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="clipia-redis-rebuild-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redis_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@contextmanager
def redis_process(*args: str) -> Iterator[RedisProcess]:
    server = RedisProcess(*args)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    with redis_process() as server:
        yield server


@pytest.fixture
async def cluster(
    own_redis: RedisProcess, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Cluster, str]]:
    token = secrets.token_hex(4).upper()
    dsn = await fresh_postgres_schema(postgres_dsn)
    monkeypatch.setenv(f"CLIPIA_REBUILD_REDIS_{token}", own_redis.url)
    monkeypatch.setenv(f"CLIPIA_REBUILD_DSN_{token}", dsn)
    store = (
        f"{{backend: redis, redis_url_env: CLIPIA_REBUILD_REDIS_{token}, replicas: 3, "
        f"timeout_seconds: {STORE_TIMEOUT}}}\nledger: {{backend: postgres, "
        f"postgres_dsn_env: CLIPIA_REBUILD_DSN_{token}}}"
    )
    made = await start_cluster(3, teams=TEAMS, store=store)
    try:
        yield made, dsn
    finally:
        await made.stop()


async def chat(
    session: aiohttp.ClientSession, gateway: Stack, team: str, *, stream: bool = False
) -> int:
    async with session.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {gateway_key(gateway, team)}"},
        json={**BODY, "stream": stream},
    ) as reply:
        await reply.read()
        return reply.status


def gateway_key(gateway: Stack, team: str) -> str:
    return gateway.keys[team]


async def month_spent(session: aiohttp.ClientSession, gateway: Stack, team: str) -> Decimal:
    async with session.get(
        f"{gateway.base_url}/key", headers={"Authorization": f"Bearer {gateway.keys[team]}"}
    ) as reply:
        assert reply.status == 200, await reply.text()
        data = (await reply.json())["data"]
    (month,) = [b for b in data["budgets"] if b["period"] == "month"]
    assert Decimal(str(month["reserved"])) == 0
    return Decimal(str(month["spent"]))


async def ledger_by_team(dsn: str) -> dict[str, list[tuple[str | None, int, str]]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT team, upstream_id, cost, state FROM clipia_ledger")
    finally:
        await conn.close()
    out: dict[str, list[tuple[str | None, int, str]]] = {}
    for row in rows:
        out.setdefault(row["team"], []).append((row["upstream_id"], row["cost"], row["state"]))
    return out


def billed(cluster: Cluster, upstream_ids: list[str | None]) -> Decimal:
    bills = cluster.emulator.bills
    return sum((bills[i].cost for i in upstream_ids if i is not None and i in bills), Decimal(0))


async def round_robin(
    session: aiohttp.ClientSession, cluster: Cluster, team: str, count: int
) -> list[int]:
    statuses = []
    for index in range(count):
        gateway = cluster.gateways[index % len(cluster.gateways)]
        statuses.append(await chat(session, gateway, team, stream=index % 2 == 0))
    await settle_all(cluster.gateways)
    return statuses


async def check_spend(
    session: aiohttp.ClientSession, cluster: Cluster, dsn: str, team: str
) -> Decimal:
    """/v1/key on every replica == Σ ledger == Σ upstream bills (micro-credit exact)."""
    records = (await ledger_by_team(dsn))[team]
    assert {state for _, _, state in records} == {"settled"}
    ledger_total = Decimal(sum(cost for _, cost, _ in records)) / MICRO_PER_CREDIT
    assert ledger_total == billed(cluster, [upstream_id for upstream_id, _, _ in records])
    for gateway in cluster.gateways:
        assert await month_spent(session, gateway, team) == ledger_total
    return ledger_total


async def test_flushall_and_an_empty_restart_lose_no_spend(
    cluster: tuple[Cluster, str], own_redis: RedisProcess
) -> None:
    made, dsn = cluster
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        async with aiohttp.ClientSession() as session:
            assert set(await round_robin(session, made, "search", 12)) == {200}
            before = await check_spend(session, made, dsn, "search")
            assert before > 0

            await client.flushall()
            # The spend is still there (rebuilt from the ledger before anything is answered)…
            assert await month_spent(session, made.gateways[1], "search") == before
            # …and traffic goes on, counted on top of it.
            assert set(await round_robin(session, made, "search", 9)) == {200}
            after_flush = await check_spend(session, made, dsn, "search")
            assert after_flush > before

            # A restart without persistence: the same, through a new empty server.
            await client.aclose()
            own_redis.kill()
            own_redis.start()
            client = aioredis.Redis.from_url(own_redis.url)
            # Each replica's pooled connections broke with the server: one call each may fail
            # (503, nothing sent) before it reconnects and waits for the rebuild.
            for gateway in made.gateways:
                assert await chat(session, gateway, "search") in (200, 503)
            assert set(await round_robin(session, made, "search", 6)) == {200}
            after_restart = await check_spend(session, made, dsn, "search")
            assert after_restart > after_flush
    finally:
        await client.aclose()
    rebuilds = sum(
        gateway.running.app[QUOTAS].store.rebuilds  # type: ignore[attr-defined]
        for gateway in made.gateways
    )
    # Counters are rebuilt per team, by one replica each time (the others wait for the team's
    # epoch): both teams at the first start on an empty Redis, then "search" (the only team
    # used since) after the flush and after the restart.
    assert rebuilds == 4


async def test_no_overspend_after_a_flush_mid_month(
    cluster: tuple[Cluster, str], own_redis: RedisProcess
) -> None:
    made, dsn = cluster
    budget = Decimal("0.5")  # a reservation is ~0.051 credits here, a request costs ~0.035
    async with aiohttp.ClientSession() as session:
        statuses = await round_robin(session, made, "research", 3)
        assert set(statuses) == {200}
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        # Three waves of 20 at once across the three replicas, against what is left of the
        # budget (had the flush zeroed the spend, the waves would spend it again).
        replies: list[int] = []
        for _ in range(3):
            replies += await asyncio.gather(
                *(chat(session, made.gateways[i % 3], "research") for i in range(20))
            )
            await settle_all(made.gateways)
        assert 402 in replies
        assert 200 in replies
        spent = await check_spend(session, made, dsn, "research")
    assert spent <= budget


async def test_unsafe_redis_settings_warn_in_readyz_and_metrics(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with redis_process("--maxmemory-policy", "allkeys-lru") as server:
        dsn = await fresh_postgres_schema(postgres_dsn)
        monkeypatch.setenv("CLIPIA_WARN_REDIS", server.url)
        monkeypatch.setenv("CLIPIA_WARN_DSN", dsn)
        made = await start_cluster(
            1,
            teams=TEAMS,
            store="{backend: redis, redis_url_env: CLIPIA_WARN_REDIS}\n"
            "ledger: {backend: postgres, postgres_dsn_env: CLIPIA_WARN_DSN}",
        )
        try:
            gateway = made.gateways[0]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{gateway.admin_url}/readyz") as reply:
                    assert reply.status == 200
                    body = await reply.json()
                async with session.get(f"{gateway.admin_url}/metrics") as reply:
                    metrics = await reply.text()
        finally:
            await made.stop()
    assert body["warnings"] == [
        "redis maxmemory-policy is allkeys-lru: counters can be evicted (use noeviction)",
        "redis persistence is off: a restart empties the counters (they are rebuilt from the "
        "ledger, admissions wait meanwhile)",
    ]
    assert "clipia_proxy_store_unsafe_settings 2.0" in metrics


async def test_redis_memory_is_flat_with_traffic(postgres_dsn: str) -> None:
    """Redis memory after 11x the requests is within a few hundred KiB (512).

    Scaled for CI: 500 then 5,000 more reserve+settle pairs straight on the store (not 1k and
    50k over HTTP). The 60-second RPM log is the only per-request state and ages out within a
    minute; a run this short keeps all of it, so its keys are measured apart.
    """
    from clipia_proxy.config import StoreConfig
    from clipia_proxy.ledgers.postgres import PostgresLedger
    from clipia_proxy.quotas.model import Micro, Period, ReserveRequest, Settlement, TeamLimits

    with redis_process() as server:
        dsn = await fresh_postgres_schema(postgres_dsn)
        store = RedisStore.from_config(
            StoreConfig(
                backend="redis", redis_key_prefix="flat", timeout_seconds=30
            ),  # memory, not speed
            PostgresLedger(dsn),
            url=server.url,
        )
        await store.start()
        client = aioredis.Redis.from_url(server.url)
        limits = TeamLimits(budgets={Period.MONTH: Micro(10**15)}, rpm=10**9, concurrency=64)

        async def traffic(count: int, offset: int) -> None:
            async def one(i: int) -> None:
                rid = f"r{offset + i}"
                request = ReserveRequest(
                    request_id=rid,
                    team=f"team-{i % 5}",
                    amount=Micro(5000),
                    tokens=100,
                    periods={Period.MONTH: "month:2026-12", Period.TOTAL: "total"},
                    now=time.time(),
                    lease_seconds=600,
                    limits=limits,
                )
                assert (await decided(store, request)).admitted
                await store.settle(rid, Settlement(cost=Micro(1234), prompt_tokens=10))

            for start in range(0, count, 50):
                await asyncio.gather(*(one(start + i) for i in range(min(50, count - start))))

        async def used() -> int:
            # Not the gateway's state, and bounded whatever the traffic: the connections
            # (~17 KB each in Redis, as many as calls were in flight at once: 51 before the
            # scripts were batched, and a loaded machine reached that peak in one phase only,
            # +0.7 MB), and the slow log (128 commands at most, ~75 KB when all are logged).
            await client.slowlog_reset()
            memory = await client.info("memory")
            total = int(memory["used_memory"]) - int(memory["mem_clients_normal"])
            window = 0
            for pattern in ("{flat:*}:win", "{flat:*}:wtok"):
                async for key in client.scan_iter(match=pattern):
                    window += int(await client.memory_usage(key, samples=0) or 0)  # exact
            return total - window

        try:
            await traffic(500, 0)
            first = await used()
            await traffic(5000, 500)
            second = await used()
            keys = await client.dbsize()
        finally:
            await client.aclose()
            await store.close()
    # Per team (5): epoch, sequence, slots, the 60-second log (3 keys), reserved and spent of
    # two windows. No record keys.
    assert keys <= 5 * 10, keys
    # Per-request records would add ~2.5 KB each (12 MB here); allocator and buffer noise
    # stays within a few hundred KiB.
    assert abs(second - first) < 512 * 1024, (first, second)

"""Redis counters on a real redis-server: declared keys (Cluster), and a lagging replica.

Every script call declares in KEYS each key its Lua commands touch, and those keys share one
hash tag (one Redis Cluster slot): checked on the server's own MONITOR stream while the store
does everything it can do (reserve with a key's own limits, confirm, settle, void, renew,
release a slot, usage, correct, rebuild after a flush, rebuild after falling behind).

A failover to a replica that lagged (it still holds the epoch key, but not the last writes) is
caught: a real replica is promoted (``REPLICAOF NO ONE``) while the old primary takes more
traffic, then the store talks to the promoted one. Its counters are behind the PostgreSQL
ledger; the store rebuilds them before admitting, so the team cannot spend past its budget.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from clipia_proxy.config import StoreConfig
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.quotas import redis as redis_store
from clipia_proxy.quotas.model import KeyLimits, Micro, Period, Reason, TeamLimits
from clipia_proxy.quotas.redis import RedisStore
from tests.conftest import fresh_postgres_schema
from tests.harness import BOUND, STORE_TIMEOUT, Clock, decided
from tests.test_redis_rebuild import redis_process
from tests.test_store_contract import DAY, MONTH, T0, TEAM, Harness, settlement


def _slot(key: str) -> int:
    """The Redis Cluster slot of a key (CRC16/XMODEM of its hash tag, mod 16384)."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key.encode(), 0) % 16384


class Monitor:
    """The server's MONITOR stream, read in the background until stopped."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.lines: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._marks: dict[str, asyncio.Event] = {
            "monitor-started": asyncio.Event(),
            "monitor-stopped": asyncio.Event(),
        }

    async def __aenter__(self) -> Monitor:
        self._task = asyncio.get_running_loop().create_task(self._read())
        async with asyncio.timeout(BOUND):
            while not self._marks["monitor-started"].is_set():
                await self.client.echo("monitor-started")  # seen once MONITOR is on
                await asyncio.wait({self._task}, timeout=0.05)
        return self

    async def _read(self) -> None:
        async with self.client.monitor() as monitor:
            while True:
                line = await monitor.next_command()
                self.lines.append(line)
                for mark, seen in self._marks.items():
                    if mark in line["command"]:
                        seen.set()

    async def stop(self) -> list[Any]:
        await self.client.echo("monitor-stopped")
        async with asyncio.timeout(BOUND):
            await self._marks["monitor-stopped"].wait()
        return self.lines

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        await self.client.aclose()


async def _touched(client: aioredis.Redis, command: str) -> list[str]:
    """The keys a command touches, as the server itself says (COMMAND GETKEYS)."""
    words = command.split(" ")
    try:
        keys = await client.command_getkeys(*words)
    except aioredis.ResponseError:  # a command without keys (TIME)
        return []
    return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


@pytest.fixture
async def store(redis_url: str, postgres_dsn: str) -> AsyncIterator[RedisStore]:
    dsn = await fresh_postgres_schema(postgres_dsn)
    made = RedisStore.from_config(
        StoreConfig(backend="redis", redis_key_prefix="declared", timeout_seconds=STORE_TIMEOUT),
        PostgresLedger(dsn),
        url=redis_url,
    )
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def test_every_script_call_declares_the_keys_it_touches_in_one_slot(
    store: RedisStore, redis_url: str
) -> None:
    h = Harness("redis", store, Clock(T0), Path(os.devnull), "declared")
    limits = TeamLimits(budgets={Period.DAY: Micro(10**9), Period.MONTH: Micro(10**9)}, rpm=1000)
    own = KeyLimits(rpm=100, concurrency=5)
    client = aioredis.Redis.from_url(redis_url)
    async with Monitor(redis_url) as monitor:
        # Everything the store does with scripts, one call after another.
        admitted = await decided(store, h.request("a", limits=limits, key_id="k1", key_limits=own))
        assert admitted.admitted
        assert (await decided(store, h.request("b", limits=limits, team="other"))).admitted
        await store.renew("a", h.now, 60)
        await store.release_slot("a")
        assert await store.settle("a", settlement(700, prompt_tokens=3, completion_tokens=4))
        assert not await store.settle("a", settlement(700))  # already settled: no-op
        await store.correct("a", settlement(650))
        await store.usage(TEAM, [DAY, MONTH], h.now)
        await store.rates("other", h.now)
        # A replay of a settled request: admitted as a replay, its new hold voided.
        assert (await decided(store, h.request("a", limits=limits, key_id="k1"))).replayed
        # The team's counters lost (a flush of its keys): rebuilt on the next call.
        names = [name async for name in client.scan_iter(match="*declared*" + TEAM + "*")]
        if names:
            await client.delete(*names)
        assert (await decided(store, h.request("c", limits=limits, key_id="k1"))).admitted
        # The counters went back in time (the sequence): the ledger catches it, rebuilt.
        await client.set("{declared:" + TEAM + "}:seq", 1)
        assert (await decided(store, h.request("d", limits=limits, key_id="k1"))).admitted
        await store.settle("b", settlement(5))
        lines = await monitor.stop()
    try:
        # MONITOR shows a script call, then the commands its Lua ran (client type "lua").
        scripts: list[tuple[list[str], list[str]]] = []  # (declared, touched) per call
        current: list[str] | None = None
        for line in lines:
            words = line["command"].split(" ")
            if line["client_type"] == "lua":
                assert current is not None, line
                current.extend(await _touched(client, line["command"]))
            elif words[0].upper() in ("EVALSHA", "EVAL"):
                current = []
                scripts.append((words[3 : 3 + int(words[2])], current))
            else:
                current = None
    finally:
        await client.aclose()
    assert len(scripts) >= 15, scripts  # every kind of call above ran a script
    assert sum(len(touched) for _, touched in scripts) > 100
    for declared, touched in scripts:
        assert set(touched) <= set(declared), (declared, sorted(set(touched) - set(declared)))
        assert len({_slot(key) for key in declared}) == 1, declared
    assert store.rebuilds >= 4  # two teams at first use, the flush, the sequence


async def test_a_failover_to_a_lagging_replica_is_caught_before_anything_is_admitted(
    postgres_dsn: str,
) -> None:
    budget = Micro(100_000)
    limits = TeamLimits(budgets={Period.MONTH: budget})
    periods = {Period.MONTH: MONTH}
    dsn = await fresh_postgres_schema(postgres_dsn)
    with redis_process() as primary, redis_process() as replica:
        store = RedisStore.from_config(
            StoreConfig(backend="redis", redis_key_prefix="lag", timeout_seconds=STORE_TIMEOUT),
            PostgresLedger(dsn),
            url=primary.url,
        )
        await store.start()
        promoted: RedisStore | None = None
        h = Harness("redis", store, Clock(T0), Path(os.devnull), "lag")
        client = aioredis.Redis.from_url(replica.url)
        try:

            async def spend(on: RedisStore, rid: str, cost: int) -> None:
                request = h.request(rid, amount=20_000, limits=limits, periods=periods)
                assert (await decided(on, request)).admitted
                assert await on.settle(rid, settlement(cost))

            await spend(store, "early", 20_000)
            # A real replica of the primary, in sync, then cut off (as a lagging replica is
            # when the primary dies): it holds the epoch key and the spend so far.
            await client.replicaof("127.0.0.1", primary.port)
            source = aioredis.Redis.from_url(primary.url)
            try:
                async with asyncio.timeout(BOUND):
                    while True:
                        info = await client.info("replication")
                        offset = (await source.info("replication"))["master_repl_offset"]
                        if (
                            info.get("master_link_status") == "up"
                            and info.get("slave_repl_offset") == offset
                        ):
                            break
                        await asyncio.sleep(0.05)
            finally:
                await source.aclose()
            await client.replicaof("NO", "ONE")
            # The primary takes more traffic the replica never sees: 60,000 more spent.
            for i in range(3):
                await spend(store, f"late-{i}", 20_000)
            # Failover: the store now talks to the promoted replica (epoch present).
            promoted = RedisStore.from_config(
                StoreConfig(backend="redis", redis_key_prefix="lag", timeout_seconds=STORE_TIMEOUT),
                PostgresLedger(dsn),
                url=replica.url,
            )
            await promoted.start()
            # 80,000 of 100,000 are spent; the replica's counters say 20,000. A reservation
            # of 30,000 must be refused (admitted on the stale counters, it overspends).
            big = h.request("big", amount=30_000, limits=limits, periods=periods)
            refused = await decided(promoted, big)
            assert (refused.admitted, refused.reason) == (False, Reason.BUDGET)
            usage = (await promoted.usage(TEAM, [MONTH], time.time()))[MONTH]
            assert (usage.spent, usage.reserved) == (80_000, 0)
            assert promoted.rebuilds == 1
            # What is left is still admitted, exactly.
            rest = h.request("rest", amount=20_000, limits=limits, periods=periods)
            assert (await decided(promoted, rest)).admitted
        finally:
            await client.aclose()
            await store.close()
            if promoted is not None:
                await promoted.close()


async def test_script_calls_hold_a_bounded_number_of_connections(
    redis_url: str, postgres_dsn: str
) -> None:
    """While Redis is slow, calls queue for the next pipeline instead of opening connections.

    Redis runs one command at a time: more pipelines in flight add connections (one each,
    towards the server's ``maxclients`` and the gateway's descriptors), not throughput.
    """
    dsn = await fresh_postgres_schema(postgres_dsn)
    client = aioredis.Redis.from_url(
        redis_url, client_name="bounded-pipes", driver_info=redis_store._DRIVER_INFO
    )
    store = RedisStore(client, PostgresLedger(dsn), prefix="bounded")
    admin = aioredis.Redis.from_url(redis_url)
    await store.start()
    try:
        h = Harness("redis", store, Clock(T0), Path(os.devnull), "bounded")
        assert (await decided(store, h.request("warm"))).admitted  # the team's counters exist
        await admin.client_pause(300)  # every client's commands wait 0.3 s
        calls = []
        for _ in range(40):  # one call per event-loop turn: each would be a pipeline of its own
            calls.append(
                asyncio.get_running_loop().create_task(store.usage(TEAM, [DAY, MONTH], h.now))
            )
            await asyncio.sleep(0)
        async with asyncio.timeout(BOUND):
            await asyncio.gather(*calls)
        mine = [c for c in await admin.client_list() if c.get("name") == "bounded-pipes"]
        assert 1 <= len(mine) <= redis_store._PIPELINES
    finally:
        await admin.aclose()
        await store.close()

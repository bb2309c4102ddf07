"""The PostgreSQL ledger on a real server: migrations, partitions, the gateway over it, the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from clipia_proxy import cli
from clipia_proxy.ledgers.postgres import MIGRATIONS, PostgresLedger
from clipia_proxy.quotas.model import Micro, Period, Settlement
from clipia_proxy.quotas.store import Inserted, LedgerRecord, StoreUnavailable
from tests.conftest import Stack, fresh_postgres_schema, wait_settled

Factory = Callable[..., Awaitable[Stack]]
ENV = "CLIPIA_TEST_LEDGER_DSN"
TEAMS = """
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    budget: {{month: 50, total: 100}}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""
BODY = {"model": "gpt-5.5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def dsn(postgres_dsn: str) -> str:
    return await fresh_postgres_schema(postgres_dsn)


def record(request_id: str, created_at: float, team: str = "search") -> LedgerRecord:
    return LedgerRecord(
        request_id=request_id,
        team=team,
        model="gpt-5.5",
        reserved=1000,
        windows={Period.MONTH: "month:2026-11", Period.TOTAL: "total"},
        created_at=created_at,
        lease_until=created_at + 600,
    )


async def test_migrations_apply_once_under_concurrent_starts(dsn: str) -> None:
    ledgers = [PostgresLedger(dsn) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(ledger.migrate() for ledger in ledgers))
        assert sorted(v for versions in applied for v in versions) == [
            version for version, _ in MIGRATIONS
        ]
        assert await ledgers[0].migrate() == []
    finally:
        for ledger in ledgers:
            await ledger.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM clipia_schema_migrations")
        assert [r[0] for r in rows] == [version for version, _ in MIGRATIONS]
        now = dt.datetime.now(dt.UTC)
        name = f"clipia_ledger_y{now.year:04d}m{now.month:02d}"
        assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
    finally:
        await conn.close()


async def test_records_land_in_their_month_partition_and_settle_once(dsn: str) -> None:
    ledger = PostgresLedger(dsn)
    await ledger.start()
    try:
        now = dt.datetime.now(dt.UTC).timestamp()
        assert await ledger.insert(record("r1", now))
        assert not await ledger.insert(record("r1", now + 5))  # the same id: a replay
        settlement = Settlement(cost=Micro(700), prompt_tokens=3, completion_tokens=4, now=now)
        settled = await ledger.settle("r1", settlement)
        assert settled is not None
        assert settled.cost == 700
        assert await ledger.settle("r1", settlement) is None
        # Windows from November on (the record's month window is a fixed November key).
        november = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()
        spent = {(s.team, s.window): s.spent for s in await ledger.spent(since=november)}
        assert spent == {("search", "month:2026-11"): 700, ("search", "total"): 700}
    finally:
        await ledger.close()
    conn = await asyncpg.connect(dsn)
    try:
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        partition = f"clipia_ledger_y{when.year:04d}m{when.month:02d}"
        rows = await conn.fetch(
            "SELECT tableoid::regclass::text AS part FROM clipia_ledger WHERE request_id = 'r1'"
        )
        assert [r["part"].split(".")[-1] for r in rows] == [partition]
    finally:
        await conn.close()


async def test_prune_drops_whole_months_before_the_cut(dsn: str) -> None:
    ledger = PostgresLedger(dsn)
    await ledger.start()
    try:
        now = dt.datetime.now(dt.UTC)
        this_month = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC).timestamp()
        old = this_month - 80 * 86400  # two or three months back: the default partition
        await ledger.insert(record("old", old))
        await ledger.insert(record("new", this_month + 60))
        assert await ledger.prune(before=this_month) == 1
        assert await ledger.record("old") is None
        assert await ledger.record("new") is not None
    finally:
        await ledger.close()


async def _daily(dsn: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT day, team, environment, model, key_id, requests, prompt_tokens, "
            "completion_tokens, cost FROM clipia_ledger_daily ORDER BY 1, 2, 3, 4, 5"
        )
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


async def test_migrations_sum_an_older_ledger_into_the_rollup_and_spent_once(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:  # a ledger at version 2, with two settled records and an open one
        await conn.execute(
            "CREATE TABLE clipia_schema_migrations (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO clipia_schema_migrations VALUES ($1)", version)
        for name, state, cost in (("a", "settled", 5), ("b", "settled", 7), ("c", "dispatched", 0)):
            await conn.execute(
                "INSERT INTO clipia_ledger (request_id, team, model, stream, reserved, "
                "tokens_reserved, windows, created_at, lease_until, state, cost) VALUES "
                """($1, 'search', 'm', false, 5, 10, '{"day": "day:2026-11-20"}', 1.0, 2.0, """
                "$2, $3)",
                name,
                state,
                cost,
            )
    finally:
        await conn.close()
    ledger = PostgresLedger(dsn)
    try:
        assert await ledger.migrate() == [v for v, _ in MIGRATIONS[2:]]
        assert await ledger.migrate() == []
        spent = await ledger.spent(since=dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp())
    finally:
        await ledger.close()
    assert await _daily(dsn) == [("2026-11-20", "search", "live", "m", "", 2, 0, 0, 12)]
    assert [(s.team, s.window, s.spent) for s in spent] == [("search", "day:2026-11-20", 12)]


async def test_concurrent_settlements_of_one_rollup_row_all_count(dsn: str) -> None:
    """Concurrent settlements of one rollup row all count, and batches cannot deadlock.

    Many connections settle records of one day, team, model and key at once, singly and in
    batches whose rows come in opposite orders.
    """
    ledger = PostgresLedger(dsn, pool_size=8)
    await ledger.start()
    now = dt.datetime.now(dt.UTC).timestamp()
    try:
        names = [f"r{i}" for i in range(60)]
        for name in names:
            assert await ledger.insert(record(name, now))
        await asyncio.gather(
            *(ledger.settle(name, Settlement(cost=Micro(10), now=now)) for name in names[:40])
        )
        rows = {name: record(name, now, team="research") for name in ("x1", "x2", "y1", "y2")}
        for name, made in rows.items():
            made.model = name[0]  # two rollup rows: x and y
            assert await ledger.insert(made)
    finally:
        await ledger.close()

    async def batch(ids: list[str]) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(2):  # the first settles; the second (already settled) changes nothing
                await conn.execute(
                    "UPDATE clipia_ledger SET state = 'settled', cost = cost + 1 "
                    "WHERE request_id = ANY($1) AND state = 'dispatched'",
                    ids,
                )
        finally:
            await conn.close()

    await asyncio.gather(
        batch(names[40:50]), batch(names[50:]), batch(["x1", "y1"]), batch(["y2", "x2"])
    )
    day = {row[1:4]: row[5:] for row in await _daily(dsn)}
    assert day[("search", "live", "gpt-5.5")] == (60, 0, 0, 40 * 10 + 20)
    assert day[("research", "live", "x")] == (2, 0, 0, 2)
    assert day[("research", "live", "y")] == (2, 0, 0, 2)


async def test_pruning_old_months_keeps_the_total_budget_spent(dsn: str) -> None:
    """What pruned months spent stays in the spent summary (a total budget must not reopen)."""
    ledger = PostgresLedger(dsn)
    await ledger.start()
    try:
        now = dt.datetime.now(dt.UTC)
        this_month = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC).timestamp()
        old, new = this_month - 80 * 86400, now.timestamp()
        for name, created, cost in (("old", old, 700), ("new", new, 300)):
            assert await ledger.insert(record(name, created))
            assert await ledger.settle(name, Settlement(cost=Micro(cost), now=0.0))
        since = this_month - 100 * 86400
        before = {(s.team, s.window): s.spent for s in await ledger.spent(since=since)}
        assert before[("search", "total")] == 1000
        assert await ledger.prune(before=this_month) == 1
        after = {(s.team, s.window): s.spent for s in await ledger.spent(since=since)}
        assert after == before
    finally:
        await ledger.close()


async def test_unreachable_server_never_shows_the_password(unused_tcp_port: int) -> None:
    ledger = PostgresLedger(
        f"postgresql://clipia:s3cret-pw@127.0.0.1:{unused_tcp_port}/db", timeout=0.5
    )
    with pytest.raises(StoreUnavailable) as info:
        await ledger.start()
    assert "s3cret-pw" not in str(info.value)


async def post(stack: Stack, session: aiohttp.ClientSession, *, stream: bool = False) -> int:
    async with session.post(
        f"{stack.base_url}/chat/completions",
        headers=stack.auth("search"),
        json={**BODY, "stream": stream},
    ) as reply:
        await reply.read()
        return reply.status


async def test_gateway_over_the_postgres_ledger_survives_a_restart(
    stacks: Factory, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, dsn)
    extra = f"ledger: {{backend: postgres, postgres_dsn_env: {ENV}, pool_size: 2}}"
    first = await stacks(teams=TEAMS, store="{backend: sqlite}", extra=extra)
    async with aiohttp.ClientSession() as session:
        assert await post(first, session) == 200
        assert await post(first, session, stream=True) == 200
        await wait_settled(first)
    billed = sum(bill.cost for bill in first.emulator.bills.values())
    assert billed > 0
    await first.running.stop()
    # A new process over the same ledger: the counters come back from PostgreSQL.
    second = await stacks(teams=TEAMS, store="{backend: sqlite}", extra=extra)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{second.base_url}/key", headers=second.auth("search")) as reply,
    ):
        data = (await reply.json())["data"]
    budgets = {b["period"]: b for b in data["budgets"]}
    assert Decimal(str(budgets["month"]["spent"])) == billed
    assert Decimal(str(data["usage"])) == billed
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT state, cost FROM clipia_ledger")
    finally:
        await conn.close()
    assert [r["state"] for r in rows] == ["settled", "settled"]
    assert Decimal(sum(r["cost"] for r in rows)) / 1_000_000 == billed


def test_migrate_command(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ENV, dsn)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"ledger: {{backend: postgres, postgres_dsn_env: {ENV}}}\nupstream: {{api_key_env: null, "
        "api_key_file: null}\n"
    )
    assert cli.main(["migrate", "--config", str(path)]) == 0
    assert "applied schema version(s) 1" in capsys.readouterr().out
    assert cli.main(["migrate", "--config", str(path)]) == 0
    assert "the schema is up to date" in capsys.readouterr().out


async def test_the_per_request_insert_is_planned_once_per_session_on_the_indexes(dsn: str) -> None:
    """Migration 6: the insert a request waits for runs in a function with one generic plan.

    Planned per call, its replay and sequence checks over every month partition cost more
    than the insert (0.5-1 ms); one generic plan must also stay on the indexes although it is
    made at start, over empty partitions (a sequential scan there would grow with the month).
    """
    ledger = PostgresLedger(dsn)
    try:
        await ledger.start()
        conn = await asyncpg.connect(dsn)
        try:
            settings = await conn.fetchval(
                "SELECT proconfig FROM pg_proc WHERE proname = 'clipia_ledger_insert'"
            )
        finally:
            await conn.close()
        assert sorted(settings) == ["enable_seqscan=off", "plan_cache_mode=force_generic_plan"]
        now = dt.datetime.now(dt.UTC).timestamp()
        assert await ledger.insert_counted(record("a", now), 1) is Inserted.INSERTED
        assert await ledger.insert_counted(record("a", now + 1), 2) is Inserted.EXISTS
        assert await ledger.insert_counted(record("b", now), 1) is Inserted.BEHIND
        assert await ledger.insert_counted(record("b", now), 3) is Inserted.INSERTED
    finally:
        await ledger.close()


async def test_writes_keep_their_connection_and_give_it_back_when_quiet(dsn: str) -> None:
    """Group-committed writes keep a pool connection between statements, never the last one.

    Taking a connection from asyncpg's pool per statement costs ~90 µs of CPU; kept, it is
    given back after a quiet moment and at close (``pool.close()`` would wait forever for a
    connection kept idle), and one the server closed is never used again.
    """
    ledger = PostgresLedger(dsn, pool_size=2)
    await ledger.start()
    try:
        pool = ledger._pool
        assert pool is not None
        now = dt.datetime.now(dt.UTC).timestamp()
        assert await ledger.insert_counted(record("k1", now), 1) is Inserted.INSERTED
        assert pool.get_size() - pool.get_idle_size() == 1  # the write's connection, kept
        # The other queries still get a connection (pool_size 2: one is never kept).
        assert (await ledger.record("k1")) is not None
        # The server closes every connection (a restart): the kept one is not used again.
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        finally:
            await conn.close()
        await asyncio.sleep(0.3)  # the client reads the end (less than the quiet second)
        assert await ledger.insert_counted(record("k2", now), 2) is Inserted.INSERTED
        assert await ledger.settle("k2", Settlement(cost=Micro(5), now=now)) is not None
        # Kept, then given back after a quiet second.
        assert await ledger.insert_counted(record("k3", now), 3) is Inserted.INSERTED
        assert pool.get_size() - pool.get_idle_size() == 1
        async with asyncio.timeout(10):
            while pool.get_size() - pool.get_idle_size():  # noqa: ASYNC110 - pool state
                await asyncio.sleep(0.05)
        assert await ledger.insert_counted(record("k4", now), 4) is Inserted.INSERTED
    finally:
        async with asyncio.timeout(10):
            await ledger.close()  # does not wait on a kept connection


async def test_a_one_connection_pool_keeps_nothing(dsn: str) -> None:
    ledger = PostgresLedger(dsn, pool_size=1)
    await ledger.start()
    try:
        now = dt.datetime.now(dt.UTC).timestamp()
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(ledger.insert_counted(record(f"o{i}", now), i + 1) for i in range(20)),
                *(ledger.record(f"o{i}") for i in range(20)),
            )
        assert results[:20] == [Inserted.INSERTED] * 20
        pool = ledger._pool
        assert pool is not None
        assert pool.get_idle_size() == pool.get_size() == 1
    finally:
        await ledger.close()


async def test_gateway_writes_go_on_after_postgresql_drops_every_connection(
    stacks: Factory, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart or failover of PostgreSQL closes every connection the gateway holds.

    The connections the writes keep between requests are among them: none is used again,
    so the next requests are recorded and served, and every record is settled once.
    """
    monkeypatch.setenv(ENV, dsn)
    extra = f"ledger: {{backend: postgres, postgres_dsn_env: {ENV}, pool_size: 3}}"
    stack = await stacks(teams=TEAMS, store="{backend: memory}", extra=extra)
    conn = await asyncpg.connect(dsn)
    try:
        async with aiohttp.ClientSession() as session:
            assert [await post(stack, session, stream=s) for s in (False, True, False)] == [200] * 3
            dropped = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
            assert dropped >= 1
            await asyncio.sleep(0.5)  # the gateway's event loop reads each connection's end
            assert [await post(stack, session, stream=s) for s in (False, True, False)] == [200] * 3
            await wait_settled(stack)
        rows = await conn.fetch("SELECT state, cost FROM clipia_ledger")
    finally:
        await conn.close()
    assert [r["state"] for r in rows] == ["settled"] * 6
    billed = sum(bill.cost for bill in stack.emulator.bills.values())
    assert Decimal(sum(r["cost"] for r in rows)) / 1_000_000 == billed

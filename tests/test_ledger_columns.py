"""The attribution columns (environment, tags, end user) in both ledgers, old files included.

A SQLite ledger written before the columns existed gets them at start-up; a PostgreSQL ledger
at schema version 1 gets them from migration 2. Old records read as live, untagged, no user.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import asyncpg

from clipia_proxy.ledgers.postgres import MIGRATIONS, PostgresLedger
from clipia_proxy.ledgers.sqlite import SqliteLedger
from clipia_proxy.quotas.model import Micro, Period, ReserveRequest, Settlement, TeamLimits
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import LedgerRecord
from tests.conftest import fresh_postgres_schema
from tests.harness import decided

V1_SQLITE = """
CREATE TABLE ledger (
    request_id TEXT PRIMARY KEY, team TEXT NOT NULL, key_id TEXT, model TEXT NOT NULL,
    stream INTEGER NOT NULL, reserved INTEGER NOT NULL, tokens_reserved INTEGER NOT NULL,
    windows TEXT NOT NULL, created_at REAL NOT NULL, lease_until REAL NOT NULL,
    state TEXT NOT NULL, upstream_id TEXT, cost INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    usage_source TEXT, outcome TEXT, settled_at REAL
);
INSERT INTO ledger VALUES ('old-1', 'search', 'k', 'gpt-5.5', 0, 5, 10, '{"total":"total"}',
    1.0, 2.0, 'settled', NULL, 5, 1, 1, 'response', 'completed', 1.5);
"""


def reserve(request_id: str, now: float) -> ReserveRequest:
    return ReserveRequest(
        request_id=request_id,
        team="ci",
        amount=Micro(100),
        tokens=10,
        periods={Period.TOTAL: "total"},
        now=now,
        lease_seconds=600,
        limits=TeamLimits(),
        model="gpt-5.5",
        key_id="ci-key",
        environment="test",
        tags={"service": "indexer"},
        end_user="h:abc",
    )


async def report_lines(
    ledger: PostgresLedger | SqliteLedger,
    now: float,
    by: tuple[str, ...] = ("environment", "tag:service", "user"),
) -> list[tuple[tuple[str, ...], int, int]]:
    lines = ledger.report(since=now - 1, until=now + 1, by=by, team=None)
    return sorted([(line.group, line.requests, line.cost) async for line in lines])


async def test_an_old_sqlite_ledger_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SQLITE)
    db.close()
    now = time.time()
    store = SqliteStore(path, clock=lambda: now)
    await store.start()
    try:
        (old,) = await store.records(since=0.0, until=10.0)
        assert (old.environment, old.tags, old.end_user) == ("live", {}, None)
        assert (await decided(store, reserve("new-1", now))).admitted
        new = await store.record("new-1")
        assert new is not None
        assert (new.environment, new.tags, new.end_user) == (
            "test",
            {"service": "indexer"},
            "h:abc",
        )
    finally:
        await store.close()
    # The CLI's ledger over the same file: the columns persisted, and report groups on them.
    ledger = SqliteLedger(path)
    await ledger.start()
    try:
        again = await ledger.record("new-1")
        assert again is not None
        assert again.tags == {"service": "indexer"}
        assert await ledger.settle("new-1", Settlement(cost=Micro(7), now=now)) is not None
        assert await report_lines(ledger, now) == [(("test", "indexer", "h:abc"), 1, 7)]
        assert await report_lines(ledger, now, ("tag",)) == [(("service=indexer",), 1, 7)]
    finally:
        await ledger.close()


async def test_postgres_migration_2_adds_the_columns(postgres_dsn: str) -> None:
    dsn = await fresh_postgres_schema(postgres_dsn)
    conn = await asyncpg.connect(dsn)
    try:  # a ledger at version 1, with one record
        await conn.execute(
            "CREATE TABLE clipia_schema_migrations (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(MIGRATIONS[0][1])
        await conn.execute("INSERT INTO clipia_schema_migrations (version) VALUES (1)")
        await conn.execute(
            "INSERT INTO clipia_ledger (request_id, team, model, stream, reserved, "
            "tokens_reserved, windows, created_at, lease_until, state) VALUES "
            "('old-1', 'search', 'gpt-5.5', false, 5, 10, '{}', 1.0, 2.0, 'dispatched')"
        )
    finally:
        await conn.close()
    ledger = PostgresLedger(dsn)
    try:
        assert await ledger.migrate() == [v for v, _ in MIGRATIONS[1:]]
        old = await ledger.record("old-1")
        assert old is not None
        assert (old.environment, old.tags, old.end_user) == ("live", {}, None)
        now = time.time()
        record = LedgerRecord(
            request_id="new-1",
            team="ci",
            model="gpt-5.5",
            created_at=now,
            lease_until=now + 600,
            environment="test",
            tags={"service": "indexer", "ticket": "T-1"},
            end_user="h:abc",
        )
        assert await ledger.insert(record)
        got = await ledger.record("new-1")
        assert got is not None
        assert (got.environment, got.tags, got.end_user) == (
            "test",
            {"service": "indexer", "ticket": "T-1"},
            "h:abc",
        )
        assert await ledger.settle("new-1", Settlement(cost=Micro(7), now=now)) is not None
        assert await report_lines(ledger, now) == [(("test", "indexer", "h:abc"), 1, 7)]
        # --by tag: one line per name=value (a record with two tags is in two lines).
        assert await report_lines(ledger, now, ("team", "tag")) == [
            (("ci", "service=indexer"), 1, 7),
            (("ci", "ticket=T-1"), 1, 7),
        ]
    finally:
        await ledger.close()

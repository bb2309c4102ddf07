"""SQLite start-up reads spent from a summary table, never by summing every record."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from clipia_proxy.ledgers.sqlite import SqliteLedger
from clipia_proxy.quotas.model import Micro, Period, ReserveRequest, Settlement, TeamLimits
from clipia_proxy.quotas.sqlite import SqliteStore
from tests.harness import decided

OLD_COLUMNS = (
    "request_id, team, key_id, model, stream, reserved, tokens_reserved, windows, created_at, "
    "lease_until, state, upstream_id, cost, prompt_tokens, completion_tokens, usage_source, "
    "outcome, settled_at"
)
"""The columns of a file from before the summary table (and before attribution columns)."""
NOW = time.time()
OLD = NOW - 200 * 86400  # months ago: only its total window can still be current
WINDOWS = {Period.DAY: "day:2020-01-01", Period.MONTH: "month:2020-01", Period.TOTAL: "total"}


def request(request_id: str, now: float) -> ReserveRequest:
    return ReserveRequest(
        request_id=request_id,
        team="t",
        amount=Micro(1000),
        tokens=10,
        periods=dict(WINDOWS),
        now=now,
        lease_seconds=600,
        limits=TeamLimits(),
    )


async def spent(path: Path, key: str) -> int:
    store = SqliteStore(path, clock=lambda: NOW)
    await store.start()
    try:
        return (await store.usage("t", [key], NOW))[key].spent
    finally:
        await store.close()


async def test_pruning_old_records_keeps_the_total_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = SqliteStore(path, clock=lambda: OLD)
    await store.start()
    await decided(store, request("old", OLD))
    await store.settle("old", Settlement(cost=Micro(700), now=OLD))
    await decided(store, request("new", NOW))
    await store.settle("new", Settlement(cost=Micro(300), now=NOW))
    await store.close()
    assert await spent(path, "total") == 1000
    ledger = SqliteLedger(path)
    await ledger.start()
    try:
        assert await ledger.prune(before=NOW - 86400) == 1
    finally:
        await ledger.close()
    # The records are gone; what the team spent is not (it was summed at settlement time).
    assert await spent(path, "total") == 1000


async def test_an_older_file_is_summed_into_the_summary_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(  # the ledger table as an earlier version wrote it, without the summary
        "CREATE TABLE ledger (request_id TEXT PRIMARY KEY, team TEXT NOT NULL, key_id TEXT, "
        "model TEXT NOT NULL, stream INTEGER NOT NULL, reserved INTEGER NOT NULL, "
        "tokens_reserved INTEGER NOT NULL, windows TEXT NOT NULL, created_at REAL NOT NULL, "
        "lease_until REAL NOT NULL, state TEXT NOT NULL, upstream_id TEXT, cost INTEGER NOT "
        "NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER "
        "NOT NULL DEFAULT 0, usage_source TEXT, outcome TEXT, settled_at REAL)"
    )
    windows = '{"day":"day:2020-01-01","total":"total"}'
    for index, (state, cost) in enumerate([("settled", 5), ("settled", 7), ("dispatched", 0)]):
        db.execute(
            f"INSERT INTO ledger ({OLD_COLUMNS}) VALUES "  # noqa: S608 - constant columns
            "(?, 't', NULL, 'm', 0, 100, 1, ?, ?, ?, ?, NULL, ?, 0, 0, NULL, NULL, NULL)",
            (f"r{index}", windows, NOW - 10, NOW + 600, state, cost),
        )
    db.close()
    assert await spent(path, "total") == 12
    rows = sqlite3.connect(path).execute("SELECT team, window, spent FROM ledger_spent").fetchall()
    assert sorted(rows) == [("t", "day:2020-01-01", 12), ("t", "total", 12)]
    assert await spent(path, "total") == 12  # summed once, not again at the next start
    daily = sqlite3.connect(path).execute("SELECT * FROM ledger_daily").fetchall()
    # The daily rollup too: its settled records, once (the third start added nothing).
    assert daily == [("2020-01-01", "t", "live", "m", "", 2, 0, 0, 12)]


async def test_the_gateway_store_keeps_the_daily_rollup_as_it_settles(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = SqliteStore(path, clock=lambda: NOW)
    await store.start()
    try:
        for index, cost in enumerate((300, 400)):
            await decided(store, request(f"r{index}", NOW))
            await store.settle(f"r{index}", Settlement(cost=Micro(cost), now=NOW))
        await decided(store, request("open", NOW))  # not settled: not in the rollup
        assert await store.correct("r0", Settlement(cost=Micro(250), now=NOW)) == -50
    finally:
        await store.close()
    daily = sqlite3.connect(path).execute("SELECT * FROM ledger_daily").fetchall()
    assert daily == [("2020-01-01", "t", "live", "other", "", 2, 0, 0, 650)]

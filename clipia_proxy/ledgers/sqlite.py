"""The ``sqlite`` ledger: the file ``store.sqlite_path``, read and pruned by the CLI.

The same table the ``sqlite`` counters write (:mod:`clipia_proxy.quotas.sqlite`, whose
group-commit worker serves requests); this class is the :class:`LedgerStore` over that file for
``report``, ``ledger export`` and ``ledger prune`` (and any one-replica use). Every call runs
on a worker thread (sqlite3 blocks); aggregates are SQL ``GROUP BY`` (over the daily rollup
when it holds the groupings: :mod:`clipia_proxy.quotas.ledger_sql`) and long results come in chunks,
never loaded whole. Prune deletes in batches (one short transaction each), so a
running gateway is never locked out for long.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from clipia_proxy.quotas.ledger_sql import (
    COLUMNS,
    SQLITE,
    ReportQuery,
    SqlReports,
    record_values,
    rollup_drop_empty,
    row_to_record,
)
from clipia_proxy.quotas.ledgered import CALENDAR_HORIZON_SECONDS
from clipia_proxy.quotas.memory import apply_settlement
from clipia_proxy.quotas.model import Settlement
from clipia_proxy.quotas.sqlite import (
    prepare,
    select_records,
    spent_current,
    write_correction,
    write_settlement,
)
from clipia_proxy.quotas.store import LedgerRecord, StoreUnavailable

from . import CountersSnapshot, WindowSpent

__all__ = ["SqliteLedger"]

_T = TypeVar("_T")
_CHUNK: Final = 2000
_PRUNE_BATCH: Final = 10_000


class SqliteLedger(SqlReports):
    """The ledger in a SQLite file (see the module docstring)."""

    dialect = SQLITE

    def __init__(self, path: str | Path, *, timeout: float = 5.0) -> None:
        self._path = str(path)
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        def call() -> _T:
            with self._lock:
                return fn(*args)

        try:
            return await asyncio.to_thread(call)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc.__class__.__name__}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the ledger is not open")
        return self._db

    def _open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        prepare(db)
        self._db = db

    async def start(self) -> None:
        """Open the file (creating the schema if needed)."""
        await self._run(self._open)

    async def close(self) -> None:
        """Close the file."""

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)

    def _select(self, where: str, args: tuple[Any, ...]) -> list[LedgerRecord]:
        return select_records(self._conn(), where, args)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one write transaction (rolled back if it raises)."""

        def write() -> _T:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._run(write)

    async def insert(self, record: LedgerRecord) -> bool:
        """See ``LedgerStore.insert``."""

        def insert() -> bool:
            values = record_values(record)
            cursor = self._conn().execute(
                f"INSERT OR IGNORE INTO ledger ({COLUMNS}) VALUES ({', '.join('?' * len(values))})",  # noqa: S608 - constant columns
                values,
            )
            return cursor.rowcount == 1

        return await self._run(insert)

    async def settle(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """See ``LedgerStore.settle`` (the record and its windows' spent in one transaction)."""

        def settle(db: sqlite3.Connection) -> LedgerRecord | None:
            found = select_records(db, "request_id = ? AND state = 'dispatched'", (request_id,))
            if not found:
                return None
            apply_settlement(found[0], settlement)
            return found[0] if write_settlement(db, found[0]) else None

        return await self._write(settle)

    async def renew(self, request_id: str, lease_until: float) -> None:
        """See ``LedgerStore.renew``."""
        await self._run(
            lambda: self._conn().execute(
                "UPDATE ledger SET lease_until = ? WHERE request_id = ? AND state = 'dispatched'",
                (lease_until, request_id),
            )
        )

    async def correct(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """See ``LedgerStore.correct`` (the record and its windows' spent in one transaction)."""
        return await self._write(lambda db: write_correction(db, request_id, settlement))

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``LedgerStore.note_upstream_id``."""
        await self._run(
            lambda: self._conn().execute(
                "UPDATE ledger SET upstream_id = ? WHERE request_id = ? AND state = 'dispatched'",
                (upstream_id, request_id),
            )
        )

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``LedgerStore.record``."""
        found = await self._run(self._select, "request_id = ?", (request_id,))
        return found[0] if found else None

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``LedgerStore.owner_of``."""

        def owner() -> str | None:
            row = (
                self._conn()
                .execute("SELECT team FROM ledger WHERE upstream_id = ? LIMIT 1", (upstream_id,))
                .fetchone()
            )
            return None if row is None else str(row[0])

        return await self._run(owner)

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``LedgerStore.dispatched``."""
        return await self._run(self._select, "state = 'dispatched'", ())

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``LedgerStore.records``."""
        return await self._run(self._select, "created_at >= ? AND created_at < ?", (since, until))

    def _spent(self, since: float) -> list[WindowSpent]:
        # The summary each settlement updates (see quotas.sqlite): windows from ``since`` on.
        rows = spent_current(self._conn(), since + CALENDAR_HORIZON_SECONDS)
        return [WindowSpent(team, window, spent) for team, window, spent in rows]

    async def spent(self, *, since: float) -> list[WindowSpent]:
        """See ``LedgerStore.spent``."""
        return await self._run(self._spent, since)

    async def snapshot(self, *, since: float, recent_since: float) -> CountersSnapshot:
        """See ``LedgerStore.snapshot`` (one read transaction)."""

        def snapshot() -> CountersSnapshot:
            db = self._conn()
            db.execute("BEGIN")
            try:
                return CountersSnapshot(
                    spent=self._spent(since),
                    dispatched=self._select("state = 'dispatched'", ()),
                    recent=self._select("created_at > ?", (recent_since,)),
                )
            finally:
                db.execute("COMMIT")

        return await self._run(snapshot)

    async def _chunks(self, query: str, args: tuple[Any, ...]) -> AsyncIterator[list[Any]]:
        """Run ``query`` on its own connection; yield its rows in chunks (a read snapshot)."""
        db = await self._run(
            lambda: sqlite3.connect(self._path, timeout=self._timeout, check_same_thread=False)
        )
        try:
            cursor = await self._run(db.execute, query, args)
            while chunk := await self._run(cursor.fetchmany, _CHUNK):
                yield chunk
        finally:
            await self._run(db.close)

    async def _report_rows(self, query: ReportQuery) -> AsyncIterator[Sequence[Any]]:
        async for chunk in self._chunks(f"{query.sql} ORDER BY {query.order}", query.args):
            for row in chunk:
                yield row

    async def open_count(self, *, since: float, until: float, team: str | None) -> int:
        """See ``LedgerStore.open_count``."""

        def count() -> int:
            row = (
                self._conn()
                .execute(
                    "SELECT count(*) FROM ledger WHERE state = 'dispatched' AND created_at >= ? "
                    "AND created_at < ? AND (? IS NULL OR team = ?)",
                    (since, until, team, team),
                )
                .fetchone()
            )
            return int(row[0])

        return await self._run(count)

    async def export(self, *, since: float, until: float) -> AsyncIterator[LedgerRecord]:
        """See ``LedgerStore.export``."""
        query = (
            f"SELECT {COLUMNS} FROM ledger WHERE created_at >= ? AND created_at < ? "  # noqa: S608 - constant columns
            "ORDER BY created_at"
        )
        async for chunk in self._chunks(query, (since, until)):
            for row in chunk:
                yield row_to_record(row)

    async def prune(self, *, before: float) -> int:
        """See ``LedgerStore.prune``: deleted in batches of ``_PRUNE_BATCH`` rows."""

        def batch() -> int:
            cursor = self._conn().execute(
                "DELETE FROM ledger WHERE rowid IN "
                "(SELECT rowid FROM ledger WHERE created_at < ? LIMIT ?)",
                (before, _PRUNE_BATCH),
            )
            return int(cursor.rowcount)

        removed = 0
        while deleted := await self._run(batch):
            removed += deleted
        await self._run(lambda: self._conn().execute(rollup_drop_empty(SQLITE)))
        return removed

"""The ``sqlite`` backend: the embedded default, one replica only.

Decisions are made by the in-memory engine (atomic on the event loop, so concurrent requests
cannot overshoot); the SQLite file is the durable ledger behind it. ``reserve`` returns only
after the ``dispatched`` record is committed; a failed commit undoes the decision and raises
:class:`StoreUnavailable`. ``settle`` updates the engine at once and commits the record,
retrying a failed commit until it lands (the record stays ``dispatched`` meanwhile, and the
start-up reconciler is the backstop); ``settle_nowait`` does the same without being awaited,
its write lingering up to ``_LINGER_SECONDS`` to share the next write's transaction. On
start-up, spent per window is read from ``ledger_spent``, a summary table each settlement
updates in its own transaction (an older file is summed into it once), so no record is read
for it; the last minute of RPM/TPM is rebuilt, and
unsettled records are handed to the reconciler (their money stays reserved until it settles
them). ``note_upstream_id_nowait`` writes a stream's upstream id in the transaction of the
event-loop turn that saw its first chunk. sqlite3 runs on one worker thread: nothing
blocks the event loop. WAL journal with ``synchronous=NORMAL``: a commit survives a crash of
the process (not of the machine's power).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from clipia_proxy.quotas.ledger_sql import (
    COLUMNS,
    SETTLED_FIELDS,
    SQLITE,
    horizon_keys,
    record_values,
    rollup_row,
    rollup_table,
    rollup_upsert,
    row_to_record,
    spent_table,
    spent_upsert,
)
from clipia_proxy.quotas.ledger_sql import spent_current as spent_current_sql

from .memory import RATE_WINDOW_SECONDS, MemoryEngine, apply_correction
from .model import Counted, ReserveRequest, Settlement
from .store import LedgerRecord, LocalStore, StoreUnavailable, WindowUsage

__all__ = [
    "ADD_SPENT",
    "SCHEMA",
    "SqliteStore",
    "prepare",
    "select_records",
    "spent_current",
    "write_correction",
    "write_settlement",
]

_LOGGER: Final = logging.getLogger(__name__)
_T = TypeVar("_T")
_SETTLE_ATTEMPTS: Final = 8
_SETTLE_BACKOFF_SECONDS: Final = 0.05
_LINGER_SECONDS: Final = 0.002
"""How long a settlement's write may wait to share the next write's transaction (at low
concurrency the next reservation comes within it: one commit per request instead of two)."""
_PAGE_SIZE: Final = 1024
"""Bytes per page of a new ledger file. A request dirties a few pages (the table and each
index); every commit writes them whole to the WAL, so small pages make commits ~20 % cheaper
than SQLite's default 4096."""
_WAL_AUTOCHECKPOINT_PAGES: Final = 10_000
"""WAL pages between checkpoints (SQLite's default is 1000): a busy ledger rewrites the same
recent pages, which a checkpoint copies once however often they changed (10 MiB of WAL)."""

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    stream INTEGER NOT NULL,
    reserved INTEGER NOT NULL,
    tokens_reserved INTEGER NOT NULL,
    windows TEXT NOT NULL,
    created_at REAL NOT NULL,
    lease_until REAL NOT NULL,
    state TEXT NOT NULL,
    upstream_id TEXT,
    cost INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    usage_source TEXT,
    outcome TEXT,
    settled_at REAL,
    environment TEXT NOT NULL DEFAULT 'live',
    tags TEXT,
    end_user TEXT
);
CREATE INDEX IF NOT EXISTS ledger_created ON ledger (created_at);
CREATE INDEX IF NOT EXISTS ledger_dispatched ON ledger (state) WHERE state = 'dispatched';
CREATE INDEX IF NOT EXISTS ledger_upstream ON ledger (upstream_id);
"""
_ADDED_COLUMNS: Final = (
    ("environment", "TEXT NOT NULL DEFAULT 'live'"),
    ("tags", "TEXT"),
    ("end_user", "TEXT"),
)
"""Columns added after the first schema: a ledger file from before gets them at start-up
(``ALTER TABLE ... ADD COLUMN``; old records read as ``live``, no tags, no end user)."""
ADD_SPENT: Final = (
    "INSERT INTO ledger_spent (team, window, spent) VALUES (?, ?, ?) "
    "ON CONFLICT (team, window) DO UPDATE SET spent = spent + excluded.spent"
)
"""A settlement's cost added to each of its windows, in the settlement's own transaction."""
_CALENDAR_HORIZON_SECONDS: Final = 40 * 86400
"""Day, week and month windows older than this can no longer be current: not loaded."""
_SPENT_CURRENT: Final = spent_current_sql(SQLITE)
_ROLLUP: Final = (
    rollup_table(SQLITE, integer="INTEGER") + " WITHOUT ROWID",
    "CREATE TRIGGER IF NOT EXISTS ledger_daily_insert AFTER INSERT ON ledger "
    f"WHEN NEW.state = 'settled' BEGIN {rollup_upsert(SQLITE, (rollup_row('NEW'), 1))}; END",
    "CREATE TRIGGER IF NOT EXISTS ledger_daily_update "
    "AFTER UPDATE OF state, cost, prompt_tokens, completion_tokens ON ledger "
    "WHEN OLD.state = 'settled' OR NEW.state = 'settled' BEGIN "
    f"{rollup_upsert(SQLITE, (rollup_row('OLD'), -1), (rollup_row('NEW'), 1))}; END",
    "CREATE TRIGGER IF NOT EXISTS ledger_daily_delete AFTER DELETE ON ledger "
    f"WHEN OLD.state = 'settled' BEGIN {rollup_upsert(SQLITE, (rollup_row('OLD'), -1))}; END",
)
"""The daily rollup ``report`` reads (see :mod:`clipia_proxy.quotas.ledger_sql`): kept by triggers
in the transaction of every change to a settled record."""


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def prepare(db: sqlite3.Connection) -> None:
    """Create the schema; an older file gets what it lacks (columns, spent summary, rollup)."""
    db.executescript(SCHEMA)
    present = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
    for name, declaration in _ADDED_COLUMNS:
        if name not in present:  # a ledger file written before the column existed
            db.execute(f"ALTER TABLE ledger ADD COLUMN {name} {declaration}")
    if _has_table(db, SQLITE.spent) and _has_table(db, SQLITE.daily):
        return
    # Once: the summaries of the records already there, in one write transaction (another
    # process opening the file at the same time waits, then finds them made).
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _has_table(db, SQLITE.spent):
            db.execute(spent_table(SQLITE, integer="INTEGER") + " WITHOUT ROWID")
            db.execute(spent_upsert(SQLITE, ("ledger", 1)))
        if not _has_table(db, SQLITE.daily):
            for statement in _ROLLUP:
                db.execute(statement)
            db.execute(rollup_upsert(SQLITE, ("ledger", 1)))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def select_records(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[LedgerRecord]:
    """The records ``WHERE where`` (a constant clause), oldest first."""
    rows = db.execute(
        f"SELECT {COLUMNS} FROM ledger WHERE {where} ORDER BY created_at",  # noqa: S608 - constant clauses only
        args,
    )
    return [row_to_record(row) for row in rows]


def write_settlement(db: sqlite3.Connection, record: LedgerRecord) -> bool:
    """Write a settled record over its dispatched row; False if it is not dispatched (any more).

    The spent summary of its windows changes with it (the caller's transaction), so start-up
    reads sums without scanning records; the daily rollup follows by trigger.
    """
    cursor = db.execute(
        "UPDATE ledger SET state = 'settled', upstream_id = COALESCE(?, upstream_id), "
        "cost = ?, prompt_tokens = ?, completion_tokens = ?, usage_source = ?, outcome = ?, "
        "settled_at = ? WHERE request_id = ? AND state = 'dispatched'",
        (*record_values(record)[SETTLED_FIELDS], record.request_id),
    )
    if cursor.rowcount != 1:
        return False
    db.executemany(ADD_SPENT, [(record.team, key, record.cost) for key in record.windows.values()])
    return True


def write_correction(
    db: sqlite3.Connection, request_id: str, settlement: Settlement
) -> LedgerRecord | None:
    """Correct a settled record's cost and tokens; return it as it was (None: not settled).

    Its windows' spent moves by the difference in the caller's transaction.
    """
    found = select_records(db, "request_id = ? AND state = 'settled'", (request_id,))
    if not found:
        return None
    old = found[0]
    new = msgspec.structs.replace(old)
    apply_correction(new, settlement)
    db.execute(
        "UPDATE ledger SET cost = ?, prompt_tokens = ?, completion_tokens = ?, "
        "usage_source = ?, upstream_id = ? WHERE request_id = ?",
        (
            new.cost,
            new.prompt_tokens,
            new.completion_tokens,
            new.usage_source,
            new.upstream_id,
            request_id,
        ),
    )
    delta = new.cost - old.cost
    db.executemany(ADD_SPENT, [(old.team, key, delta) for key in old.windows.values()])
    return old


def spent_current(db: sqlite3.Connection, now: float) -> list[tuple[str, str, int]]:
    """(team, window, spent) of every window that can still be current at ``now``."""
    keys = horizon_keys(now - _CALENDAR_HORIZON_SECONDS)
    return [(str(t), str(w), int(v)) for t, w, v in db.execute(_SPENT_CURRENT, keys)]


class _Call:
    __slots__ = ("args", "fn", "future", "loop", "write")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        write: bool,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn, self.args, self.write, self.loop, self.future = fn, args, write, loop, future


def _resolve(outcomes: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in outcomes:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Worker:
    """One thread owns the connection and runs queued calls in order.

    Writes waiting together share one transaction (group commit): under concurrency many
    reservations and settlements cost one commit and one wake-up of the event loop. Calls run
    in queue order. When a write of a group fails, the group is replayed with a savepoint per
    write, so one failing write does not undo the others.
    """

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection
        self._queue: queue.SimpleQueue[list[_Call] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="clipia-sqlite", daemon=True)
        self._started = False
        self._stopped = False
        self._pending: list[_Call] = []
        """Calls made during this turn of the event loop, handed over together at its end:
        one wake-up of the thread per turn, not one per call."""
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._lingering: list[_Call] = []
        self._linger_timer: asyncio.TimerHandle | None = None

    def call(
        self, fn: Callable[..., _T], args: tuple[Any, ...], *, write: bool, linger: bool = False
    ) -> asyncio.Future[_T]:
        """Queue ``fn(*args)`` for the thread; the future resolves on the caller's loop.

        A ``linger`` call (a settlement: nobody waits for it) may wait up to
        ``_LINGER_SECONDS`` to share the transaction of the next call; any other call takes
        the lingering ones along, ahead of itself, so order is kept.
        """
        if self._stopped:
            raise sqlite3.OperationalError("the store is closed")
        if not self._started:
            self._started = True
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        item = _Call(fn, args, write, loop, future)
        if linger:
            if self._pending and self._pending_loop is loop:
                self._pending.append(item)  # a hand-over is due this turn anyway: ride along
            else:
                self._lingering.append(item)
                if self._linger_timer is None:
                    self._linger_timer = loop.call_later(_LINGER_SECONDS, self._end_linger)
            return future
        if not self._pending or self._pending_loop is not loop:
            # (A hand-over scheduled on another loop, since closed, would never run.)
            self._pending_loop = loop
            loop.call_soon(self._hand_over)
        if self._lingering:
            self._take_lingering()
        self._pending.append(item)
        return future

    def _take_lingering(self) -> None:
        # The linger timer stays armed (one timer per linger period, not one per settlement):
        # when it fires with nothing lingering it does nothing.
        self._pending += self._lingering
        self._lingering = []

    def _end_linger(self) -> None:
        self._linger_timer = None
        if self._lingering:
            self._take_lingering()
            self._hand_over()

    def _hand_over(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            self._queue.put(pending)

    def stop(self) -> None:
        self._stopped = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._take_lingering()
        self._hand_over()
        self._queue.put(None)

    def _main(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = list(first)
            stop = False
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.extend(item)
            by_loop: dict[
                asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]
            ] = {}
            try:
                outcomes = self._execute(batch)
            except Exception as exc:  # noqa: BLE001 - a bug must fail the calls, not the thread
                outcomes = [(call, False, exc) for call in batch]
            for call, ok, value in outcomes:
                by_loop.setdefault(call.loop, []).append((call.future, ok, value))
            for loop, resolved in by_loop.items():
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                    loop.call_soon_threadsafe(_resolve, resolved)
            if stop:
                return

    def _execute(self, batch: list[_Call]) -> list[tuple[_Call, bool, Any]]:
        # In queue order: consecutive writes share a transaction; a read sees every write
        # queued before it (settlements are not awaited, so a read may follow one at once).
        results: list[tuple[_Call, bool, Any]] = []
        writes: list[_Call] = []
        for call in batch:
            if call.write:
                writes.append(call)
                continue
            if writes:
                results += self._write(writes)
                writes = []
            try:
                results.append((call, True, call.fn(*call.args)))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                results.append((call, False, exc))
        if writes:
            results += self._write(writes)
        return results

    def _write(self, writes: list[_Call]) -> list[tuple[_Call, bool, Any]]:
        try:
            db = self._connection()
        except sqlite3.Error as exc:
            return [(call, False, exc) for call in writes]
        # Fast path: every write in one transaction. Writes rarely fail; when one does, the
        # batch is rolled back and replayed with a savepoint per write, so only it fails.
        try:
            db.execute("BEGIN IMMEDIATE")
            values = [call.fn(*call.args) for call in writes]
            db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
        else:
            return [(call, True, value) for call, value in zip(writes, values, strict=True)]
        return self._one_by_one(db, writes)

    @staticmethod
    def _one_by_one(db: sqlite3.Connection, writes: list[_Call]) -> list[tuple[_Call, bool, Any]]:
        pending: list[tuple[_Call, bool, Any]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for call in writes:
                db.execute("SAVEPOINT op")
                try:
                    value = call.fn(*call.args)
                except sqlite3.Error as exc:
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    pending.append((call, False, exc))
                else:
                    db.execute("RELEASE op")
                    pending.append((call, True, value))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [(call, False, exc) for call in writes]
        return pending


class SqliteStore:
    """Quota state in memory, the ledger in a SQLite file (see the module docstring)."""

    is_remote = False

    def __init__(
        self, path: str | Path, *, clock: Callable[[], float], timeout: float = 5.0
    ) -> None:
        self._path = str(path)
        self._clock = clock
        self._timeout = timeout
        self._worker = _Worker(self._conn)
        self._db: sqlite3.Connection | None = None
        self.engine: Final = MemoryEngine()

    async def _run(self, fn: Callable[..., _T], *args: Any, write: bool = False) -> _T:
        try:
            return await self._worker.call(fn, args, write=write)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc.__class__.__name__}: {exc}") from exc

    # -- worker-thread functions ------------------------------------------------------------
    def _open(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # a new file only; an existing one keeps its
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        prepare(db)
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the store is not open")
        return self._db

    def _load(self, now: float) -> list[LedgerRecord]:
        db = self._conn()
        for team, window, amount in spent_current(db, now):
            self.engine.add_spent(team, window, amount)
        since = now - RATE_WINDOW_SECONDS
        # Two indexed reads (created_at; the partial index of open records), not an OR scan.
        return [
            row_to_record(row)
            for row in db.execute(
                f"SELECT {COLUMNS} FROM ledger WHERE created_at > ? UNION ALL "  # noqa: S608 - constant columns
                f"SELECT {COLUMNS} FROM ledger WHERE state = 'dispatched' AND created_at <= ?",
                (since, since),
            )
        ]

    def _insert(self, record: LedgerRecord) -> None:
        self._conn().execute(
            f"INSERT INTO ledger ({COLUMNS}) VALUES ({', '.join('?' * 21)})",  # noqa: S608 - constant columns
            record_values(record),
        )

    def _settle(self, record: LedgerRecord) -> None:
        # Runs inside the worker's transaction (group commit).
        write_settlement(self._conn(), record)

    def _correct(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        record = write_correction(self._conn(), request_id, settlement)
        if record is not None:  # handed back as the difference (the caller adjusts the engine)
            record.cost = settlement.cost - record.cost
        return record

    def _note(self, request_id: str, upstream_id: str) -> None:
        self._conn().execute(
            "UPDATE ledger SET upstream_id = ? WHERE request_id = ? AND state = 'dispatched'",
            (upstream_id, request_id),
        )

    def _select(self, where: str, args: tuple[Any, ...]) -> list[LedgerRecord]:
        return select_records(self._conn(), where, args)

    def _owner(self, upstream_id: str) -> str | None:
        row = (
            self._conn()
            .execute("SELECT team FROM ledger WHERE upstream_id = ? LIMIT 1", (upstream_id,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the Store protocol ---------------------------------------------------------------
    async def start(self) -> None:
        """Open the file, create the schema, load spent and the last minute of requests."""
        await self._run(self._open)
        now = self._clock()
        for record in await self._run(self._load, now):
            self.engine.load(record, now)

    async def close(self) -> None:
        """Close the file and the worker thread."""
        await self._run(self._close)
        self._worker.stop()

    async def reserve(self, request: ReserveRequest) -> Counted:
        """See ``Store.reserve``: counted in memory, committed before returning."""
        counted = self.engine.reserve(request)
        if not counted.applied or counted.replayed:
            return counted
        record = self.engine.records[request.request_id]
        try:
            await self._run(self._insert, record, write=True)
        except BaseException as exc:
            self.engine.unreserve(request.request_id)
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                # Already in the file (settled, then forgotten in memory): a replay.
                return Counted(applied=True, replayed=True)
            raise
        return counted

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """See ``Store.settle``: applied in memory at once, committed with retries.

        Returns once the record is committed (or its last retry failed).
        """
        record = self.engine.settle(request_id, settlement)
        if record is None:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._commit(record, 0, done=done)
        await done
        return True

    def settle_nowait(self, request_id: str, settlement: Settlement) -> bool:
        """See ``LocalStore.settle_nowait``: applied in memory now, committed by the worker.

        The same retries as ``settle`` (driven by callbacks, not a task: the request's handler
        spends no task nor coroutine on its settlement); its write may linger.
        """
        record = self.engine.settle(request_id, settlement)
        if record is None:
            return False
        self._commit(record, 0, done=None)
        return True

    def _commit(
        self, record: LedgerRecord, attempt: int, *, done: asyncio.Future[None] | None
    ) -> None:
        """Queue the record's settlement write; retry with back-off, ``_SETTLE_ATTEMPTS`` in all.

        ``done`` (if any) resolves when the write landed or the last attempt failed; without
        it the write may linger to share the next transaction.
        """
        try:
            future = self._worker.call(self._settle, (record,), write=True, linger=done is None)
        except sqlite3.Error as exc:  # the store is closed: the reconciler will charge it
            self._not_committed(record, exc, done)
            return
        future.add_done_callback(functools.partial(self._committed, record, attempt, done))

    def _committed(
        self,
        record: LedgerRecord,
        attempt: int,
        done: asyncio.Future[None] | None,
        future: asyncio.Future[None],
    ) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is None:
            self.engine.forget(record.request_id)
            if done is not None and not done.done():
                done.set_result(None)
        elif attempt == _SETTLE_ATTEMPTS - 1:
            self._not_committed(record, exc, done)
        else:
            _LOGGER.warning(
                "ledger settlement of %s failed (%s); retry %d",
                record.request_id,
                exc.__class__.__name__,
                attempt + 1,
            )
            future.get_loop().call_later(
                _SETTLE_BACKOFF_SECONDS * 2**attempt,
                functools.partial(self._commit, record, attempt + 1, done=done),
            )

    @staticmethod
    def _not_committed(
        record: LedgerRecord, exc: BaseException, done: asyncio.Future[None] | None
    ) -> None:
        _LOGGER.error(
            "ledger settlement of %s not committed (%s: %s); the reconciler will charge it",
            record.request_id,
            exc.__class__.__name__,
            exc,
        )
        if done is not None and not done.done():
            done.set_result(None)

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew`` (leases live in memory: one replica)."""
        self.engine.renew(request_id, now + lease_seconds, now)

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot`` (slots live in memory: one replica)."""
        self.engine.release_slot(request_id)

    def release_slot_nowait(self, request_id: str) -> None:
        """See ``LocalStore.release_slot_nowait``."""
        self.engine.release_slot(request_id)

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct``: committed, then applied to the budgets."""
        changed = await self._run(self._correct, request_id, settlement, write=True)
        if changed is None:
            return None
        for key in changed.windows.values():
            self.engine.add_spent(changed.team, key, changed.cost)
        return changed.cost

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id``: committed before it returns."""
        if self.engine.note_upstream_id(request_id, upstream_id) is not None:
            await self._run(self._note, request_id, upstream_id, write=True)

    def note_upstream_id_nowait(self, request_id: str, upstream_id: str) -> None:
        """See ``LocalStore.note_upstream_id_nowait``: queued in this turn's transaction.

        Not a lingering write: the worker takes it at the end of the current event-loop turn,
        with the other writes of that turn (one commit). A failed write is logged; the
        settlement writes the id again.
        """
        if self.engine.note_upstream_id(request_id, upstream_id) is None:
            return
        try:
            future = self._worker.call(self._note, (request_id, upstream_id), write=True)
        except sqlite3.Error as exc:
            _LOGGER.warning("upstream id of %s not written: %s", request_id, exc)
            return
        future.add_done_callback(functools.partial(self._noted, request_id))

    @staticmethod
    def _noted(request_id: str, future: asyncio.Future[None]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            _LOGGER.warning("upstream id of %s not written: %s", request_id, exc)

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        return self.engine.usage(team, keys, now)

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        return self.engine.rates(team, now)

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``Store.record``."""
        found = await self._run(self._select, "request_id = ?", (request_id,))
        return found[0] if found else None

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of``."""
        return await self._run(self._owner, upstream_id)

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``Store.dispatched``."""
        return await self._run(self._select, "state = 'dispatched'", ())

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``Store.records``."""
        return await self._run(self._select, "created_at >= ? AND created_at < ?", (since, until))


_STORE_CHECK: type[LocalStore] = SqliteStore

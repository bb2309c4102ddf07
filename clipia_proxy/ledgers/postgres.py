"""The ``postgres`` ledger: the money record in an existing PostgreSQL, shared by replicas.

Driver: asyncpg (binary protocol, native asyncio, prepared statements: one round trip per
statement; maintained by MagicStack). A bounded pool per replica (``ledger.pool_size``); with
PgBouncer in transaction mode set ``ledger.statement_cache: false`` (PgBouncer < 1.21) — no
session state is used otherwise: the migration lock is transaction-scoped
(``pg_advisory_xact_lock``) and streams run inside one transaction.

Schema: versioned migrations (:data:`MIGRATIONS`), applied at start under an advisory lock (so
replicas starting together apply each once) or by ``clipia-proxy migrate``; applied versions
are rows of ``clipia_schema_migrations``. ``clipia_ledger`` is partitioned by UTC calendar month
of ``created_at`` (``clipia_ledger_y2026m11``), created three months ahead at start and when
a record reaches the horizon; a DEFAULT partition catches anything else, so no insert ever
fails for a missing month. ``ledger prune`` drops whole month partitions. Migration 3 adds
the daily rollup ``report`` reads, kept by triggers (:mod:`clipia_proxy.quotas.ledger_sql`); 5 the
spent summary (team x window key) the counters are rebuilt from, kept by the same triggers and
never lowered by a prune; 6 the per-request insert as a function with one generic plan per
session (no planning per call).

A record is committed before ``insert`` returns (each statement is its own transaction;
PostgreSQL's own group commit batches concurrent WAL flushes). ``settle`` is one
``UPDATE … WHERE state = 'dispatched' RETURNING``: idempotent by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, Generic, TypeVar

import asyncpg

from clipia_proxy.config import LedgerConfig
from clipia_proxy.quiet import AfterQuiet
from clipia_proxy.quotas.ledger_sql import (
    COLUMNS,
    POSTGRES,
    ReportQuery,
    SqlReports,
    horizon_keys,
    record_values,
    rollup_drop_empty,
    rollup_row,
    rollup_table,
    rollup_upsert,
    row_to_record,
    spent_current,
    spent_table,
    spent_upsert,
)
from clipia_proxy.quotas.model import Micro, Outcome, Settlement
from clipia_proxy.quotas.store import (
    Inserted,
    LedgerRecord,
    StoreUnavailable,
    TeamSnapshot,
)

from . import CountersSnapshot, WindowSpent

__all__ = ["MIGRATIONS", "PostgresLedger"]

_LOGGER: Final = logging.getLogger(__name__)
_LOCK_KEY: Final = 0x636C6970  # "clip": the migration advisory lock
_MONTHS_AHEAD: Final = 3
_EXPORT_PREFETCH: Final = 2000
_MIGRATION_TIMEOUT: Final = 3600.0
"""A migration may rewrite or sum the whole ledger (3 sums it into the daily rollup: about 2
minutes per 10M records on a busy 2-core VM): not the statement timeout."""

_INPUT_TYPES: Final = (
    "text, text, text, text, boolean, bigint, bigint, jsonb, float8, float8, text, text, bigint, "
    "bigint, bigint, text, text, float8, text, jsonb, text, bigint"
)
_INPUT_ARRAYS: Final = ", ".join(t.strip() + "[]" for t in _INPUT_TYPES.split(","))
_UNNEST_ARGS: Final = ", ".join(
    f"${n}::{t.strip()}[]" for n, t in enumerate(_INPUT_TYPES.split(","), start=1)
)
_INSERT_QUERY: Final = (
    # Every record of a batch in one statement (group commit). `c` is computed before the
    # insert (a data-modifying CTE's rows are not visible to the statement's other parts).
    # Migration 6 holds it in clipia_ledger_insert(): changing it takes a new migration.
    f"WITH i AS (SELECT * FROM unnest({_UNNEST_ARGS}) AS i({COLUMNS}, counter_seq)), "  # noqa: S608 - constant columns
    "c AS (SELECT i.*, EXISTS (SELECT 1 FROM clipia_ledger l WHERE l.request_id = i.request_id) "
    "AS known, (i.counter_seq IS NOT NULL AND EXISTS (SELECT 1 FROM clipia_ledger l "
    "WHERE l.team = i.team AND l.counter_seq = i.counter_seq)) AS behind FROM i), "
    f"ins AS (INSERT INTO clipia_ledger ({COLUMNS}, counter_seq) SELECT {COLUMNS}, counter_seq "
    "FROM c WHERE NOT known AND NOT behind ON CONFLICT DO NOTHING RETURNING request_id) "
    "SELECT c.request_id, c.behind, EXISTS (SELECT 1 FROM ins WHERE ins.request_id = c.request_id) "
    "FROM c"
)
_INSERT_MANY: Final = (
    "SELECT request_id, behind, inserted FROM clipia_ledger_insert($1, $2, $3, $4, $5, $6, $7, "
    "$8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
)
"""The insert a request waits for before dispatch: one function call (see migration 6)."""

MIGRATIONS: Final[tuple[tuple[int, str], ...]] = (
    (
        1,
        """
CREATE TABLE clipia_ledger (
    request_id text NOT NULL,
    team text NOT NULL,
    key_id text,
    model text NOT NULL,
    stream boolean NOT NULL,
    reserved bigint NOT NULL,
    tokens_reserved bigint NOT NULL,
    windows jsonb NOT NULL,
    created_at double precision NOT NULL,
    lease_until double precision NOT NULL,
    state text NOT NULL,
    upstream_id text,
    cost bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    usage_source text,
    outcome text,
    settled_at double precision,
    PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE clipia_ledger_default PARTITION OF clipia_ledger DEFAULT;
CREATE INDEX clipia_ledger_open ON clipia_ledger (lease_until) WHERE state = 'dispatched';
CREATE INDEX clipia_ledger_upstream ON clipia_ledger (upstream_id) WHERE upstream_id IS NOT NULL;
CREATE INDEX clipia_ledger_created ON clipia_ledger (created_at);
""",
    ),
    (
        2,
        """
ALTER TABLE clipia_ledger
    ADD COLUMN environment text NOT NULL DEFAULT 'live',
    ADD COLUMN tags jsonb,
    ADD COLUMN end_user text;
""",
    ),
    (
        3,
        # The daily rollup (see clipia_proxy.quotas.ledger_sql), kept by triggers. The UPDATE and
        # DELETE triggers run once per statement (its rows upserted in key order: statements
        # settling many records cannot deadlock on it); the INSERT one only for a record that
        # arrives settled. Created before the backfill, in its transaction: CREATE TRIGGER
        # holds writers off until the commit, so no settlement is missed or counted twice.
        f"""
{rollup_table(POSTGRES, integer="bigint")};
CREATE FUNCTION clipia_ledger_daily_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        {rollup_upsert(POSTGRES, ("old_rows", -1), ("new_rows", 1))};
    ELSE
        {rollup_upsert(POSTGRES, ("old_rows", -1))};
    END IF;
    RETURN NULL;
END $fn$;
CREATE FUNCTION clipia_ledger_daily_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    {rollup_upsert(POSTGRES, (rollup_row("NEW"), 1))};
    RETURN NULL;
END $fn$;
CREATE TRIGGER clipia_ledger_daily_update AFTER UPDATE ON clipia_ledger
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION clipia_ledger_daily_rows();
CREATE TRIGGER clipia_ledger_daily_delete AFTER DELETE ON clipia_ledger
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION clipia_ledger_daily_rows();
CREATE TRIGGER clipia_ledger_daily_insert AFTER INSERT ON clipia_ledger
    FOR EACH ROW WHEN (NEW.state = 'settled') EXECUTE FUNCTION clipia_ledger_daily_insert();
{rollup_upsert(POSTGRES, ("clipia_ledger", 1))};
""",
    ),
    (
        4,
        # The reservation sequence of the Redis counters (a lagging replica is caught by it).
        """
ALTER TABLE clipia_ledger ADD COLUMN counter_seq bigint;
CREATE INDEX clipia_ledger_team_seq ON clipia_ledger (team, counter_seq);
""",
    ),
    (
        5,
        # The spent summary (team x window key), as SQLite's: counters are rebuilt from it
        # without reading records, and a prune does not lower it (a total budget keeps what
        # pruned months spent). Kept by the rollup's trigger functions, replaced here; writers
        # wait (the LOCK) so none settles between the backfill and the new functions.
        f"""
LOCK TABLE clipia_ledger IN SHARE ROW EXCLUSIVE MODE;
{spent_table(POSTGRES, integer="bigint")};
CREATE OR REPLACE FUNCTION clipia_ledger_daily_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        {rollup_upsert(POSTGRES, ("old_rows", -1), ("new_rows", 1))};
        {spent_upsert(POSTGRES, ("old_rows", -1), ("new_rows", 1))};
    ELSE
        {rollup_upsert(POSTGRES, ("old_rows", -1))};
    END IF;
    RETURN NULL;
END $fn$;
CREATE OR REPLACE FUNCTION clipia_ledger_daily_insert() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    {rollup_upsert(POSTGRES, (rollup_row("NEW"), 1))};
    {spent_upsert(POSTGRES, (rollup_row("NEW"), 1))};
    RETURN NULL;
END $fn$;
{spent_upsert(POSTGRES, ("clipia_ledger", 1))};
""",
    ),
    (
        6,
        # The per-request insert as a function planned once per session, generically: planned
        # per call (custom plans), its checks over every month partition cost 0.5-1 ms of
        # planning, more than the insert itself. enable_seqscan off keeps that one plan on
        # the indexes when it was made while a partition (the next month's) was empty.
        # Function-level settings hold no session state: PgBouncer-safe.
        f"""
CREATE FUNCTION clipia_ledger_insert({_INPUT_ARRAYS})
RETURNS TABLE (request_id text, behind boolean, inserted boolean)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY {_INSERT_QUERY};
END $fn$;
""",
    ),
)
"""(version, SQL): append only; an applied migration is never edited."""

_SETTLE_MANY: Final = (
    "UPDATE clipia_ledger SET state = 'settled', "  # noqa: S608 - constant columns
    "upstream_id = COALESCE(s.upstream_id, clipia_ledger.upstream_id), cost = s.cost, "
    "prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens, "
    "usage_source = s.usage_source, outcome = s.outcome, settled_at = s.settled_at "
    "FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], "
    "$7::text[], $8::float8[]) AS s(request_id, upstream_id, cost, prompt_tokens, "
    "completion_tokens, usage_source, outcome, settled_at) "
    "WHERE clipia_ledger.request_id = s.request_id AND clipia_ledger.state = 'dispatched' "
    "RETURNING " + ", ".join(f"clipia_ledger.{c.strip()}" for c in COLUMNS.split(","))
)
_BATCH_MAX: Final = 500

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class _GroupCommit(Generic[_Item, _Result]):
    """Items submitted in the same moment are written by one statement (one round trip).

    The first item of a batch schedules its write for the end of the event-loop turn, so
    everything submitted meanwhile joins it; at most ``limit`` writes run at once (the pool's
    size) and items arriving while they all run form the next batch. Each submitter awaits
    its own item's result (its batch's commit); a failed write fails every item of its batch.
    """

    def __init__(
        self,
        write: Callable[[list[_Item]], Awaitable[list[_Result]]],
        *,
        limit: int,
        abandoned: Callable[[_Item, _Result], None] | None = None,
    ) -> None:
        self._write = write
        self._abandoned = abandoned
        """Called with the items whose submitter was gone (cancelled) when they were written."""
        self._limit = max(1, limit)
        self._queue: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: _Item) -> _Result:
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        return await future

    def push(self, item: _Item) -> None:
        """Submit without waiting (a failure is logged)."""
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_log_failure)
        self._queue.append((item, future))
        self._kick()

    def _kick(self) -> None:
        if self._queue and not self._scheduled and self._running < self._limit:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._queue or self._running >= self._limit:
            return
        batch, self._queue = self._queue[:_BATCH_MAX], self._queue[_BATCH_MAX:]
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[_Item, asyncio.Future[_Result]]]) -> None:
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - each submitter gets its batch's failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (item, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
                elif future.cancelled() and self._abandoned is not None:
                    self._abandoned(item, result)
        finally:
            self._running -= 1
            self._kick()


class _Kept:
    """Pool connections the per-request writes keep between their statements.

    Taking a connection from asyncpg's pool and giving it back costs the event loop about
    90 µs of CPU per statement (a task, a queue, a proxy object): more than encoding a batch,
    and paid per request (insert, settlement, a stream's upstream id) when requests do not
    arrive together. The writes keep up to ``size`` idle connections (``pool_size - 1``: one
    always stays for the other queries) and give them all back after a quiet second.
    """

    QUIET_SECONDS: Final = 1.0

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: list[Any] = []
        self._quiet = AfterQuiet(self.QUIET_SECONDS, lambda: self._spawn(self.give_back()))
        self._pool: asyncpg.Pool | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def take(self) -> Any | None:
        """Return an idle kept connection that is still open, or None."""
        while self._idle:
            connection = self._idle.pop()
            try:
                closed = connection.is_closed()
            except asyncpg.InterfaceError:
                continue  # closed by the server, and so already given back by the pool itself
            if not closed:
                return connection
            assert self._pool is not None
            self._spawn(self._pool.release(connection))  # closed, not given back yet
        return None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def keep(self, pool: asyncpg.Pool, connection: Any) -> bool:
        """Keep a connection that just served a write; False when it must go back now."""
        if len(self._idle) >= self._size:
            return False
        self._pool = pool
        self._idle.append(connection)
        self._quiet.note()
        return True

    async def give_back(self) -> None:
        """Return every idle connection to the pool (at a quiet second, and before closing)."""
        self._quiet.cancel()
        idle, self._idle = self._idle, []
        for connection in idle:
            assert self._pool is not None
            with contextlib.suppress(Exception):
                await self._pool.release(connection)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        _LOGGER.warning("ledger write failed: %s", future.exception())


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is (see ``_connect``)."""


def _month_start(when: dt.date) -> dt.datetime:
    return dt.datetime(when.year, when.month, 1, tzinfo=dt.UTC)


def _next_month(start: dt.datetime) -> dt.datetime:
    return (start + dt.timedelta(days=32)).replace(day=1)


def _partition_name(start: dt.datetime) -> str:
    return f"clipia_ledger_y{start.year:04d}m{start.month:02d}"


class PostgresLedger(SqlReports):
    """The ledger in PostgreSQL (see the module docstring)."""

    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        statement_cache: bool = True,
        timeout: float = 5.0,
        dsn_env: str = "CLIPIA_LEDGER_DSN",
    ) -> None:
        self._dsn = dsn
        self._dsn_env = dsn_env
        self._pool_size = pool_size
        self._statement_cache = statement_cache
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._horizon = 0.0
        """Records created before this have their month's partition (created at start)."""
        self._inserts = _GroupCommit(
            self._insert_many, limit=pool_size, abandoned=self._insert_abandoned
        )
        self._settles = _GroupCommit(self._settle_many, limit=pool_size)
        self._kept = _Kept(0)

    @classmethod
    def from_config(cls, config: LedgerConfig, *, timeout: float) -> PostgresLedger:
        """Build from ``ledger``: the DSN from the env var ``postgres_dsn_env``."""
        dsn = os.environ.get(config.postgres_dsn_env, "").strip()
        return cls(
            dsn,
            pool_size=config.pool_size,
            statement_cache=config.statement_cache,
            timeout=timeout,
            dsn_env=config.postgres_dsn_env,
        )

    @property
    def dsn(self) -> str:
        """The DSN (a secret: never logged nor shown)."""
        return self._dsn

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        # The class only: a message could quote the DSN (and its password).
        return StoreUnavailable(f"postgres: {exc.__class__.__name__}")

    async def _connect(self) -> asyncpg.Pool:
        if not self._dsn:
            raise StoreUnavailable(f"the environment variable {self._dsn_env} is not set")
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_size,
                    command_timeout=max(self._timeout, 30.0),
                    timeout=self._timeout,
                    statement_cache_size=100 if self._statement_cache else 0,
                    # The ledger keeps no session state (transaction-scoped locks, no LISTEN,
                    # no SET): asyncpg's default reset query would add a round trip to every
                    # statement's release.
                    reset=_keep_session,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise self._unavailable(exc) from exc
            self._kept = _Kept(self._pool_size - 1)
        return self._pool

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        pool = await self._connect()
        try:
            return list(await pool.fetch(query, *args, timeout=self._timeout))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _write(self, query: str, *args: Any) -> list[Any]:
        """Run a per-request write on a kept connection (see :class:`_Kept`)."""
        pool = await self._connect()
        healthy = True
        try:
            connection = self._kept.take()
            if connection is None:
                connection = await pool.acquire(timeout=self._timeout)
            try:
                rows = list(await connection.fetch(query, *args, timeout=self._timeout))
            except BaseException:
                healthy = False  # a failed or cancelled statement: the pool checks it
                raise
            finally:
                if not healthy or not self._kept.keep(pool, connection):
                    await pool.release(connection)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return rows

    async def start(self) -> None:
        """Connect, apply pending migrations (under the advisory lock), prepare the writes."""
        await self.migrate()
        # The per-request statements, planned once now rather than by the first requests
        # (over no rows: nothing is written).
        await self._fetch(_INSERT_MANY, *([] for _ in range(22)))
        await self._fetch(_SETTLE_MANY, *([] for _ in range(8)))

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            # Writes still running give their connections back to the pool (it waits for them).
            kept, self._kept = self._kept, _Kept(0)
            await kept.give_back()
            pool, self._pool = self._pool, None
            await pool.close()

    async def migrate(self, *, now: float | None = None) -> list[int]:
        """Apply pending migrations and create partitions ahead; return versions applied."""
        pool = await self._connect()
        applied: list[int] = []
        when = dt.datetime.now(dt.UTC) if now is None else dt.datetime.fromtimestamp(now, dt.UTC)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS clipia_schema_migrations ("
                    "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    row[0]
                    for row in await conn.fetch("SELECT version FROM clipia_schema_migrations")
                }
                for version, sql in MIGRATIONS:
                    if version in done:
                        continue
                    await conn.execute(sql, timeout=_MIGRATION_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO clipia_schema_migrations (version) VALUES ($1)", version
                    )
                    applied.append(version)
                    _LOGGER.info("ledger schema migration %d applied", version)
                await self._partitions(conn, when)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return applied

    async def _partitions(self, conn: asyncpg.Connection, when: dt.datetime) -> None:
        """Create the month partitions from the previous month to ``_MONTHS_AHEAD`` ahead."""
        start = _month_start((when.replace(day=1) - dt.timedelta(days=1)).date())
        for _ in range(_MONTHS_AHEAD + 2):
            end = _next_month(start)
            name = _partition_name(start)
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
            if not exists:
                await conn.execute(
                    f"CREATE TABLE {name} PARTITION OF clipia_ledger "
                    f"FOR VALUES FROM ({start.timestamp()}) TO ({end.timestamp()})"
                )
            start = end
        self._horizon = start.timestamp() - 31 * 86400

    async def _ensure_partitions(self, created_at: float) -> None:
        pool = await self._connect()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await self._partitions(conn, dt.datetime.fromtimestamp(created_at, dt.UTC))
        except asyncpg.PostgresError as exc:  # the DEFAULT partition takes the record anyway
            _LOGGER.warning("could not create ledger partitions ahead: %s", exc.__class__.__name__)

    async def insert(self, record: LedgerRecord) -> bool:
        """See ``LedgerStore.insert`` (group-committed with the records of the same moment)."""
        return await self._inserts.submit((record, None)) is Inserted.INSERTED

    async def insert_counted(self, record: LedgerRecord, counter_seq: int) -> Inserted:
        """See ``CountersLedger.insert_counted`` (group-committed like ``insert``)."""
        return await self._inserts.submit((record, counter_seq))

    def _insert_abandoned(self, item: tuple[LedgerRecord, int | None], result: Inserted) -> None:
        """A record committed after its caller gave up (refused, 503): never dispatched."""
        if result is Inserted.INSERTED:
            void = Settlement(cost=Micro(0), outcome=Outcome.NOT_SENT, now=time.time())
            self._settles.push((item[0].request_id, void))

    async def _insert_many(self, batch: list[tuple[LedgerRecord, int | None]]) -> list[Inserted]:
        newest = max(record.created_at for record, _ in batch)
        if newest >= self._horizon:
            await self._ensure_partitions(newest)
        columns: list[list[Any]] = [[] for _ in range(22)]
        for record, seq in batch:
            for column, value in zip(columns, (*record_values(record), seq), strict=True):
                column.append(value)
        rows = await self._write(_INSERT_MANY, *columns)
        done: dict[str, Inserted] = {}
        for request_id, behind, inserted in rows:
            if inserted:
                done[request_id] = Inserted.INSERTED
            elif behind:
                done.setdefault(request_id, Inserted.BEHIND)
            else:
                done.setdefault(request_id, Inserted.EXISTS)
        out: list[Inserted] = []
        for record, _ in batch:
            # A request id twice in one batch (a replay racing its original): the first wins.
            out.append(done.pop(record.request_id, Inserted.EXISTS))
        return out

    async def settle(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """See ``LedgerStore.settle`` (group-committed with the settlements of the moment)."""
        return await self._settles.submit((request_id, settlement))

    async def _settle_many(self, batch: list[tuple[str, Settlement]]) -> list[LedgerRecord | None]:
        rows = await self._write(
            _SETTLE_MANY,
            [request_id for request_id, _ in batch],
            [s.upstream_id for _, s in batch],
            [s.cost for _, s in batch],
            [s.prompt_tokens for _, s in batch],
            [s.completion_tokens for _, s in batch],
            [s.usage_source.value for _, s in batch],
            [s.outcome.value for _, s in batch],
            [s.now for _, s in batch],
        )
        settled = {row[0]: row_to_record(row) for row in rows}
        # A request id twice in one batch: the row was updated once, by the first.
        return [settled.pop(request_id, None) for request_id, _ in batch]

    async def renew(self, request_id: str, lease_until: float) -> None:
        """See ``LedgerStore.renew``."""
        await self._fetch(
            "UPDATE clipia_ledger SET lease_until = $2 WHERE request_id = $1 "
            "AND state = 'dispatched' AND lease_until < $2",
            request_id,
            lease_until,
        )

    async def correct(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """See ``LedgerStore.correct`` (one statement: the old row locked, then updated)."""
        rows = await self._fetch(
            f"WITH old AS (SELECT {COLUMNS} FROM clipia_ledger WHERE request_id = $1 "  # noqa: S608 - constant columns
            "AND state = 'settled' FOR UPDATE), changed AS (UPDATE clipia_ledger SET cost = $2, "
            "prompt_tokens = $3, completion_tokens = $4, usage_source = $5, "
            "upstream_id = COALESCE($6, clipia_ledger.upstream_id) FROM old "
            "WHERE clipia_ledger.request_id = old.request_id RETURNING 1) "
            f"SELECT {COLUMNS} FROM old",
            request_id,
            settlement.cost,
            settlement.prompt_tokens,
            settlement.completion_tokens,
            settlement.usage_source.value,
            settlement.upstream_id,
        )
        return row_to_record(rows[0]) if rows else None

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``LedgerStore.note_upstream_id`` (once per stream: on a kept connection)."""
        await self._write(
            "UPDATE clipia_ledger SET upstream_id = $2 WHERE request_id = $1 "
            "AND state = 'dispatched'",
            request_id,
            upstream_id,
        )

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``LedgerStore.record``."""
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM clipia_ledger WHERE request_id = $1",  # noqa: S608 - constant columns
            request_id,
        )
        return row_to_record(rows[0]) if rows else None

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``LedgerStore.owner_of``."""
        rows = await self._fetch(
            "SELECT team FROM clipia_ledger WHERE upstream_id = $1 LIMIT 1", upstream_id
        )
        return str(rows[0][0]) if rows else None

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``LedgerStore.dispatched``."""
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM clipia_ledger WHERE state = 'dispatched' ORDER BY created_at"  # noqa: S608 - constant columns
        )
        return [row_to_record(row) for row in rows]

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``LedgerStore.records``."""
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM clipia_ledger WHERE created_at >= $1 AND created_at < $2 "  # noqa: S608 - constant columns
            "ORDER BY created_at",
            since,
            until,
        )
        return [row_to_record(row) for row in rows]

    async def recent(self, *, since: float) -> list[LedgerRecord]:
        """Return the records created after ``since`` (RPM/TPM windows after a rebuild)."""
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM clipia_ledger WHERE created_at > $1",  # noqa: S608 - constant columns
            since,
        )
        return [row_to_record(row) for row in rows]

    async def spent(self, *, since: float) -> list[WindowSpent]:
        """See ``LedgerStore.spent``."""
        pool = await self._connect()
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                return await self._spent(conn, since)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    @staticmethod
    async def _spent(conn: asyncpg.Connection, since: float) -> list[WindowSpent]:
        # The summary the settlements keep (migration 5): windows from ``since`` on.
        rows = await conn.fetch(spent_current(POSTGRES), *horizon_keys(since))
        return [WindowSpent(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def snapshot(self, *, since: float, recent_since: float) -> CountersSnapshot:
        """See ``LedgerStore.snapshot`` (one REPEATABLE READ transaction)."""
        pool = await self._connect()
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                spent = await self._spent(conn, since)
                dispatched = await conn.fetch(
                    f"SELECT {COLUMNS} FROM clipia_ledger WHERE state = 'dispatched'"  # noqa: S608 - constant columns
                )
                recent = await conn.fetch(
                    f"SELECT {COLUMNS} FROM clipia_ledger WHERE created_at > $1",  # noqa: S608 - constant columns
                    recent_since,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return CountersSnapshot(
            spent=spent,
            dispatched=[row_to_record(row) for row in dispatched],
            recent=[row_to_record(row) for row in recent],
        )

    async def team_snapshot(self, team: str, *, since: float, recent_since: float) -> TeamSnapshot:
        """See ``CountersLedger.team_snapshot`` (one REPEATABLE READ transaction)."""
        pool = await self._connect()
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = await conn.fetch(
                    spent_current(POSTGRES, team=True), *horizon_keys(since), team
                )
                dispatched = await conn.fetch(
                    f"SELECT {COLUMNS} FROM clipia_ledger "  # noqa: S608 - constant columns
                    "WHERE state = 'dispatched' AND team = $1",
                    team,
                )
                recent = await conn.fetch(
                    f"SELECT {COLUMNS} FROM clipia_ledger "  # noqa: S608 - constant columns
                    "WHERE created_at > $1 AND team = $2",
                    recent_since,
                    team,
                )
                seq = await conn.fetchval(
                    "SELECT max(counter_seq) FROM clipia_ledger WHERE team = $1", team
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return TeamSnapshot(
            counters=CountersSnapshot(
                spent=[WindowSpent(team, str(r[1]), int(r[2])) for r in rows],
                dispatched=[row_to_record(row) for row in dispatched],
                recent=[row_to_record(row) for row in recent],
            ),
            counter_seq=int(seq or 0),
        )

    def _report_rows(self, query: ReportQuery) -> AsyncIterator[Sequence[Any]]:
        if query.rollup:  # a few thousand rows a month: no parallel scan to wait for
            return self._stream(f"{query.sql} ORDER BY {query.order}", list(query.args))
        return self._aggregate(query.sql, list(query.args), query.order)

    async def _aggregate(self, query: str, args: list[Any], order: str) -> AsyncIterator[Any]:
        """Run an aggregate into a temporary table, then stream it in ``order``.

        A query read through a cursor never runs in parallel in PostgreSQL; ``CREATE TEMP
        TABLE … AS`` may (parallel workers scan the partitions), and the (small) result is then
        streamed. The table lives for the transaction only (``ON COMMIT DROP``): safe behind
        PgBouncer in transaction mode.
        """
        pool = await self._connect()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"CREATE TEMP TABLE clipia_report ON COMMIT DROP AS {query}",
                    *args,
                )
                async for row in conn.cursor(
                    f"SELECT * FROM clipia_report ORDER BY {order}",  # noqa: S608 - column numbers
                    prefetch=_EXPORT_PREFETCH,
                ):
                    yield row
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def _stream(self, query: str, args: list[Any]) -> AsyncIterator[Any]:
        pool = await self._connect()
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                async for row in conn.cursor(query, *args, prefetch=_EXPORT_PREFETCH):
                    yield row
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def open_count(self, *, since: float, until: float, team: str | None) -> int:
        """See ``LedgerStore.open_count``."""
        rows = await self._fetch(
            "SELECT count(*) FROM clipia_ledger WHERE state = 'dispatched' AND created_at >= $1 "
            "AND created_at < $2 AND ($3::text IS NULL OR team = $3)",
            since,
            until,
            team,
        )
        return int(rows[0][0])

    async def export(self, *, since: float, until: float) -> AsyncIterator[LedgerRecord]:
        """See ``LedgerStore.export``."""
        query = (
            f"SELECT {COLUMNS} FROM clipia_ledger WHERE created_at >= $1 AND created_at < $2 "  # noqa: S608 - constant columns
            "ORDER BY created_at"
        )
        async for row in self._stream(query, [since, until]):
            yield row_to_record(row)

    async def prune(self, *, before: float) -> int:
        """See ``LedgerStore.prune``: whole month partitions are dropped."""
        pool = await self._connect()
        removed = 0
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                names = await conn.fetch(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'clipia_ledger'::regclass"
                )
                for (name,) in names:
                    if not name.startswith("clipia_ledger_y"):
                        continue
                    start = dt.datetime(int(name[15:19]), int(name[20:22]), 1, tzinfo=dt.UTC)
                    if _next_month(start).timestamp() <= before:
                        # A dropped table fires no trigger: its sums leave the rollup first.
                        removed += int(await conn.fetchval(f"SELECT count(*) FROM {name}"))  # noqa: S608 - a partition name we made
                        await conn.execute(rollup_upsert(POSTGRES, (name, -1)))
                        await conn.execute(f"DROP TABLE {name}")
                # Deleted from the partition itself (the parent's statement trigger does not
                # run): the rollup is taken from the deleted rows in the same statement.
                removed += int(
                    await conn.fetchval(
                        "WITH gone AS (DELETE FROM clipia_ledger_default WHERE created_at < $1 "  # noqa: S608 - constant SQL
                        f"RETURNING *), rolled AS ({rollup_upsert(POSTGRES, ('gone', -1))}) "
                        "SELECT count(*) FROM gone",
                        before,
                    )
                )
                await conn.execute(rollup_drop_empty(POSTGRES))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return removed

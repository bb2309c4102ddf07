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
fails for a missing month. ``ledger prune`` drops whole month partitions.

A record is committed before ``insert`` returns (each statement is its own transaction;
PostgreSQL's own group commit batches concurrent WAL flushes). ``settle`` is one
``UPDATE … WHERE state = 'dispatched' RETURNING``: idempotent by request id.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg
import msgspec

from clipia_proxy.config import LedgerConfig
from clipia_proxy.quotas.model import Outcome, Period, RecordState, Settlement
from clipia_proxy.quotas.store import LedgerRecord, StoreUnavailable

from . import GROUPINGS, CountersSnapshot, ReportLine, WindowSpent, tag_name

__all__ = ["MIGRATIONS", "PostgresLedger"]

_LOGGER: Final = logging.getLogger(__name__)
_LOCK_KEY: Final = 0x636C6970  # "clip": the migration advisory lock
_MONTHS_AHEAD: Final = 3
_EXPORT_PREFETCH: Final = 2000

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
)
"""(version, SQL): append only; an applied migration is never edited."""

_COLUMNS: Final = (
    "request_id, team, key_id, model, stream, reserved, tokens_reserved, windows, created_at, "
    "lease_until, state, upstream_id, cost, prompt_tokens, completion_tokens, usage_source, "
    "outcome, settled_at, environment, tags, end_user"
)
_INSERT: Final = (
    f"INSERT INTO clipia_ledger ({_COLUMNS}) SELECT $1::text, $2::text, $3::text, $4::text, "  # noqa: S608 - constant columns
    "$5::boolean, $6::bigint, $7::bigint, $8::jsonb, $9::float8, $10::float8, $11::text, "
    "$12::text, $13::bigint, $14::bigint, $15::bigint, $16::text, $17::text, $18::float8, "
    "$19::text, $20::jsonb, $21::text "
    "WHERE NOT EXISTS (SELECT 1 FROM clipia_ledger WHERE request_id = $1) ON CONFLICT DO NOTHING"
)
_SETTLE: Final = (
    "UPDATE clipia_ledger SET state = 'settled', upstream_id = COALESCE($2, upstream_id), "  # noqa: S608 - constant columns
    "cost = $3, prompt_tokens = $4, completion_tokens = $5, usage_source = $6, outcome = $7, "
    f"settled_at = $8 WHERE request_id = $1 AND state = 'dispatched' RETURNING {_COLUMNS}"
)
_GROUP_SQL: Final = {
    "team": "team",
    "model": "COALESCE(NULLIF(model, ''), 'other')",
    "key": "COALESCE(key_id, '')",
    "environment": "environment",
    "user": "COALESCE(end_user, '')",
    "tag": "COALESCE(t.k || '=' || t.v, '')",
    "day": (
        "COALESCE(substr(windows->>'day', 5), "
        "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD'))"
    ),
}
_WINDOWS: Final = msgspec.json.Decoder(dict[Period, str])
_SPENT_WINDOWS: Final = (
    "SELECT team, w.key, SUM(cost)::bigint FROM clipia_ledger "
    "CROSS JOIN LATERAL jsonb_each_text(windows) AS w(period, key) "
    "WHERE state = 'settled' AND created_at > $1 AND w.period NOT IN ('total', 'key_total') "
    "GROUP BY 1, 2"
)
_SPENT_TOTAL: Final = (
    "SELECT team, 'total', SUM(cost)::bigint FROM clipia_ledger "
    "WHERE state = 'settled' AND windows ? 'total' GROUP BY 1 "
    "UNION ALL SELECT team, windows->>'key_total', SUM(cost)::bigint FROM clipia_ledger "
    "WHERE state = 'settled' AND windows ? 'key_total' GROUP BY 1, 2"
)
_TAGS: Final = msgspec.json.Decoder(dict[str, str])


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is (see ``_connect``)."""


def _record(row: Any) -> LedgerRecord:
    windows = row[7]
    return LedgerRecord(
        request_id=row[0],
        team=row[1],
        key_id=row[2],
        model=row[3],
        stream=bool(row[4]),
        reserved=int(row[5]),
        tokens_reserved=int(row[6]),
        windows=_WINDOWS.decode(windows) if isinstance(windows, str | bytes) else dict(windows),
        created_at=float(row[8]),
        lease_until=float(row[9]),
        state=RecordState(row[10]),
        upstream_id=row[11],
        cost=int(row[12]),
        prompt_tokens=int(row[13]),
        completion_tokens=int(row[14]),
        usage_source=row[15],
        outcome=Outcome(row[16]) if row[16] else None,
        settled_at=None if row[17] is None else float(row[17]),
        environment=row[18] or "live",
        tags=_tags(row[19]),
        end_user=row[20],
    )


def _tags(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        return _TAGS.decode(value)
    return {str(k): str(v) for k, v in dict(value).items()}


def _month_start(when: dt.date) -> dt.datetime:
    return dt.datetime(when.year, when.month, 1, tzinfo=dt.UTC)


def _next_month(start: dt.datetime) -> dt.datetime:
    return (start + dt.timedelta(days=32)).replace(day=1)


def _partition_name(start: dt.datetime) -> str:
    return f"clipia_ledger_y{start.year:04d}m{start.month:02d}"


def _group_sql(name: str) -> str:
    tag = tag_name(name)
    if tag is not None:  # a checked identifier: no quote can reach the SQL
        return f"COALESCE(tags->>'{tag}', '')"
    return _GROUP_SQL[name]


class PostgresLedger:
    """The ledger in PostgreSQL (see the module docstring)."""

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
        return self._pool

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        pool = await self._connect()
        try:
            return list(await pool.fetch(query, *args, timeout=self._timeout))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def start(self) -> None:
        """Connect and apply pending migrations (under the advisory lock)."""
        await self.migrate()

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
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
                    await conn.execute(sql)
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
        """See ``LedgerStore.insert``."""
        if record.created_at >= self._horizon:
            await self._ensure_partitions(record.created_at)
        pool = await self._connect()
        try:
            status = await pool.execute(
                _INSERT,
                record.request_id,
                record.team,
                record.key_id,
                record.model,
                record.stream,
                record.reserved,
                record.tokens_reserved,
                msgspec.json.encode(record.windows).decode(),
                record.created_at,
                record.lease_until,
                record.state.value,
                record.upstream_id,
                record.cost,
                record.prompt_tokens,
                record.completion_tokens,
                record.usage_source,
                record.outcome.value if record.outcome else None,
                record.settled_at,
                record.environment,
                msgspec.json.encode(record.tags).decode() if record.tags else None,
                record.end_user,
                timeout=self._timeout,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return bool(status.endswith(" 1"))

    async def settle(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """See ``LedgerStore.settle``."""
        rows = await self._fetch(
            _SETTLE,
            request_id,
            settlement.upstream_id,
            settlement.cost,
            settlement.prompt_tokens,
            settlement.completion_tokens,
            settlement.usage_source.value,
            settlement.outcome.value,
            settlement.now,
        )
        return _record(rows[0]) if rows else None

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
            f"WITH old AS (SELECT {_COLUMNS} FROM clipia_ledger WHERE request_id = $1 "  # noqa: S608 - constant columns
            "AND state = 'settled' FOR UPDATE), changed AS (UPDATE clipia_ledger SET cost = $2, "
            "prompt_tokens = $3, completion_tokens = $4, usage_source = $5, "
            "upstream_id = COALESCE($6, clipia_ledger.upstream_id) FROM old "
            "WHERE clipia_ledger.request_id = old.request_id RETURNING 1) "
            f"SELECT {_COLUMNS} FROM old",
            request_id,
            settlement.cost,
            settlement.prompt_tokens,
            settlement.completion_tokens,
            settlement.usage_source.value,
            settlement.upstream_id,
        )
        return _record(rows[0]) if rows else None

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``LedgerStore.note_upstream_id``."""
        await self._fetch(
            "UPDATE clipia_ledger SET upstream_id = $2 WHERE request_id = $1 "
            "AND state = 'dispatched'",
            request_id,
            upstream_id,
        )

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``LedgerStore.record``."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM clipia_ledger WHERE request_id = $1",  # noqa: S608 - constant columns
            request_id,
        )
        return _record(rows[0]) if rows else None

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``LedgerStore.owner_of``."""
        rows = await self._fetch(
            "SELECT team FROM clipia_ledger WHERE upstream_id = $1 LIMIT 1", upstream_id
        )
        return str(rows[0][0]) if rows else None

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``LedgerStore.dispatched``."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM clipia_ledger WHERE state = 'dispatched' ORDER BY created_at"  # noqa: S608 - constant columns
        )
        return [_record(row) for row in rows]

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``LedgerStore.records``."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM clipia_ledger WHERE created_at >= $1 AND created_at < $2 "  # noqa: S608 - constant columns
            "ORDER BY created_at",
            since,
            until,
        )
        return [_record(row) for row in rows]

    async def recent(self, *, since: float) -> list[LedgerRecord]:
        """Return the records created after ``since`` (RPM/TPM windows after a rebuild)."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM clipia_ledger WHERE created_at > $1",  # noqa: S608 - constant columns
            since,
        )
        return [_record(row) for row in rows]

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
        rows = await conn.fetch(_SPENT_WINDOWS, since)
        totals = await conn.fetch(_SPENT_TOTAL)
        return [WindowSpent(str(r[0]), str(r[1]), int(r[2])) for r in [*rows, *totals]]

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
                    f"SELECT {_COLUMNS} FROM clipia_ledger WHERE state = 'dispatched'"  # noqa: S608 - constant columns
                )
                recent = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM clipia_ledger WHERE created_at > $1",  # noqa: S608 - constant columns
                    recent_since,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return CountersSnapshot(
            spent=spent,
            dispatched=[_record(row) for row in dispatched],
            recent=[_record(row) for row in recent],
        )

    async def report(
        self, *, since: float, until: float, by: tuple[str, ...], team: str | None
    ) -> AsyncIterator[ReportLine]:
        """See ``LedgerStore.report`` (GROUP BY in the database; a cursor streams the lines)."""
        columns = [_group_sql(name) for name in by if name in GROUPINGS or tag_name(name)]
        select = ", ".join(
            f"{expr} AS g{i}" for i, expr in enumerate([*columns, "''"][: max(len(columns), 1)])
        )
        order = ", ".join(str(i + 1) for i in range(len(columns))) or "1"
        where = "state = 'settled' AND created_at >= $1 AND created_at < $2"
        args: list[Any] = [since, until]
        if team is not None:
            where += " AND team = $3"
            args.append(team)
        query = (
            f"SELECT {select}, count(*) AS n, COALESCE(SUM(prompt_tokens), 0)::bigint AS pt, "  # noqa: S608 - constant expressions
            f"COALESCE(SUM(completion_tokens), 0)::bigint AS ct, "
            f"COALESCE(SUM(cost), 0)::bigint AS cost "
            "FROM clipia_ledger "
            + ("LEFT JOIN LATERAL jsonb_each_text(tags) AS t(k, v) ON true " if "tag" in by else "")
            + f"WHERE {where} GROUP BY {order}"
        )
        n = max(len(columns), 1)
        async for row in self._aggregate(query, args, order):
            yield ReportLine(
                group=tuple(str(v) for v in row[: len(columns)]),
                requests=int(row[n]),
                prompt_tokens=int(row[n + 1]),
                completion_tokens=int(row[n + 2]),
                cost=int(row[n + 3]),
            )

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
            f"SELECT {_COLUMNS} FROM clipia_ledger WHERE created_at >= $1 AND created_at < $2 "  # noqa: S608 - constant columns
            "ORDER BY created_at"
        )
        async for row in self._stream(query, [since, until]):
            yield _record(row)

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
                        removed += int(await conn.fetchval(f"SELECT count(*) FROM {name}"))  # noqa: S608 - a partition name we made
                        await conn.execute(f"DROP TABLE {name}")
                status = await conn.execute(
                    "DELETE FROM clipia_ledger_default WHERE created_at < $1", before
                )
                removed += int(status.split()[-1])
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return removed

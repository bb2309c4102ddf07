"""The SQL both ledgers share: the record's columns, the daily rollup, the report's query.

SQLite and PostgreSQL differ here only in a :class:`Dialect` (table names, how a record's day
and a tag's value are read, placeholders); the statements are written once.

**The daily rollup.** ``ledger_daily`` (SQLite) / ``clipia_ledger_daily`` (PostgreSQL) holds,
per budget day (``accounting.timezone``, from the record's ``day`` window), team, environment,
model and key, the settled records' count, tokens and cost. It is kept by the database itself,
with triggers, in the transaction that settles, corrects, inserts or deletes a record, whichever
code does it: it always equals the ``GROUP BY`` of the settled records (a test checks it after
every kind of change). ``report --by`` any of team, environment, model, key and day reads it (a
few thousand rows a month instead of millions of records); ``--by user`` and tags, and
``ledger export``, read the records. PostgreSQL's trigger runs once per statement, upserting
the rows a statement changed in key order, so statements that settle many records at once cannot
deadlock on it.

**The spent summary.** ``ledger_spent`` / ``clipia_ledger_spent``: per team and window key, the
settled cost; counters are rebuilt from it (:func:`spent_current`) without reading records. A
prune never lowers it (a total budget keeps what pruned months spent). SQLite's store adds to
it in the settlement's transaction; PostgreSQL's rollup triggers keep it too (migration 5).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar, Final

import msgspec

from clipia_proxy.quotas.model import Outcome, Period, RecordState
from clipia_proxy.quotas.store import LedgerRecord, ReportLine

__all__ = [
    "COLUMNS",
    "POSTGRES",
    "ROLLUP_GROUPINGS",
    "SETTLED_FIELDS",
    "SQLITE",
    "Dialect",
    "ReportQuery",
    "SqlReports",
    "horizon_keys",
    "record_values",
    "report_query",
    "rollup_drop_empty",
    "rollup_row",
    "rollup_table",
    "rollup_upsert",
    "row_to_record",
    "spent_current",
    "spent_table",
    "spent_upsert",
]

COLUMNS: Final = (
    "request_id, team, key_id, model, stream, reserved, tokens_reserved, windows, created_at, "
    "lease_until, state, upstream_id, cost, prompt_tokens, completion_tokens, usage_source, "
    "outcome, settled_at, environment, tags, end_user"
)
"""A record's columns, in the order of :func:`record_values` and :func:`row_to_record`."""
_WINDOWS: Final = msgspec.json.Decoder(dict[Period, str])
_TAGS: Final = msgspec.json.Decoder(dict[str, str])


def record_values(record: LedgerRecord) -> tuple[Any, ...]:
    """Return a record's values in :data:`COLUMNS` order (JSON columns as text)."""
    return (
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
    )


SETTLED_FIELDS: Final = slice(11, 18)
"""Where a settlement's columns stand in :data:`COLUMNS` / :func:`record_values`: upstream_id,
cost, prompt_tokens, completion_tokens, usage_source, outcome, settled_at."""


def _json(decoder: msgspec.json.Decoder[Any], value: Any) -> Any:
    if isinstance(value, str | bytes):
        return decoder.decode(value)
    return dict(value)


def row_to_record(row: Any) -> LedgerRecord:
    """Return the record of one ``SELECT {COLUMNS}`` row (either database's)."""
    return LedgerRecord(
        request_id=row[0],
        team=row[1],
        key_id=row[2],
        model=row[3],
        stream=bool(row[4]),
        reserved=int(row[5]),
        tokens_reserved=int(row[6]),
        windows=_json(_WINDOWS, row[7]),
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
        tags=_json(_TAGS, row[19]) if row[19] else {},
        end_user=row[20],
    )


class Dialect(msgspec.Struct, frozen=True, kw_only=True):
    """What differs between the two databases' SQL."""

    ledger: str
    daily: str
    spent: str
    """The spent summary: per team and window key, the settled cost (never lowered by a prune)."""
    window: str
    """The spent summary's window column (``window`` is a reserved word in PostgreSQL)."""
    window_each: str
    """A record's windows as rows ``w.value`` (the window keys), joined to a source ``s``."""
    day: str
    """A record's budget day (``YYYY-MM-DD``): its ``day`` window, else its UTC date."""
    tag_value: str
    """A declared tag's value (``{name}``: a checked identifier), empty without it."""
    tag_join: str
    """Joined for ``--by tag``: one row per ``name=value`` as ``t.key``, ``t.value``."""
    placeholder: Callable[[int], str]
    """The ``n``-th (1-based) parameter's placeholder."""


SQLITE: Final = Dialect(
    ledger="ledger",
    daily="ledger_daily",
    spent="ledger_spent",
    window="window",
    window_each="json_each(s.windows) AS w",
    day="COALESCE(substr(json_extract(windows, '$.day'), 5), date(created_at, 'unixepoch'))",
    tag_value="""COALESCE(json_extract(tags, '$."{name}"'), '')""",
    tag_join="LEFT JOIN json_each(ledger.tags) AS t",
    placeholder=lambda _: "?",
)
POSTGRES: Final = Dialect(
    ledger="clipia_ledger",
    daily="clipia_ledger_daily",
    spent="clipia_ledger_spent",
    window="window_key",
    window_each="jsonb_each_text(s.windows) AS w(key, value)",
    day=(
        "COALESCE(substr(windows->>'day', 5), "
        "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD'))"
    ),
    tag_value="COALESCE(tags->>'{name}', '')",
    tag_join="LEFT JOIN LATERAL jsonb_each_text(tags) AS t(key, value) ON true",
    placeholder=lambda n: f"${n}",
)

_RECORD_GROUPS: Final = {
    "team": "team",
    "environment": "environment",
    "model": "COALESCE(NULLIF(model, ''), 'other')",
    "key": "COALESCE(key_id, '')",
    "user": "COALESCE(end_user, '')",
    "tag": "COALESCE(t.key || '=' || t.value, '')",
}
"""``--by`` groupings over the records (``day`` and ``tag:NAME`` come from the dialect)."""
_ROLLUP_COLUMNS: Final = {
    "day": "day",
    "team": "team",
    "environment": "environment",
    "model": "model",
    "key": "key_id",
}
"""The rollup's key: grouping -> its column (values as the records' groupings give them)."""
_ROW_NAMES: Final = (
    "team",
    "environment",
    "model",
    "key_id",
    "windows",
    "created_at",
    "state",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)
"""The record's columns the rollup reads."""
ROLLUP_GROUPINGS: Final = frozenset(_ROLLUP_COLUMNS)
"""``report --by`` groupings the daily rollup can serve."""


def rollup_table(dialect: Dialect, *, integer: str) -> str:
    """``CREATE TABLE`` of the rollup (``integer``: the database's 64-bit integer type)."""
    keys = ", ".join(f"{column} text NOT NULL" for column in _ROLLUP_COLUMNS.values())
    sums = ", ".join(
        f"{name} {integer} NOT NULL"
        for name in ("requests", "prompt_tokens", "completion_tokens", "cost")
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {dialect.daily} ({keys}, {sums}, "
        f"PRIMARY KEY ({', '.join(_ROLLUP_COLUMNS.values())}))"
    )


def rollup_upsert(dialect: Dialect, *sources: tuple[str, int]) -> str:
    """Add (sign 1) or take away (-1) the settled records of each ``(source, sign)``.

    A source is a table or a parenthesised row with the record's columns; rows are upserted
    in key order (one lock order for every statement).
    """
    groups = {**_RECORD_GROUPS, "day": dialect.day}
    keys = ", ".join(
        groups[name] if groups[name] == column else f"{groups[name]} AS {column}"
        for name, column in _ROLLUP_COLUMNS.items()
    )
    signed = " UNION ALL ".join(
        f"SELECT {keys}, {sign} AS n, {sign} * prompt_tokens AS pt, "  # noqa: S608 - constant SQL
        f"{sign} * completion_tokens AS ct, {sign} * cost AS c FROM {source} "
        "WHERE state = 'settled'"
        for source, sign in sources
    )
    columns = ", ".join(_ROLLUP_COLUMNS.values())
    order = ", ".join(str(i + 1) for i in range(len(_ROLLUP_COLUMNS)))
    table = dialect.daily
    return (
        f"INSERT INTO {table} ({columns}, requests, prompt_tokens, completion_tokens, cost) "  # noqa: S608 - constant SQL
        f"SELECT {columns}, SUM(n), SUM(pt), SUM(ct), SUM(c) FROM ({signed}) AS s "
        f"GROUP BY {order} ORDER BY {order} ON CONFLICT ({columns}) DO UPDATE SET "
        f"requests = {table}.requests + excluded.requests, "
        f"prompt_tokens = {table}.prompt_tokens + excluded.prompt_tokens, "
        f"completion_tokens = {table}.completion_tokens + excluded.completion_tokens, "
        f"cost = {table}.cost + excluded.cost"
    )


def spent_table(dialect: Dialect, *, integer: str) -> str:
    """``CREATE TABLE`` of the spent summary (``integer``: the 64-bit integer type)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {dialect.spent} (team text NOT NULL, "
        f"{dialect.window} text NOT NULL, spent {integer} NOT NULL, "
        f"PRIMARY KEY (team, {dialect.window}))"
    )


def spent_upsert(dialect: Dialect, *sources: tuple[str, int]) -> str:
    """Add (1) or take away (-1) each ``(source, sign)``'s settled cost to its windows' spent.

    Rows are upserted in key order, as by :func:`rollup_upsert`.
    """
    signed = " UNION ALL ".join(
        f"SELECT team, windows, {sign} * cost AS c FROM {source} WHERE state = 'settled'"  # noqa: S608 - constant SQL
        for source, sign in sources
    )
    table, window = dialect.spent, dialect.window
    return (
        f"INSERT INTO {table} (team, {window}, spent) SELECT s.team, w.value, SUM(s.c) "  # noqa: S608 - constant SQL
        f"FROM ({signed}) AS s, {dialect.window_each} GROUP BY 1, 2 ORDER BY 1, 2 "
        f"ON CONFLICT (team, {window}) DO UPDATE SET spent = {table}.spent + excluded.spent"
    )


def spent_current(dialect: Dialect, *, team: bool = False) -> str:
    """``(team, window, spent)`` of every window that can still be current (no scan).

    Parameters: :func:`horizon_keys`, then the team when ``team`` (one team's only).
    """
    w, p = dialect.window, dialect.placeholder
    return (
        f"SELECT team, {w}, spent FROM {dialect.spent} WHERE ({w} = 'total' "  # noqa: S608 - constant SQL
        f"OR ({w} >= 'total:' AND {w} < 'total;') "
        f"OR ({w} >= {p(1)} AND {w} < 'day;') OR ({w} >= {p(2)} AND {w} < 'week;') "
        f"OR ({w} >= {p(3)} AND {w} < 'month;'))" + (f" AND team = {p(4)}" if team else "")
    )


def horizon_keys(since: float) -> tuple[str, str, str]:
    """The oldest day, week and month window keys that a record created at ``since`` has."""
    oldest = dt.datetime.fromtimestamp(since, dt.UTC).date()
    return f"day:{oldest.isoformat()}", f"week:{oldest:%G-W%V}", f"month:{oldest:%Y-%m}"


def rollup_row(prefix: str) -> str:
    """A row trigger's ``OLD`` or ``NEW`` record as a source for :func:`rollup_upsert`."""
    return "(SELECT " + ", ".join(f"{prefix}.{name} AS {name}" for name in _ROW_NAMES) + ") AS r"


def rollup_drop_empty(dialect: Dialect) -> str:
    """Delete the rollup rows left with no record (after a prune)."""
    return f"DELETE FROM {dialect.daily} WHERE requests = 0"  # noqa: S608 - constant SQL


class ReportQuery(msgspec.Struct, frozen=True, kw_only=True):
    """The report's ``GROUP BY`` query (unordered), its parameters, how to order it."""

    sql: str
    args: tuple[Any, ...]
    width: int
    """How many group columns each row starts with."""
    order: str
    """``ORDER BY`` of the group columns (PostgreSQL may aggregate in parallel first)."""
    rollup: bool
    """Whether it reads the daily rollup (else the records)."""


def report_query(
    dialect: Dialect,
    by: tuple[str, ...],
    *,
    since: float,
    until: float,
    team: str | None,
    days: tuple[str, str] | None,
) -> ReportQuery:
    """Return the query of ``LedgerStore.report``.

    Over the rollup when ``days`` are given and every grouping is one it keeps, else over the
    settled records of ``[since, until)``. Rows: the groups, then requests, prompt and completion tokens, cost.
    """
    args: tuple[Any, ...]
    if days is not None and ROLLUP_GROUPINGS.issuperset(by):
        columns = [_ROLLUP_COLUMNS[name] for name in by]
        source, period, count, args = dialect.daily, "day", "SUM(requests)", days
        where, having = "true", " HAVING SUM(requests) > 0"
    else:
        groups = {**_RECORD_GROUPS, "day": dialect.day}
        columns = []
        for name in by:
            tag = name.removeprefix("tag:") if name.startswith("tag:") else None
            columns.append(groups[name] if tag is None else dialect.tag_value.format(name=tag))
        source = dialect.ledger + (f" {dialect.tag_join}" if "tag" in by else "")
        period, count, args = "created_at", "count(*)", (since, until)
        where, having = "state = 'settled'", ""
    p = dialect.placeholder
    where += f" AND {period} >= {p(1)} AND {period} < {p(2)}"
    if team is not None:
        where += f" AND team = {p(3)}"
        args = (*args, team)
    select = ", ".join(f"{expr} AS g{i}" for i, expr in enumerate(columns)) or "'' AS g0"
    order = ", ".join(str(i + 1) for i in range(max(len(columns), 1)))
    query = (
        f"SELECT {select}, {count} AS n, COALESCE(SUM(prompt_tokens), 0) AS pt, "  # noqa: S608 - constant expressions
        "COALESCE(SUM(completion_tokens), 0) AS ct, COALESCE(SUM(cost), 0) AS c "
        f"FROM {source} WHERE {where} GROUP BY {order}{having}"
    )
    return ReportQuery(
        sql=query, args=args, width=len(columns), order=order, rollup=period == "day"
    )


class SqlReports:
    """``LedgerStore.report`` of both ledgers.

    :func:`report_query` in the class's dialect; its rows from ``_report_rows`` (how each
    database runs and streams a query).
    """

    dialect: ClassVar[Dialect]

    def _report_rows(self, query: ReportQuery) -> AsyncIterator[Sequence[Any]]:
        raise NotImplementedError

    async def report(
        self,
        *,
        since: float,
        until: float,
        by: tuple[str, ...],
        team: str | None,
        days: tuple[str, str] | None = None,
    ) -> AsyncIterator[ReportLine]:
        """See ``LedgerStore.report``: GROUP BY in the database, lines as they come."""
        query = report_query(self.dialect, by, since=since, until=until, team=team, days=days)
        n = max(query.width, 1)
        async for row in self._report_rows(query):
            yield ReportLine(
                group=tuple(str(v) for v in row[: query.width]),
                requests=int(row[n]),
                prompt_tokens=int(row[n + 1]),
                completion_tokens=int(row[n + 2]),
                cost=int(row[n + 3]),
            )

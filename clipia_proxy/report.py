"""Chargeback from the ledger: sums grouped in the database, streamed out; per-request export.

A period is a calendar month (``2026-11``), an ISO week (``2026-W48``) or a day
(``2026-11-25``) in ``accounting.timezone``; a record belongs to the period that contains its
admission time (the same rule as budgets). Only settled records are summed; records still open
are counted separately so finance can see the report is not final. ``--by`` groups on any of
``team``, ``environment`` (``live``, or ``test`` for sandbox teams), ``model``, ``key`` (the
key id), ``user`` (the recorded end user), ``day`` (the budget day in ``accounting.timezone``),
``tag`` (one line per ``name=value`` a record carries) and ``tag:NAME`` (a declared tag's value);
the default ``team,model`` adds each team's total line (model ``*``). The ledger does the
``GROUP BY``; lines are written as they come, never collected. Rubles are credits times
``accounting.rubles_per_credit``. CSV cells that a spreadsheet would run as a formula
(starting with ``=``, ``+``, ``-``, ``@``, tab or CR) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal
from typing import Final, TextIO
from zoneinfo import ZoneInfo

import msgspec

from .ledgers import GROUPINGS, LedgerStore, ReportLine, tag_name
from .quotas.model import credits
from .quotas.store import LedgerRecord

__all__ = [
    "DEFAULT_BY",
    "EXPORT_COLUMNS",
    "parse_by",
    "parse_period",
    "period_days",
    "write_export",
    "write_report",
]

_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
DEFAULT_BY: Final = ("team", "model")
EXPORT_COLUMNS: Final = (
    "request_id",
    "team",
    "key_id",
    "model",
    "stream",
    "state",
    "outcome",
    "usage_source",
    "upstream_id",
    "created_at",
    "settled_at",
    "reserved",
    "cost",
    "prompt_tokens",
    "completion_tokens",
    "environment",
    "tags",
    "end_user",
)
"""Per-request export columns; amounts in micro-credits, times in epoch seconds; ``tags`` is a
JSON object in CSV (an object in JSON lines)."""


def parse_period(text: str | None, zone: ZoneInfo, *, now: dt.datetime) -> tuple[float, float]:
    """Return ``[since, until)`` in epoch seconds for a period name (default: this month)."""
    local = now.astimezone(zone)
    if text is None:
        text = f"{local:%Y-%m}"
    if match := re.fullmatch(r"(\d{4})-(\d{2})", text):
        start = dt.date(int(match[1]), int(match[2]), 1)
        end = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    elif match := re.fullmatch(r"(\d{4})-W(\d{2})", text):
        start = dt.date.fromisocalendar(int(match[1]), int(match[2]), 1)
        end = start + dt.timedelta(days=7)
    elif match := re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text):
        start = dt.date(int(match[1]), int(match[2]), int(match[3]))
        end = start + dt.timedelta(days=1)
    else:
        raise ValueError(f"unknown period {text!r}: use 2026-11, 2026-W48 or 2026-11-25")
    since = dt.datetime.combine(start, dt.time(0), tzinfo=zone).timestamp()
    until = dt.datetime.combine(end, dt.time(0), tzinfo=zone).timestamp()
    return since, until


def parse_by(values: Iterable[str] | None) -> tuple[str, ...]:
    """Return the groupings of ``--by`` (comma-separated or repeated), in GROUPINGS order."""
    if not values:
        return DEFAULT_BY
    asked = {part.strip() for value in values for part in value.split(",") if part.strip()}
    tags = sorted(name for name in asked if tag_name(name) is not None)
    unknown = asked - set(GROUPINGS) - set(tags)
    if unknown:
        raise ValueError(
            f"unknown --by {', '.join(sorted(unknown))}: use any of {', '.join(GROUPINGS)} "
            "or tag:NAME"
        )
    return (*(name for name in GROUPINGS if name in asked), *tags)


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


async def _with_totals(
    lines: AsyncIterator[ReportLine], by: tuple[str, ...]
) -> AsyncIterator[ReportLine]:
    """Pass ``lines`` on; with the default grouping, add each team's total (model ``*``)."""
    if by != DEFAULT_BY:
        async for line in lines:
            yield line
        return
    total: ReportLine | None = None
    async for line in lines:
        if total is not None and line.group[0] != total.group[0]:
            yield total
            total = None
        total = ReportLine(
            group=(line.group[0], "*"),
            requests=line.requests + (total.requests if total else 0),
            prompt_tokens=line.prompt_tokens + (total.prompt_tokens if total else 0),
            completion_tokens=line.completion_tokens + (total.completion_tokens if total else 0),
            cost=line.cost + (total.cost if total else 0),
        )
        yield line
    if total is not None:
        yield total


def period_days(since: float, until: float, zone: ZoneInfo) -> tuple[str, str]:
    """The first and end day (``YYYY-MM-DD`` in ``zone``) of a period of whole local days."""
    first, end = (dt.datetime.fromtimestamp(t, zone).date().isoformat() for t in (since, until))
    return first, end


async def write_report(
    ledger: LedgerStore,
    out: TextIO,
    *,
    since: float,
    until: float,
    by: tuple[str, ...],
    team: str | None,
    rubles_per_credit: Decimal,
    fmt: str,
    period: str,
    days: tuple[str, str] | None = None,
) -> int:
    """Write the report of ``[since, until)`` to ``out``; return how many records are open.

    ``days``: the period as local days (:func:`period_days`), for the ledger's daily rollup.
    """
    report = ledger.report(since=since, until=until, by=by, team=team, days=days)
    lines = _with_totals(report, by)
    sums = ("requests", "prompt_tokens", "completion_tokens", "credits", "rubles")
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*by, *sums])
        async for line in lines:
            amount = credits(line.cost)
            writer.writerow(
                [
                    *(_cell(value) for value in line.group),
                    line.requests,
                    line.prompt_tokens,
                    line.completion_tokens,
                    amount,
                    amount * rubles_per_credit,
                ]
            )
        return await ledger.open_count(since=since, until=until, team=team)
    head = msgspec.json.encode({"period": period, "by": list(by)}).decode()
    out.write(head[:-1] + ', "rows": [')
    first = True
    async for line in lines:
        amount = credits(line.cost)
        row = {
            **dict(zip(by, line.group, strict=True)),
            "requests": line.requests,
            "prompt_tokens": line.prompt_tokens,
            "completion_tokens": line.completion_tokens,
            "credits": str(amount),
            "rubles": str(amount * rubles_per_credit),
        }
        out.write(("\n  " if first else ",\n  ") + msgspec.json.encode(row).decode())
        first = False
    still_open = await ledger.open_count(since=since, until=until, team=team)
    out.write(f'\n], "open_records": {still_open}}}\n')
    return still_open


def _export_row(record: LedgerRecord) -> list[object]:
    return [
        record.request_id,
        record.team,
        record.key_id or "",
        record.model,
        int(record.stream),
        record.state.value,
        record.outcome.value if record.outcome else "",
        record.usage_source or "",
        record.upstream_id or "",
        record.created_at,
        "" if record.settled_at is None else record.settled_at,
        record.reserved,
        record.cost,
        record.prompt_tokens,
        record.completion_tokens,
        record.environment,
        msgspec.json.encode(record.tags).decode() if record.tags else "",
        record.end_user or "",
    ]


async def write_export(
    ledger: LedgerStore, out: TextIO, *, since: float, until: float, fmt: str
) -> int:
    """Write every record of ``[since, until)`` (``jsonl`` or ``csv``); return how many."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        async for record in ledger.export(since=since, until=until):
            writer.writerow([_cell(v) if isinstance(v, str) else v for v in _export_row(record)])
            count += 1
        return count
    encoder = msgspec.json.Encoder()
    async for record in ledger.export(since=since, until=until):
        row = dict(zip(EXPORT_COLUMNS, _export_row(record), strict=True))
        row["key_id"] = record.key_id
        row["outcome"] = record.outcome.value if record.outcome else None
        row["usage_source"] = record.usage_source
        row["upstream_id"] = record.upstream_id
        row["settled_at"] = record.settled_at
        row["stream"] = record.stream
        row["tags"] = record.tags
        row["end_user"] = record.end_user
        out.write(encoder.encode(row).decode() + "\n")
        count += 1
    return count

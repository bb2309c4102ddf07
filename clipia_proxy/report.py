"""Chargeback reports from the ledger: spend, tokens and requests per team and model.

A period is a calendar month (``2026-11``), an ISO week (``2026-W48``) or a day
(``2026-11-25``) in ``accounting.timezone``; a record belongs to the period that contains its
admission time (the same rule as budgets). Only settled records are summed; records still open
are counted separately so finance can see the report is not final. Rubles are credits times
``accounting.rubles_per_credit``. CSV cells that a spreadsheet would run as a formula (starting
with ``=``, ``+``, ``-``, ``@``, tab or CR) are prefixed with ``'``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from decimal import Decimal
from typing import Final
from zoneinfo import ZoneInfo

import msgspec

from .quotas.model import RecordState, credits
from .quotas.store import LedgerRecord

__all__ = ["ReportRow", "format_csv", "format_json", "parse_period", "summarise"]

_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


class ReportRow(msgspec.Struct, kw_only=True):
    """One line of the report; ``model`` is ``*`` on a team's total line."""

    team: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    credits: Decimal = Decimal(0)
    rubles: Decimal = Decimal(0)


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


def summarise(
    records: list[LedgerRecord], *, rubles_per_credit: Decimal, team: str | None = None
) -> tuple[list[ReportRow], int]:
    """Return the rows (per team and model, then each team's total) and the open-record count."""
    rows: dict[tuple[str, str], ReportRow] = {}
    still_open = 0
    for record in records:
        if team is not None and record.team != team:
            continue
        if record.state is not RecordState.SETTLED:
            still_open += 1
            continue
        for model in (record.model or "other", "*"):
            row = rows.setdefault((record.team, model), ReportRow(team=record.team, model=model))
            row.requests += 1
            row.prompt_tokens += record.prompt_tokens
            row.completion_tokens += record.completion_tokens
            row.credits += credits(record.cost)
    for row in rows.values():
        row.rubles = row.credits * rubles_per_credit
    ordered = sorted(rows.values(), key=lambda r: (r.team, r.model == "*", r.model))
    return ordered, still_open


def _cell(value: object) -> str:
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def format_csv(rows: list[ReportRow]) -> str:
    """Return the rows as CSV (with a header), safe to open in a spreadsheet."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["team", "model", "requests", "prompt_tokens", "completion_tokens", "credits", "rubles"]
    )
    for row in rows:
        writer.writerow(
            [
                _cell(row.team),
                _cell(row.model),
                row.requests,
                row.prompt_tokens,
                row.completion_tokens,
                row.credits,
                row.rubles,
            ]
        )
    return out.getvalue()


def format_json(rows: list[ReportRow], *, period: str, still_open: int) -> str:
    """Return the rows as a JSON document (decimals as strings, exact)."""
    payload = {
        "period": period,
        "open_records": still_open,
        "rows": [
            {
                "team": row.team,
                "model": row.model,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "credits": str(row.credits),
                "rubles": str(row.rubles),
            }
            for row in rows
        ],
    }
    return msgspec.json.format(msgspec.json.encode(payload), indent=2).decode()

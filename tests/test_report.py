"""Chargeback reports: the CLI over a real ledger, periods, CSV safety, exact sums."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import sys
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import msgspec
import pytest

from clipia_proxy.quotas.model import Outcome, RecordState
from clipia_proxy.quotas.store import LedgerRecord
from clipia_proxy.report import format_csv, format_json, parse_period, summarise
from tests.conftest import start_stack, stop_stack, wait_settled

MOSCOW = ZoneInfo("Europe/Moscow")


def _record(team: str, model: str, cost: int, *, settled: bool = True) -> LedgerRecord:
    return LedgerRecord(
        request_id=f"{team}-{model}-{cost}",
        team=team,
        model=model,
        cost=cost,
        prompt_tokens=10,
        completion_tokens=5,
        state=RecordState.SETTLED if settled else RecordState.DISPATCHED,
        outcome=Outcome.COMPLETED if settled else None,
    )


def test_summarise_groups_by_team_and_model_with_totals() -> None:
    records = [
        _record("search", "gpt-5.5", 50_400),
        _record("search", "gpt-5.5", 1),
        _record("search", "claude-sonnet-4-6", 14_240),
        _record("research", "gpt-5.5", 999_999),
        _record("research", "gpt-5.5", 7, settled=False),
    ]
    rows, still_open = summarise(records, rubles_per_credit=Decimal(3))
    assert still_open == 1
    table = [(r.team, r.model, r.requests, r.credits, r.rubles) for r in rows]
    assert table == [
        ("research", "gpt-5.5", 1, Decimal("0.999999"), Decimal("2.999997")),
        ("research", "*", 1, Decimal("0.999999"), Decimal("2.999997")),
        ("search", "claude-sonnet-4-6", 1, Decimal("0.01424"), Decimal("0.04272")),
        ("search", "gpt-5.5", 2, Decimal("0.050401"), Decimal("0.151203")),
        ("search", "*", 3, Decimal("0.064641"), Decimal("0.193923")),
    ]
    only, _ = summarise(records, rubles_per_credit=Decimal(3), team="research")
    assert {r.team for r in only} == {"research"}


@pytest.mark.parametrize("label", ['=HYPERLINK("x")', "+1", "-1", "@SUM(A1)", "\tx"])
def test_csv_escapes_formula_cells(label: str) -> None:
    rows, _ = summarise([_record("search", label, 1)], rubles_per_credit=Decimal(3))
    parsed = list(csv.reader(io.StringIO(format_csv(rows))))
    assert parsed[1][1] == "'" + label


def test_json_is_exact() -> None:
    rows, _ = summarise([_record("search", "gpt-5.5", 1)], rubles_per_credit=Decimal(3))
    doc = msgspec.json.decode(format_json(rows, period="2026-11", still_open=0))
    assert doc["rows"][0]["credits"] == "0.000001"
    assert doc["rows"][0]["rubles"] == "0.000003"


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026-11", dt.datetime(2026, 11, 1), dt.datetime(2026, 12, 1)),
        ("2026-12", dt.datetime(2026, 12, 1), dt.datetime(2027, 1, 1)),
        ("2026-W53", dt.datetime(2026, 12, 28), dt.datetime(2027, 1, 4)),
        ("2028-02-29", dt.datetime(2028, 2, 29), dt.datetime(2028, 3, 1)),
    ],
)
def test_periods_are_local_calendar_windows(
    text: str, start: dt.datetime, end: dt.datetime
) -> None:
    since, until = parse_period(text, MOSCOW, now=dt.datetime.now(dt.UTC))
    assert since == start.replace(tzinfo=MOSCOW).timestamp()
    assert until == end.replace(tzinfo=MOSCOW).timestamp()


def test_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        parse_period("last week", MOSCOW, now=dt.datetime.now(dt.UTC))


async def test_report_command_reads_the_sqlite_ledger(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    stack = await start_stack(store=f"{{backend: sqlite, sqlite_path: {db}}}")
    try:
        async with aiohttp.ClientSession() as session:
            for model in ("gpt-5.5", "gpt-5.5", "fast"):
                async with session.post(
                    f"{stack.base_url}/chat/completions",
                    headers=stack.auth("search"),
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                ) as reply:
                    assert reply.status == 200
        await wait_settled(stack)
        billed = sum(bill.cost for bill in stack.emulator.bills.values())
    finally:
        await stop_stack(stack)
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{backend: sqlite, sqlite_path: {db}}}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipia_proxy",
        "report",
        "--config",
        str(config),
        "--format",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    doc = msgspec.json.decode(out)
    by_model = {(row["team"], row["model"]): row for row in doc["rows"]}
    assert by_model["search", "gpt-5.5"]["requests"] == 2
    assert by_model["search", "claude-sonnet-4-6"]["requests"] == 1
    assert Decimal(by_model["search", "*"]["credits"]) == billed
    assert Decimal(by_model["search", "*"]["rubles"]) == billed * 3
    assert doc["open_records"] == 0

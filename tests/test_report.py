"""Chargeback reports: the CLI over a real ledger, periods, CSV safety, exact sums."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import msgspec
import pytest

from clipia_proxy import cli
from clipia_proxy.ledgers import LedgerStore
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.ledgers.sqlite import SqliteLedger
from clipia_proxy.quotas.model import Micro, Period, Settlement
from clipia_proxy.quotas.store import LedgerRecord
from clipia_proxy.report import EXPORT_COLUMNS, parse_by, parse_period, write_export, write_report
from tests.conftest import fresh_postgres_schema
from tests.harness import run_report, sqlite_report_config, start_stack, stop_stack, wait_settled

MOSCOW = ZoneInfo("Europe/Moscow")


T0 = dt.datetime(2026, 11, 10, 12, tzinfo=MOSCOW).timestamp()
NOV = parse_period("2026-11", MOSCOW, now=dt.datetime.now(dt.UTC))


def _record(
    team: str, model: str, cost: int, *, settled: bool = True, key: str = "k1", day: int = 10
) -> tuple[LedgerRecord, Settlement | None]:
    created = T0 + (day - 10) * 86400
    record = LedgerRecord(
        request_id=f"{team}-{model}-{cost}-{key}-{day}",
        team=team,
        key_id=key,
        model=model,
        reserved=cost + 10,
        windows={Period.DAY: f"day:2026-11-{day:02d}", Period.MONTH: "month:2026-11"},
        created_at=created,
        lease_until=created + 600,
    )
    settlement = (
        Settlement(cost=Micro(cost), prompt_tokens=10, completion_tokens=5, now=created)
        if settled
        else None
    )
    return record, settlement


RECORDS = [
    _record("search", "gpt-5.5", 50_400),
    _record("search", "gpt-5.5", 1, key="k2", day=11),
    _record("search", "claude-sonnet-4-6", 14_240),
    _record("research", "gpt-5.5", 999_999),
    _record("research", "gpt-5.5", 7, settled=False),
]


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    made: LedgerStore
    if request.param == "sqlite":
        made = SqliteLedger(tmp_path / "ledger.db")
    else:
        made = PostgresLedger(await fresh_postgres_schema(request.getfixturevalue("postgres_dsn")))
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def fill(ledger: LedgerStore, records: list[tuple[LedgerRecord, Settlement | None]]) -> None:
    for record, settlement in records:
        assert await ledger.insert(record)
        if settlement is not None:
            assert await ledger.settle(record.request_id, settlement) is not None


async def report(ledger: LedgerStore, fmt: str = "csv", **kwargs: object) -> tuple[str, int]:
    out = io.StringIO()
    options: dict[str, object] = {"by": ("team", "model"), "team": None, **kwargs}
    still_open = await write_report(
        ledger,
        out,
        since=NOV[0],
        until=NOV[1],
        rubles_per_credit=Decimal(3),
        fmt=fmt,
        period="2026-11",
        **options,  # type: ignore[arg-type]
    )
    return out.getvalue(), still_open


async def test_report_groups_in_the_database_with_team_totals(ledger: LedgerStore) -> None:
    await fill(ledger, RECORDS)
    text, still_open = await report(ledger)
    assert still_open == 1
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [
        "team", "model", "requests", "prompt_tokens", "completion_tokens", "credits", "rubles"
    ]  # fmt: skip
    assert [(r[0], r[1], r[2], r[5], r[6]) for r in rows[1:]] == [
        ("research", "gpt-5.5", "1", "0.999999", "2.999997"),
        ("research", "*", "1", "0.999999", "2.999997"),
        ("search", "claude-sonnet-4-6", "1", "0.01424", "0.04272"),
        ("search", "gpt-5.5", "2", "0.050401", "0.151203"),
        ("search", "*", "3", "0.064641", "0.193923"),
    ]
    only, _ = await report(ledger, team="research")
    assert {r[0] for r in list(csv.reader(io.StringIO(only)))[1:]} == {"research"}


async def test_report_by_key_and_day(ledger: LedgerStore) -> None:
    await fill(ledger, RECORDS)
    text, _ = await report(ledger, by=parse_by(["day,key", "team"]))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:3] == ["team", "key", "day"]
    assert [tuple(r[:4]) for r in rows[1:]] == [
        ("research", "k1", "2026-11-10", "1"),
        ("search", "k1", "2026-11-10", "2"),
        ("search", "k2", "2026-11-11", "1"),
    ]
    with pytest.raises(ValueError, match="unknown --by"):
        parse_by(["team,colour"])


@pytest.mark.parametrize("label", ['=HYPERLINK("x")', "+1", "-1", "@SUM(A1)", "\tx"])
async def test_csv_escapes_formula_cells(tmp_path: Path, label: str) -> None:
    ledger = SqliteLedger(tmp_path / "l.db")
    await ledger.start()
    try:
        await fill(ledger, [_record("search", label, 1)])
        text, _ = await report(ledger)
    finally:
        await ledger.close()
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[1][1] == "'" + label


async def test_json_is_exact(ledger: LedgerStore) -> None:
    await fill(ledger, [_record("search", "gpt-5.5", 1)])
    text, _ = await report(ledger, fmt="json")
    doc = msgspec.json.decode(text)
    assert doc["rows"][0]["credits"] == "0.000001"
    assert doc["rows"][0]["rubles"] == "0.000003"
    assert doc["open_records"] == 0


async def test_export_writes_every_record_of_the_period(ledger: LedgerStore) -> None:
    await fill(ledger, RECORDS)
    out = io.StringIO()
    assert await write_export(ledger, out, since=NOV[0], until=NOV[1], fmt="jsonl") == 5
    rows = [msgspec.json.decode(line) for line in out.getvalue().splitlines()]
    assert sum(row["cost"] for row in rows) == 50_400 + 1 + 14_240 + 999_999
    assert {row["state"] for row in rows} == {"settled", "dispatched"}
    assert rows[0]["key_id"] == "k1"
    assert (rows[0]["environment"], rows[0]["tags"], rows[0]["end_user"]) == ("live", {}, None)
    out = io.StringIO()
    assert await write_export(ledger, out, since=NOV[0], until=NOV[1], fmt="csv") == 5
    table = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(table[0]) == EXPORT_COLUMNS
    assert len(table) == 6


async def test_prune_keeps_the_current_and_previous_month(
    ledger: LedgerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = dt.datetime.now(MOSCOW)
    this_month = dt.datetime(now.year, now.month, 1, 12, tzinfo=MOSCOW).timestamp()
    ages = {"current": this_month, "previous": this_month - 20 * 86400}
    ages["older"] = this_month - 80 * 86400
    for name, created in ages.items():
        record, settlement = _record("search", name, 5)
        record.created_at = created
        await fill(ledger, [(record, settlement)])
    text = "ledger: {retention_months: 2}\n"
    if isinstance(ledger, PostgresLedger):
        monkeypatch.setenv("CLIPIA_TEST_PRUNE_DSN", ledger.dsn)
        text = "ledger: {retention_months: 2, backend: postgres, postgres_dsn_env: CLIPIA_TEST_PRUNE_DSN}\n"
    else:
        text += f"store: {{sqlite_path: {tmp_path / 'ledger.db'}}}\n"
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert await asyncio.to_thread(cli.main, ["ledger", "prune", "--config", str(config)]) == 0
    left = {r.model for r in await ledger.records(since=0, until=this_month + 86400 * 40)}
    assert left == {"current", "previous"}


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
    doc = await run_report(sqlite_report_config(tmp_path, db))
    by_model = {(row["team"], row["model"]): row for row in doc["rows"]}
    assert by_model["search", "gpt-5.5"]["requests"] == 2
    assert by_model["search", "claude-sonnet-4-6"]["requests"] == 1
    assert Decimal(by_model["search", "*"]["credits"]) == billed
    assert Decimal(by_model["search", "*"]["rubles"]) == billed * 3
    assert doc["open_records"] == 0

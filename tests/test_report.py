"""Chargeback reports: the CLI over a real ledger, periods, CSV safety, exact sums."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import itertools
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import msgspec
import pytest
import yaml

from clipia_proxy import cli
from clipia_proxy.ledgers import LedgerStore, ReportLine
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.ledgers.sqlite import SqliteLedger
from clipia_proxy.quotas.model import Micro, Period, RecordState, Settlement
from clipia_proxy.quotas.store import LedgerRecord
from clipia_proxy.report import EXPORT_COLUMNS, parse_by, parse_period, write_export, write_report
from tests.conftest import fresh_postgres_schema
from tests.harness import (
    run_cli,
    run_report,
    serve,
    sqlite_report_config,
    start_emulator,
    start_stack,
    stop_stack,
    wait_settled,
)

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


ROLLUP_BY = ("team", "environment", "model", "key", "day")
NOV_DAYS = ("2026-11-01", "2026-12-01")


async def _lines(
    ledger: LedgerStore, by: tuple[str, ...], *, days: tuple[str, str] | None, team: str | None
) -> list[ReportLine]:
    report = ledger.report(since=NOV[0], until=NOV[1], by=by, team=team, days=days)
    return [line async for line in report]


async def _rollup_rows(ledger: LedgerStore, tmp_path: Path) -> list[tuple[str, int, int]]:
    """(day, requests, cost) of the rollup table itself, read beside the ledger."""
    query = "SELECT day, SUM(requests), SUM(cost) FROM {} GROUP BY day ORDER BY day"
    if isinstance(ledger, PostgresLedger):
        conn = await asyncpg.connect(ledger.dsn)
        try:
            rows = await conn.fetch(query.format("clipia_ledger_daily"))
        finally:
            await conn.close()
    else:

        def read() -> list[Any]:
            with contextlib.closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
                return db.execute(query.format("ledger_daily")).fetchall()

        rows = await asyncio.to_thread(read)
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def _at(local: dt.datetime, request_id: str, cost: int, **fields: Any) -> LedgerRecord:
    """A record admitted at ``local`` (Moscow) with its day and month windows."""
    return LedgerRecord(
        request_id=request_id,
        team=fields.pop("team", "search"),
        key_id=fields.pop("key_id", "k1"),
        model=fields.pop("model", "gpt-5.5"),
        reserved=cost + 10,
        windows={Period.DAY: f"day:{local:%Y-%m-%d}", Period.MONTH: f"month:{local:%Y-%m}"},
        created_at=local.timestamp(),
        lease_until=local.timestamp() + 600,
        **fields,
    )


async def test_the_daily_rollup_equals_the_records_after_every_kind_of_change(
    ledger: LedgerStore, tmp_path: Path
) -> None:
    """Reports over the rollup == reports over the records, for every rollup grouping.

    After settlements, a correction, a record imported settled, an open one, and prunes; local
    midnights at the month's edges fall on the right side.
    """
    await fill(ledger, RECORDS)
    edges = [
        _at(dt.datetime(2026, 11, 1, 0, 5, tzinfo=MOSCOW), "first-minute", 700),  # 31 Oct UTC
        _at(dt.datetime(2026, 11, 30, 23, 55, tzinfo=MOSCOW), "last-minute", 800),
        _at(dt.datetime(2026, 12, 1, 0, 5, tzinfo=MOSCOW), "next-month", 900),  # 30 Nov UTC
        _at(dt.datetime(2026, 10, 31, 23, 55, tzinfo=MOSCOW), "last-month", 600),
        _at(dt.datetime(2026, 11, 12, 9, tzinfo=MOSCOW), "sandbox", 55, environment="test"),
        _at(dt.datetime(2026, 11, 12, 9, tzinfo=MOSCOW), "no-key", 66, key_id=None, model=""),
    ]
    for record in edges:
        await fill(ledger, [(record, Settlement(cost=Micro(record.reserved - 10), now=T0))])
    imported = _at(dt.datetime(2026, 11, 13, 9, tzinfo=MOSCOW), "imported", 0)
    imported.state, imported.cost, imported.prompt_tokens = RecordState.SETTLED, 4321, 9
    assert await ledger.insert(imported)
    corrected = RECORDS[0][0].request_id
    assert await ledger.correct(corrected, Settlement(cost=Micro(60_000), prompt_tokens=12))

    async def same_reports() -> None:
        for size in range(1, len(ROLLUP_BY) + 1):
            for by in itertools.combinations(ROLLUP_BY, size):
                for team in (None, "search"):
                    rolled = await _lines(ledger, by, days=NOV_DAYS, team=team)
                    assert rolled == await _lines(ledger, by, days=None, team=team), (by, team)

    await same_reports()
    totals = await _lines(ledger, ("team",), days=NOV_DAYS, team=None)
    assert {line.group: (line.requests, line.cost) for line in totals} == {
        ("research",): (1, 999_999),
        ("search",): (8, 60_000 + 1 + 14_240 + 700 + 800 + 55 + 66 + 4321),
    }
    by_day = {d: (n, c) for d, n, c in await _rollup_rows(ledger, tmp_path)}
    assert by_day["2026-10-31"] == (1, 600)
    assert by_day["2026-11-01"] == (1, 700)
    assert by_day["2026-12-01"] == (1, 900)

    # October goes (the default partition on PostgreSQL): the rollup forgets it too.
    await ledger.prune(before=NOV[0])
    await same_reports()
    assert "2026-10-31" not in {d for d, _, _ in await _rollup_rows(ledger, tmp_path)}
    # Everything goes (whole month partitions dropped on PostgreSQL): nothing is left.
    await ledger.prune(before=dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp())
    assert await _rollup_rows(ledger, tmp_path) == []
    assert await _lines(ledger, ("team",), days=NOV_DAYS, team=None) == []


async def _cli_config(ledger: LedgerStore, tmp_path: Path, store: str = "sqlite") -> Path:
    """A config naming ``ledger`` (PostgreSQL: its DSN in an env var the children inherit)."""
    config = tmp_path / "cli.yaml"
    if isinstance(ledger, PostgresLedger):
        config.write_text(
            f"store: {{backend: {store}}}\n"
            f"ledger: {{backend: postgres, postgres_dsn_env: {CLI_DSN_ENV}}}\n"
        )
    else:
        config.write_text(f"store: {{backend: sqlite, sqlite_path: {tmp_path / 'ledger.db'}}}\n")
    return config


CLI_DSN_ENV = "CLIPIA_TEST_CLI_LEDGER_DSN"


async def _command(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    code, out, err = await run_cli(*argv, env=env, within=60)
    return code, out.decode(), err.decode()


def _env(ledger: LedgerStore) -> dict[str, str]:
    """What the commands need in their environment beside this process's."""
    env = {"CLIPIA_API_KEY": "unused"}
    if isinstance(ledger, PostgresLedger):
        env[CLI_DSN_ENV] = ledger.dsn
    return env


async def test_report_and_export_commands_on_each_ledger(
    ledger: LedgerStore, tmp_path: Path
) -> None:
    """``report`` (rollup and record groupings) and ``ledger export`` through the command line."""
    await fill(ledger, RECORDS)
    config, env = str(await _cli_config(ledger, tmp_path)), _env(ledger)
    code, out, err = await _command(
        "report", "--config", config, "--period", "2026-11", "--format", "json", env=env
    )
    assert code == 0, err
    assert err == "report: 1 record(s) of 2026-11 are not settled yet\n"
    doc = msgspec.json.decode(out)
    assert [(r["team"], r["model"], r["requests"], r["credits"]) for r in doc["rows"]] == [
        ("research", "gpt-5.5", 1, "0.999999"),
        ("research", "*", 1, "0.999999"),
        ("search", "claude-sonnet-4-6", 1, "0.01424"),
        ("search", "gpt-5.5", 2, "0.050401"),
        ("search", "*", 3, "0.064641"),
    ]
    assert doc["open_records"] == 1
    code, out, err = await _command(
        "report", "--config", config, "--period", "2026-11", "--by", "team,key,day", env=env
    )
    assert code == 0, err
    assert [tuple(r[:4]) for r in csv.reader(io.StringIO(out))] == [
        ("team", "key", "day", "requests"),
        ("research", "k1", "2026-11-10", "1"),
        ("search", "k1", "2026-11-10", "2"),
        ("search", "k2", "2026-11-11", "1"),
    ]
    code, out, err = await _command(
        "report", "--config", config, "--period", "2026-W46", "--by", "user", "--team", "search",
        env=env,
    )  # fmt: skip
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out)))[1][:2] == ["", "3"]
    code, out, err = await _command(
        "ledger", "export", "--config", config, "--period", "2026-11", "--format", "csv", env=env
    )
    assert code == 0, err
    assert err == "ledger export: 5 record(s) of 2026-11\n"
    table = list(csv.DictReader(io.StringIO(out)))
    assert sorted(int(row["cost"]) for row in table) == [0, 1, 14_240, 50_400, 999_999]
    code, _, err = await _command("report", "--config", config, "--period", "last week", env=env)
    assert (code, err.startswith("report: unknown period")) == (2, True)


async def test_serve_starts_with_this_months_spend_from_each_ledger(
    ledger: LedgerStore, tmp_path: Path
) -> None:
    """``clipia-proxy serve`` starts with the spend a ledger already holds.

    The team over its budget is refused from the first request: its spend was read at
    start-up (from the summary on SQLite, by SQL on PostgreSQL), not lost.
    """
    from bench.run import UPSTREAM_KEY_ENV, gateway_config
    from clipia_proxy.auth import generate_key
    from clipia_proxy.quotas.periods import windows
    from clipia_proxy.quotas.service import ALL_PERIODS

    emulator = await start_emulator()
    team_key = generate_key()
    settings = yaml.safe_load(
        gateway_config(port=0, admin_port=0, emulator_port=emulator.port, team_key=team_key)
    )
    settings["teams"][0]["budget"] = {"month": 1}  # credits
    settings["accounting"] = {"timezone": "Europe/Moscow"}
    config = await _cli_config(ledger, tmp_path, store="memory")
    settings.update(yaml.safe_load(config.read_text()))
    config.write_text(yaml.safe_dump(settings))
    now = dt.datetime.now(dt.UTC)
    spent = LedgerRecord(
        request_id="spent-before",
        team="bench",
        key_id="bench-1",
        model="gpt-5.5",
        reserved=2_000_000,
        windows={p: w.key for p, w in windows(ALL_PERIODS, now, MOSCOW).items()},
        created_at=now.timestamp() - 60,
        lease_until=now.timestamp() + 600,
    )
    await fill(ledger, [(spent, Settlement(cost=Micro(1_500_000), now=now.timestamp()))])
    await ledger.close()  # the gateway alone on the file
    served = None
    try:
        served = await serve(
            config,
            env={**_env(ledger), UPSTREAM_KEY_ENV: emulator.clipia_key},
            log=tmp_path / "gateway.log",
            within=60,
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{served.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {team_key}"},
                json={"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]},
            ) as reply,
        ):
            body = await reply.json()
        assert (reply.status, body["error"]["code"]) == (402, "budget_exceeded"), body
        assert emulator.state.bills == {}
    finally:
        if served is not None:
            await served.stop()
        await emulator.stop()
        await ledger.start()  # the fixture closes it

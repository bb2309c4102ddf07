"""Benchmark the ledger at volume: start-up over a big SQLite file, and ``report``.

``python -m bench.ledger --rows 1000000`` fills a SQLite ledger with synthetic settled records
(one calendar month, 20 teams, 5 models, 200 keys), then measures:

- the SQLite store's start-up (open, counters rebuilt from the file) in this process;
- ``clipia-proxy report --by team,model`` and ``--by team,key,day`` in a child process: wall
  time and the child's peak RSS;
- with ``--postgres``, the same report over a PostgreSQL ledger (a throw-away cluster from
  ``tests/pg_server.py``) filled with the same rows by ``COPY``.

Targets (README "Benchmarks"): report over 1M SQLite rows ≤ 5 s and ≤ 200 MB RSS; start-up
with 1M rows ≤ 2 s; report over 10M PostgreSQL rows ≤ 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from clipia_proxy.quotas.sqlite import SCHEMA, SqliteStore, prepare

_MONTH = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
COLUMNS = (
    "request_id, team, key_id, model, stream, reserved, tokens_reserved, windows, created_at, "
    "lease_until, state, upstream_id, cost, prompt_tokens, completion_tokens, usage_source, "
    "outcome, settled_at"
)
"""The columns the synthetic rows fill (the others keep their defaults)."""
_MODELS = ("gpt-5.5", "gpt-5.5-mini", "claude-sonnet-4-6", "claude-haiku-4-5", "gemini-3-pro")


def _rows(count: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(seed)
    start = _MONTH.timestamp() + 3 * 3600  # inside the month in Moscow time too
    span = 27 * 86400
    for index in range(count):
        created = start + span * index / count
        day = dt.datetime.fromtimestamp(created + 3 * 3600, dt.UTC).date()
        team = f"team-{index % 20:02d}"
        windows = (
            f'{{"day":"day:{day.isoformat()}","week":"week:{day:%G-W%V}",'
            f'"month":"month:{day:%Y-%m}","total":"total"}}'
        )
        cost = rng.randint(100, 80_000)
        yield (
            f"req-{index:09d}",
            team,
            f"{team}-key-{index % 10}",
            _MODELS[(index // 20) % len(_MODELS)],
            index % 2,
            cost * 3,
            4096,
            windows,
            created,
            created + 600,
            "settled",
            f"gen-{index:09d}",
            cost,
            rng.randint(10, 2000),
            rng.randint(1, 500),
            "stream" if index % 2 else "response",
            "completed",
            created + 2,
        )


def fill_sqlite(path: Path, count: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA page_size=1024")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    placeholders = ", ".join("?" * 18)
    rows = _rows(count)
    while True:
        chunk = [row for _, row in zip(range(50_000), rows, strict=False)]
        if not chunk:
            break
        db.execute("BEGIN")
        db.executemany(f"INSERT INTO ledger ({COLUMNS}) VALUES ({placeholders})", chunk)  # noqa: S608 - constant columns
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def summarise_sqlite(path: Path) -> float:
    """Fill the spent summary as the settlements would have; return the seconds it took.

    It is also what the first start of a file written before the summary existed costs.
    """
    db = sqlite3.connect(path, isolation_level=None)
    began = time.perf_counter()
    db.execute("DROP TABLE IF EXISTS ledger_spent")
    prepare(db)
    took = time.perf_counter() - began
    db.close()
    return took


async def fill_postgres(dsn: str, count: int) -> None:
    from clipia_proxy.ledgers.postgres import PostgresLedger

    ledger = PostgresLedger(dsn)
    await ledger.migrate(now=_MONTH.timestamp() + 86400)
    await ledger.close()
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        columns = [name.strip() for name in COLUMNS.split(",")]
        rows = _rows(count)
        while True:
            chunk = [
                (*row[:4], bool(row[4]), *row[5:])
                for _, row in zip(range(100_000), rows, strict=False)
            ]
            if not chunk:
                break
            await conn.copy_records_to_table("clipia_ledger", records=chunk, columns=columns)
        await conn.execute("ANALYZE clipia_ledger")
    finally:
        await conn.close()


def startup_seconds(path: Path) -> tuple[float, float]:
    """The SQLite store's start-up over ``path``: (wall seconds, CPU seconds of this process)."""

    async def start() -> tuple[float, float]:
        store = SqliteStore(path, clock=lambda: _MONTH.timestamp() + 28 * 86400)
        began, cpu = time.perf_counter(), time.process_time()
        await store.start()
        took = (time.perf_counter() - began, time.process_time() - cpu)
        await store.close()
        return took

    return asyncio.run(start())


def run_report(config: Path, by: str, env: dict[str, str]) -> dict[str, float]:
    """Run ``report`` in a child; return its wall and CPU seconds and peak RSS (MiB).

    RSS is sampled every 20 ms with psutil (``ru_maxrss`` of a child counts the parent's
    pages it had before ``exec``).
    """
    import psutil

    began = time.perf_counter()
    child = psutil.Popen(
        [
            sys.executable,
            "-m",
            "clipia_proxy",
            "report",
            "--config",
            str(config),
            "--period",
            "2026-11",
            "--by",
            by,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    peak, cpu, lines = 0, 0.0, 0
    assert child.stdout is not None
    os.set_blocking(child.stdout.fileno(), False)
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, child.memory_info().rss)
            times = child.cpu_times()
            cpu = times.user + times.system
        lines += (child.stdout.read() or b"").count(b"\n")
        time.sleep(0.02)
    lines += (child.stdout.read() or b"").count(b"\n")
    took = time.perf_counter() - began
    return {
        "seconds": round(took, 2),
        "cpu_seconds": round(cpu, 2),
        "peak_rss_mib": round(peak / 2**20, 1),
        "lines": lines - 1,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true", help="also a PostgreSQL ledger")
    parser.add_argument("--pg-rows", type=int, default=None, help="rows for PostgreSQL")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"rows": args.rows}
    env = {**os.environ, "CLIPIA_API_KEY": "unused"}
    with tempfile.TemporaryDirectory(prefix="clipia-bench-ledger-") as tmp:
        db = Path(tmp) / "ledger.db"
        began = time.perf_counter()
        fill_sqlite(db, args.rows)
        results["sqlite_fill_seconds"] = round(time.perf_counter() - began, 1)
        results["sqlite_file_mib"] = round(db.stat().st_size / 2**20, 1)
        results["sqlite_summary_backfill_seconds"] = round(summarise_sqlite(db), 2)
        wall, cpu = startup_seconds(db)
        results["sqlite_startup_seconds"] = round(wall, 3)
        results["sqlite_startup_cpu_seconds"] = round(cpu, 3)
        config = Path(tmp) / "config.yaml"
        config.write_text(f"store: {{backend: sqlite, sqlite_path: {db}}}\n")
        results["sqlite_report_team_model"] = run_report(config, "team,model", env)
        results["sqlite_report_team_key_day"] = run_report(config, "team,key,day", env)
        if args.postgres:
            from tests.pg_server import postgres_server

            pg_rows = args.pg_rows or args.rows
            with postgres_server() as dsn:
                began = time.perf_counter()
                asyncio.run(fill_postgres(dsn, pg_rows))
                results["postgres_rows"] = pg_rows
                results["postgres_fill_seconds"] = round(time.perf_counter() - began, 1)
                pg_config = Path(tmp) / "pg.yaml"
                pg_config.write_text(
                    "ledger: {backend: postgres, postgres_dsn_env: CLIPIA_BENCH_LEDGER_DSN}\n"
                )
                pg_env = {**env, "CLIPIA_BENCH_LEDGER_DSN": dsn}
                results["postgres_report_team_model"] = run_report(pg_config, "team,model", pg_env)
                results["postgres_report_team_key_day"] = run_report(
                    pg_config, "team,key,day", pg_env
                )
    text = msgspec.json.format(msgspec.json.encode(results), indent=2).decode()
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

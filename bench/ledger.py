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

from clipia_proxy.quotas.ledger_sql import POSTGRES, SQLITE, rollup_upsert
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


def rollup_sqlite(path: Path) -> float:
    """Sum the daily rollup again from the records; return the seconds it took."""
    db = sqlite3.connect(path, isolation_level=None)
    began = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    db.execute(f"DELETE FROM {SQLITE.daily}")  # noqa: S608 - constant name
    db.execute(rollup_upsert(SQLITE, ("ledger", 1)))
    db.execute("COMMIT")
    took = time.perf_counter() - began
    db.close()
    return took


_PG_FILL = f"""
INSERT INTO clipia_ledger ({COLUMNS})
SELECT 'req-' || lpad(i::text, 9, '0'), team, team || '-key-' || (i % 10),
    (ARRAY{list(_MODELS)!r})[(i / 20) % {len(_MODELS)} + 1], i % 2 = 1, cost * 3, 4096,
    jsonb_build_object('day', 'day:' || to_char(local, 'YYYY-MM-DD'),
        'week', 'week:' || to_char(local, 'IYYY-"W"IW'), 'month', 'month:' || to_char(local, 'YYYY-MM'),
        'total', 'total'),
    created, created + 600, 'settled', 'gen-' || lpad(i::text, 9, '0'), cost,
    10 + (random() * 1990)::bigint, 1 + (random() * 499)::bigint,
    CASE WHEN i % 2 = 1 THEN 'stream' ELSE 'response' END, 'completed', created + 2
FROM (
    SELECT i, 'team-' || lpad((i % 20)::text, 2, '0') AS team, created,
        to_timestamp(created + 3 * 3600) AT TIME ZONE 'UTC' AS local,
        (100 + random() * 79900)::bigint AS cost
    FROM (
        SELECT i, $3::float8 + $4::float8 * i / $5::float8 AS created
        FROM generate_series($1::bigint, $2::bigint - 1) AS i
    ) AS t
) AS r
"""  # noqa: S608 - constant SQL
"""The rows of ``_rows`` (same teams, keys, models and spread; costs drawn by PostgreSQL),
made by the server itself: 10M rows in minutes, no client round trip per row."""


async def fill_postgres(dsn: str, count: int) -> float:
    """Fill a PostgreSQL ledger; return the seconds its daily rollup took to sum once."""
    from clipia_proxy.ledgers.postgres import PostgresLedger

    ledger = PostgresLedger(dsn)
    await ledger.migrate(now=_MONTH.timestamp() + 86400)
    await ledger.close()
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        # Rows as an import would bring them, with the rollup's triggers off (the server's
        # superuser may): the rollup is summed once after, as migration 3 does on an older
        # ledger (timed apart).
        await conn.execute("SET session_replication_role = replica")
        start = _MONTH.timestamp() + 3 * 3600
        step = 1_000_000
        for first in range(0, count, step):
            await conn.execute(
                _PG_FILL,
                first,
                min(first + step, count),
                start,
                27 * 86400.0,
                float(count),
                timeout=None,
            )
        await conn.execute("RESET session_replication_role")
        await conn.execute("ANALYZE clipia_ledger", timeout=None)
        began = time.perf_counter()
        async with conn.transaction():
            await conn.execute(f"TRUNCATE {POSTGRES.daily}")
            await conn.execute(rollup_upsert(POSTGRES, ("clipia_ledger", 1)), timeout=None)
        return time.perf_counter() - began
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
        # ``-m`` puts the working directory first on sys.path: the code's own folder.
        cwd=env.get("PYTHONPATH") or None,
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
        "exit": child.returncode,
    }


def _server_cpu(pid: int | None) -> float:
    """CPU seconds of a PostgreSQL server so far.

    The postmaster, its live children and the children it reaped (backends and parallel
    workers that have exited).
    """
    if pid is None:
        return 0.0
    import psutil

    root = psutil.Process(pid)
    times = root.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in root.children():
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            total += t.user + t.system
    return total


def _postmaster(dsn: str) -> int | None:
    async def data_directory() -> str:
        import asyncpg

        conn = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()

    try:
        pid_file = Path(asyncio.run(data_directory())) / "postmaster.pid"
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError):
        return None


def _reports(
    config: Path,
    env: dict[str, str],
    baseline: str | None,
    repeat: int,
    server: int | None = None,
) -> dict[str, Any]:
    """Run ``report --by team,model`` and ``--by team,key,day``, ``repeat`` times each.

    With a baseline checkout, its runs and this one's alternate (one sitting, the same load).
    """
    runs: dict[str, Any] = {}
    for _ in range(repeat):
        for by in ("team,model", "team,key,day"):
            key = by.replace(",", "_")
            for name, run_env in (
                (key, env),
                *(((f"{key}_baseline", {**env, "PYTHONPATH": baseline}),) if baseline else ()),
            ):
                cpu = _server_cpu(server)
                result = run_report(config, by, run_env)
                if server is not None:
                    time.sleep(0.2)  # the backend exits after the client: its CPU counted
                    result["server_cpu_seconds"] = round(_server_cpu(server) - cpu, 2)
                runs.setdefault(name, []).append(result)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--postgres", action="store_true", help="also a PostgreSQL ledger")
    parser.add_argument("--pg-rows", type=int, default=None, help="rows for PostgreSQL")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each report")
    parser.add_argument(
        "--baseline",
        default=None,
        help="a checkout of older code: its report runs alternate with this one's",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"rows": args.rows, "load_average": os.getloadavg()}
    env = {**os.environ, "CLIPIA_API_KEY": "unused"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="clipia-bench-ledger-") as tmp:
        if not args.no_sqlite:
            db = Path(tmp) / "ledger.db"
            began = time.perf_counter()
            fill_sqlite(db, args.rows)
            results["sqlite_fill_seconds"] = round(time.perf_counter() - began, 1)
            results["sqlite_file_mib"] = round(db.stat().st_size / 2**20, 1)
            results["sqlite_summaries_backfill_seconds"] = round(summarise_sqlite(db), 2)
            results["sqlite_rollup_backfill_seconds"] = round(rollup_sqlite(db), 2)
            wall, cpu = startup_seconds(db)
            results["sqlite_startup_seconds"] = round(wall, 3)
            results["sqlite_startup_cpu_seconds"] = round(cpu, 3)
            config = Path(tmp) / "config.yaml"
            config.write_text(f"store: {{backend: sqlite, sqlite_path: {db}}}\n")
            results["sqlite_report"] = _reports(config, env, args.baseline, args.repeat)
        if args.postgres or args.no_sqlite:
            from tests.pg_server import postgres_server

            pg_rows = args.pg_rows or args.rows
            with postgres_server() as dsn:
                began = time.perf_counter()
                rollup = asyncio.run(fill_postgres(dsn, pg_rows))
                results["postgres_rows"] = pg_rows
                results["postgres_fill_seconds"] = round(time.perf_counter() - began, 1)
                results["postgres_rollup_backfill_seconds"] = round(rollup, 1)
                pg_config = Path(tmp) / "pg.yaml"
                pg_config.write_text(
                    "ledger: {backend: postgres, postgres_dsn_env: CLIPIA_BENCH_LEDGER_DSN}\n"
                )
                pg_env = {**env, "CLIPIA_BENCH_LEDGER_DSN": dsn}
                results["postgres_report"] = _reports(
                    pg_config, pg_env, args.baseline, args.repeat, _postmaster(dsn)
                )
    results["load_average_after"] = os.getloadavg()
    text = msgspec.json.format(msgspec.json.encode(results), indent=2).decode()
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

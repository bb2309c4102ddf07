"""The ``clipia-proxy`` command line: serve, check-config, keygen, report, migrate, emulator, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .auth import generate_key, hash_key
from .config import Config, ConfigError, load_config
from .logs import apply_logging, setup_logging
from .version import __version__

if TYPE_CHECKING:
    from .ledgers import LedgerStore

__all__ = ["main"]


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        run = uvloop.run
    # Run outside the except clause: else every exception raised while serving would carry the
    # ImportError as its context (a spurious "ModuleNotFoundError: uvloop" in each traceback).
    run(coro)


def _load(path: str, *, resolve_secrets: bool) -> Config | None:
    """Load a config, or print every problem (one line each) and return None."""
    try:
        return load_config(path, resolve_secrets=resolve_secrets)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.path, resolve_secrets=False)
    if config is None:
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    keys = sum(len(team.keys) for team in config.teams)
    print(
        f"{config.source}: ok: {len(config.teams)} team(s), {keys} key(s), "
        f"auth.mode={config.auth.mode}, upstream={config.upstream.base_url}"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config, resolve_secrets=True)
    if config is None:
        return 1
    handler = setup_logging(
        args.log_level or config.logging.level,
        fmt=config.logging.format,
        access_log=config.logging.access_log,
    )
    for warning in config.warnings:
        logging.getLogger("clipia_proxy").warning("%s", warning)
    from .server import BindError, serve

    def reload_logging(new: Config) -> None:
        # --log-level stays in force over a reloaded logging.level.
        settings = new.logging
        level = args.log_level or settings.level
        apply_logging(handler, level, fmt=settings.format, access_log=settings.access_log)

    try:
        _run(serve(config, config_path=args.config, on_reload=reload_logging))
    except BindError as exc:
        print(f"clipia-proxy serve: {exc}", file=sys.stderr)
        return 1
    return 0


class _Period(NamedTuple):
    """A ``--period`` of a ledger command, in ``accounting.timezone``."""

    config: Config
    since: float
    until: float
    name: str
    days: tuple[str, str]


def _ledger_period(args: argparse.Namespace, command: str) -> _Period | int:
    """Load ``--config`` and read ``--period``; or print why not and return the exit code."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from .report import parse_period, period_days

    config = _load(args.config, resolve_secrets=False)
    if config is None:
        return 1
    zone = ZoneInfo(config.accounting.timezone)
    try:
        since, until = parse_period(args.period, zone, now=dt.datetime.now(dt.UTC))
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    name = args.period or f"{dt.datetime.now(zone):%Y-%m}"
    return _Period(config, since, until, name, period_days(since, until, zone))


def _with_ledger(
    config: Config, command: str, work: Callable[[LedgerStore], Awaitable[int]]
) -> int:
    """Open the configured ledger, run ``work`` on it, close it; 1 if it is unavailable."""
    from .ledgers import open_ledger
    from .quotas.store import StoreUnavailable

    if config.store.backend == "memory" and config.ledger.backend == "sqlite":
        print(f"{command}: store.backend memory keeps no ledger", file=sys.stderr)
        return 1

    async def run() -> int:
        ledger = open_ledger(config)
        await ledger.start()
        try:
            code: int = await work(ledger)
        finally:
            await ledger.close()
        return code

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"{command}: the ledger is unavailable: {exc}", file=sys.stderr)
        return 1


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import parse_by, write_report

    period = _ledger_period(args, "report")
    if isinstance(period, int):
        return period
    try:
        by = parse_by(args.by)
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2

    async def work(ledger: LedgerStore) -> int:
        still_open = await write_report(
            ledger,
            sys.stdout,
            since=period.since,
            until=period.until,
            by=by,
            team=args.team,
            rubles_per_credit=period.config.accounting.rubles_per_credit,
            fmt=args.format,
            period=period.name,
            days=period.days,
        )
        if still_open:
            print(
                f"report: {still_open} record(s) of {period.name} are not settled yet",
                file=sys.stderr,
            )
        return 0

    return _with_ledger(period.config, "report", work)


def _cmd_reconcile(args: argparse.Namespace) -> int:
    import datetime as dt
    from zoneinfo import ZoneInfo

    from .app import key_usage_path
    from .key_usage import read_snapshots, reconcile, write_reconciliation

    config = _load(args.config, resolve_secrets=False)
    if config is None:
        return 1
    zone = ZoneInfo(config.accounting.timezone)
    try:
        day = dt.date.fromisoformat(args.day)
    except ValueError:
        print(f"reconcile: --day {args.day!r} is not a date (2026-11-25)", file=sys.stderr)
        return 2
    since = dt.datetime.combine(day, dt.time(), zone).timestamp()
    until = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone).timestamp()
    path = Path(args.snapshots) if args.snapshots else key_usage_path(config)
    snapshots = read_snapshots(path)

    async def work(ledger: LedgerStore) -> int:
        result = await reconcile(ledger, snapshots, since=since, until=until)
        if result is None:
            print(
                f"reconcile: {path} has no two snapshots of Clipia's key usage around {day} "
                "(accounting.key_usage_snapshot_seconds; the gateway writes them while serving)",
                file=sys.stderr,
            )
            return 1
        write_reconciliation(sys.stdout, result, day=day.isoformat(), zone=zone)
        return 0

    return _with_ledger(config, "reconcile", work)


def _cmd_ledger_export(args: argparse.Namespace) -> int:
    from .report import write_export

    period = _ledger_period(args, "ledger export")
    if isinstance(period, int):
        return period

    async def work(ledger: LedgerStore) -> int:
        count = await write_export(
            ledger, sys.stdout, since=period.since, until=period.until, fmt=args.format
        )
        print(f"ledger export: {count} record(s) of {period.name}", file=sys.stderr)
        return 0

    return _with_ledger(period.config, "ledger export", work)


def _cmd_ledger_prune(args: argparse.Namespace) -> int:
    config = _load(args.config, resolve_secrets=False)
    if config is None:
        return 1
    months = config.ledger.retention_months
    if months is None:
        print("ledger prune: ledger.retention_months is not set: nothing to prune")
        return 0
    import datetime as dt
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(config.accounting.timezone)
    today = dt.datetime.now(zone).date()
    index = today.year * 12 + today.month - 1 - (months - 1)
    first_kept = dt.date(index // 12, index % 12 + 1, 1)
    before = dt.datetime.combine(first_kept, dt.time(0), tzinfo=zone).timestamp()

    async def work(ledger: LedgerStore) -> int:
        removed = await ledger.prune(before=before)
        print(f"ledger prune: {removed} record(s) created before {first_kept} removed")
        return 0

    return _with_ledger(config, "ledger prune", work)


def _cmd_migrate(args: argparse.Namespace) -> int:
    config = _load(args.config, resolve_secrets=False)
    if config is None:
        return 1
    if config.ledger.backend != "postgres":
        print(
            "migrate: ledger.backend is sqlite: its schema is created when the file is opened",
            file=sys.stderr,
        )
        return 0
    from .ledgers.postgres import PostgresLedger
    from .quotas.store import StoreUnavailable

    async def run() -> list[int]:
        ledger = PostgresLedger.from_config(
            config.ledger, timeout=max(config.store.timeout_seconds, 30.0)
        )
        try:
            return await ledger.migrate()
        finally:
            await ledger.close()

    try:
        applied = asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"migrate: the PostgreSQL ledger is unavailable: {exc}", file=sys.stderr)
        return 1
    if applied:
        print(f"migrate: applied schema version(s) {', '.join(map(str, applied))}")
    else:
        print("migrate: the schema is up to date")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_key()
    key_id = args.key_id or f"{args.team}-{secrets.token_hex(3)}"
    print(
        f"# The key for team {args.team!r}, shown once. Give it to the team; store it nowhere else:"
    )
    print(key)
    print("# Add this entry to teams[id=" + args.team + "].keys in the config:")
    print(f"- {{id: {key_id}, sha256: {hash_key(key)}}}")
    return 0


def _cmd_emulator(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from .emulator import run_emulator

    _run(run_emulator(host=args.host, port=args.port, seed=args.seed))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    from .demo import run_demo

    _run(
        run_demo(
            port=args.port,
            admin_port=args.admin_port,
            emulator_port=args.emulator_port,
            db_path=args.db,
            announce=lambda text: print(text, flush=True),
        )
    )
    print("demo stopped", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (one sub-command per docs/architecture.md §5.1 command)."""
    parser = argparse.ArgumentParser(
        prog="clipia-proxy", description="A company gateway in front of Clipia AI Gateway."
    )
    parser.add_argument("--version", action="version", version=f"clipia-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to config.yaml")
    serve.add_argument("--log-level", default=None, help="overrides logging.level")
    serve.set_defaults(func=_cmd_serve)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=_cmd_check_config)

    keygen = commands.add_parser("keygen", help="print a new team key and its config entry")
    keygen.add_argument("--team", required=True)
    keygen.add_argument(
        "--key-id", default=None, help="id for the key entry (default: team-XXXXXX)"
    )
    keygen.set_defaults(func=_cmd_keygen)

    report = commands.add_parser("report", help="chargeback: spend per team and model")
    report.add_argument("--config", required=True, help="path to config.yaml (names the store)")
    report.add_argument("--period", default=None, help="2026-11 | 2026-W48 | 2026-11-25")
    report.add_argument("--team", default=None)
    report.add_argument("--format", choices=("csv", "json"), default="csv")
    report.add_argument(
        "--by",
        action="append",
        default=None,
        help="group by team|environment|model|key|user|day|tag|tag:NAME (comma-separated or "
        "repeated; default team,model)",
    )
    report.set_defaults(func=_cmd_report)

    reconcile = commands.add_parser(
        "reconcile", help="compare the ledger's total for a day with what Clipia charged the key"
    )
    reconcile.add_argument("--config", required=True, help="path to config.yaml")
    reconcile.add_argument("--day", required=True, help="2026-11-25 (accounting.timezone)")
    reconcile.add_argument(
        "--snapshots", default=None, help="key usage snapshots (default: accounting.key_usage_path)"
    )
    reconcile.set_defaults(func=_cmd_reconcile)

    ledger = commands.add_parser("ledger", help="the ledger: export per-request rows, prune")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    export = ledger_commands.add_parser("export", help="per-request rows of a period")
    export.add_argument("--config", required=True, help="path to config.yaml (names the ledger)")
    export.add_argument("--period", default=None, help="2026-11 | 2026-W48 | 2026-11-25")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(func=_cmd_ledger_export)
    prune = ledger_commands.add_parser(
        "prune", help="delete whole months older than ledger.retention_months"
    )
    prune.add_argument("--config", required=True, help="path to config.yaml (names the ledger)")
    prune.set_defaults(func=_cmd_ledger_prune)

    migrate = commands.add_parser(
        "migrate", help="apply the PostgreSQL ledger's schema migrations (serve also does)"
    )
    migrate.add_argument("--config", required=True, help="path to config.yaml (names the ledger)")
    migrate.set_defaults(func=_cmd_migrate)

    emulator = commands.add_parser("emulator", help="run the local Clipia emulator")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090)
    emulator.add_argument("--seed", type=int, default=0)
    emulator.add_argument("--log-level", default="INFO")
    emulator.set_defaults(func=_cmd_emulator)

    demo = commands.add_parser("demo", help="emulator + gateway with example teams, no key needed")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--emulator-port", type=int, default=8090)
    demo.add_argument("--db", default="clipia-proxy-demo.db", help="SQLite ledger file")
    demo.add_argument("--log-level", default="WARNING")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code

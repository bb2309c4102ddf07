"""Smoke test of the benchmark (``bench/``): a tiny run must produce every report field.

It asserts shape only, never timing: this machine's numbers belong to ``python -m bench.run``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("nonstream_c1", "nonstream_c32", "stream_c1", "stream_c32")
TARGET_FIELDS = (
    "rps",
    "ok",
    "errors",
    "latency_p50_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "proxy_cpu_ms_per_request",
    "emulator_cpu_ms_per_request",
)
SUMMARY_FIELDS = (
    "added_latency_p50_ms_nonstream_c1",
    "added_latency_p99_ms_nonstream_c1",
    "added_ttft_p50_ms_stream_c1",
    "gateway_rps_nonstream_c32",
    "direct_rps_nonstream_c32",
    "gateway_cpu_ms_per_request_nonstream_c32",
    "gateway_rss_kib_per_stream",
    "gateway_over_litellm_rps_ratio",
)


@pytest.mark.timeout(240)
def test_quick_bench_reports_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "bench.run", "--quick", "--requests", "20", "--stream-requests"]
    argv += ["8", "--warmup", "8", "--open-streams", "10", "--litellm", "off", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "targets:" in proc.stdout

    report = msgspec.json.decode(out.read_bytes())
    for field in ("cpu_count", "python", "aiohttp", "uvloop"):
        assert field in report["machine"]
    assert report["litellm"]["status"] == "skipped"
    assert set(report["scenarios"]) == set(SCENARIOS)
    for key in SCENARIOS:
        scenario = report["scenarios"][key]
        assert set(scenario["targets"]) == {"direct", "gateway", "bare"}
        for target in ("direct", "gateway", "bare"):
            best = scenario["targets"][target]
            for field in TARGET_FIELDS:
                assert field in best
            assert best["errors"] == 0, scenario["runs"]
            assert best["ok"] > 0
            assert best["latency_p50_ms"] is not None
            assert (best["ttft_p50_ms"] is not None) == scenario["stream"]
        for proxy in ("gateway", "bare"):
            assert scenario["targets"][proxy]["proxy_cpu_ms_per_request"] is not None
            added = scenario["added"][proxy]
            assert added["latency_p50_ms"] is not None
            assert added["latency_p99_ms"] is not None
            assert (added["ttft_p50_ms"] is not None) == scenario["stream"]
    for proxy in ("gateway", "bare"):
        rss = report["rss"][proxy]
        assert rss["opened"] == rss["requested"] == 10
        assert rss["kib_per_stream"] is not None
    for field in SUMMARY_FIELDS:
        assert field in report["summary"]
    assert {t["status"] for t in report["targets"]} <= {"PASS", "FAIL", "N/A"}
    assert len(report["targets"]) == 5


@pytest.mark.parametrize("quotas", [True, False])
def test_gateway_config_with_and_without_quotas(quotas: bool) -> None:
    from bench.run import gateway_config
    from clipia_proxy.config import parse_config

    text = gateway_config(
        port=1, admin_port=2, emulator_port=3, team_key="k", store="memory", quotas=quotas
    )
    config = parse_config(text, source="bench.yaml", resolve_secrets=False)
    (team,) = config.teams
    assert config.store.backend == "memory"
    assert (team.budget.day is not None) is quotas
    assert (team.limits.rpm is not None) is quotas


@pytest.mark.timeout(240)
def test_ledger_bench_reports_every_field(tmp_path: Path) -> None:
    """``bench.ledger`` on a few records, both ledgers, with this checkout as its own baseline."""
    out = tmp_path / "ledger.json"
    argv = ["--rows", "3000", "--postgres", "--json", str(out), "--baseline", str(ROOT)]
    subprocess.run(
        [sys.executable, "-m", "bench.ledger", *argv],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=220,
    )
    doc = msgspec.json.decode(out.read_bytes())
    for key in (
        "sqlite_startup_seconds",
        "sqlite_rollup_backfill_seconds",
        "postgres_fill_seconds",
    ):
        assert doc[key] >= 0, key
    for ledger in ("sqlite_report", "postgres_report"):
        for by, lines in (("team_model", 120), ("team_key_day", 560)):
            for name in (by, f"{by}_baseline"):
                (run,) = doc[ledger][name]
                assert (run["exit"], run["lines"]) == (0, lines), (ledger, name)
                assert run["peak_rss_mib"] > 0
    assert doc["postgres_report"]["team_model"][0]["server_cpu_seconds"] >= 0

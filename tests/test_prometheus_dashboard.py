"""The Grafana dashboard and the alerts against a real Prometheus scraping a real gateway.

Debian's ``prometheus`` server (``.ci/run`` installs it) scrapes ``clipia-proxy serve`` (a
subprocess, with the emulator as Clipia) every second and evaluates the alert rules every second.
A scripted mix — two teams, plain requests and streams, a policy refusal (403) and budget
refusals (402) — runs; then every query of the dashboard is evaluated through Prometheus' HTTP
API with its variables substituted: none may fail, and the spend per team over the run must
equal the ledger (``clipia-proxy report``) within rounding. ``ClipiaProxyBudgetRefusing`` and
``ClipiaProxyBudgetHeadroomLow`` must be pending or firing for the refused team, not the other.

Everything listens on 127.0.0.1 and is stopped at the end; Prometheus' storage is a temporary
directory.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import socket
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipia_proxy.auth import generate_key, hash_key
from tests.harness import run_report, serve, start_emulator

pytestmark = pytest.mark.prometheus

ROOT: Final = Path(__file__).resolve().parent.parent
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "clipia-proxy.json"
RULES: Final = ROOT / "deploy" / "prometheus" / "clipia-proxy-rules.yaml"
VARIABLE: Final = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
RUBLES_PER_CREDIT: Final = Decimal(3)  # the config's default, and the dashboard's constant
TEAMS: Final = ("alpha", "beta")
HELLO: Final = [{"role": "user", "content": "Say something about budgets."}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Run:
    """The processes of one test and how to reach them."""

    tmp: Path
    config: Path
    env: dict[str, str]
    keys: dict[str, str]
    port: int = 0
    admin_port: int = 0
    prometheus_url: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def auth(self, team: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _wait_for(what: str, log: Path, check: Any, process: asyncio.subprocess.Process) -> Any:
    """Poll ``check()`` (sync or async) until it returns a truthy value (60 s at most)."""
    async with asyncio.timeout(60):
        while True:
            assert process.returncode is None, f"{what}: exited\n" + _text(log)
            found = check()
            if asyncio.iscoroutine(found):
                found = await found
            if found:
                return found
            await asyncio.sleep(0.1)


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    binary = shutil.which("prometheus")
    assert binary is not None, "prometheus is missing: apt-get install -y prometheus (.ci/run)"
    emulator = await start_emulator()
    keys = {team: generate_key() for team in TEAMS}
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
server: {{host: 127.0.0.1, port: 0, admin_port: 0, shutdown_grace_seconds: 1}}
upstream: {{base_url: "{emulator.base_url}", api_key_env: TEST_CLIPIA_KEY}}
store: {{backend: sqlite, sqlite_path: "{tmp_path / "ledger.db"}"}}
teams:
  - id: alpha
    keys: [{{id: alpha-1, sha256: {hash_key(keys["alpha"])}}}]
    models: {{allow: ["gpt-5.5", "claude-sonnet-4-6"]}}
    budget: {{day: 1}}
  - id: beta
    keys: [{{id: beta-1, sha256: {hash_key(keys["beta"])}}}]
    models: {{allow: ["gpt-5.5*"]}}
    budget: {{day: 100}}
"""
    )
    made = Run(
        tmp=tmp_path,
        config=config,
        env={"TEST_CLIPIA_KEY": emulator.clipia_key},
        keys=keys,
    )
    processes: list[asyncio.subprocess.Process] = []
    try:
        gateway = await serve(config, env=made.env, log=tmp_path / "gateway.log", within=60)
        processes.append(gateway.process)
        made.port, made.admin_port = gateway.port, gateway.admin_port

        prometheus_port = free_port()
        made.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        (tmp_path / "prometheus.yml").write_text(
            f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: clipia-proxy
    static_configs: [{{targets: ["127.0.0.1:{made.admin_port}"]}}]
"""
        )
        prometheus_log = tmp_path / "prometheus.log"
        with prometheus_log.open("wb") as sink:
            prometheus = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                stdout=sink,
                stderr=sink,
                cwd=tmp_path,
            )
        processes.append(prometheus)

        async def scraped() -> bool:
            # Ready, and the gateway scraped once before any request.
            try:
                found = await query(made, "count(clipia_proxy_build_info)")
            except (aiohttp.ClientError, msgspec.DecodeError):
                return False
            return bool(found) and float(found[0]["value"][1]) > 0

        await _wait_for("prometheus", prometheus_log, scraped, prometheus)
        yield made
    finally:
        for process in reversed(processes):
            await _stop(process)
        await emulator.stop()


async def api(run: Run, path: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{run.prometheus_url}/api/v1/{path}", params=params) as reply,
    ):
        body = msgspec.json.decode(await reply.read())
    assert body["status"] == "success", (path, params, body)
    return body["data"]


async def query(run: Run, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = await api(run, "query", **params)
    result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
    return result


async def chat(
    session: aiohttp.ClientSession, run: Run, team: str, model: str, *, stream: bool
) -> int:
    body: dict[str, Any] = {"model": model, "messages": HELLO, "max_tokens": 30}
    if stream:
        body["stream"] = True
    async with session.post(
        f"{run.base_url}/chat/completions", json=body, headers=run.auth(team)
    ) as reply:
        await reply.read()
        return reply.status


async def scripted_mix(run: Run) -> dict[str, int]:
    """Two teams, plain and streamed, a policy refusal each, alpha until its budget refuses."""
    statuses: dict[str, int] = defaultdict(int)
    async with aiohttp.ClientSession() as session:
        for round_ in range(4):
            for team in TEAMS:
                for stream in (False, True):
                    status = await chat(session, run, team, "gpt-5.5", stream=stream)
                    statuses[f"{team} {status}"] += 1
            status = await chat(session, run, "beta", "gpt-5.5-mini", stream=round_ % 2 == 0)
            statuses[f"beta {status}"] += 1
            await asyncio.sleep(0.5)  # spread over several scrapes, as real traffic is
        # A catalog model the team may not use: 403, labelled with its id.
        statuses[f"beta {await chat(session, run, 'beta', 'claude-sonnet-4-6', stream=False)}"] += 1
        # Alpha until its small budget refuses (its reservation no longer fits), bounded.
        for attempt in range(200):
            status = await chat(session, run, "alpha", "claude-sonnet-4-6", stream=attempt % 2 == 1)
            statuses[f"alpha {status}"] += 1
            if status == 402 and statuses["alpha 402"] >= 3:
                break
            await asyncio.sleep(0.05)
    return statuses


async def gateway_spend(run: Run) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{run.admin_port}/metrics") as reply,
    ):
        text = await reply.text()
    spend: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "clipia_proxy_spend_credits_total":
                spend[sample.labels["team"]] += sample.value
    return dict(spend)


async def ledger(run: Run) -> dict[str, Decimal]:
    """Credits per team from ``clipia-proxy report`` (the chargeback export)."""
    report = await run_report(run.config, env=run.env)
    assert report["open_records"] == 0
    # One row per team and model, then the team's total (model "*").
    return {row["team"]: Decimal(row["credits"]) for row in report["rows"] if row["model"] == "*"}


def dashboard_queries() -> list[tuple[str, str]]:
    data = msgspec.json.decode(DASHBOARD.read_bytes())

    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for panel in panels:
            found.append(panel)
            found += walk(panel.get("panels", []))
        return found

    return [
        (f"{panel['title']}#{target['refId']}", str(target["expr"]))
        for panel in walk(data["panels"])
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, values: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)


@pytest.mark.timeout(240)
async def test_dashboard_queries_and_budget_alert_against_a_real_prometheus(run: Run) -> None:
    started = float((await api(run, "query", query="time()"))["result"][0])  # Prometheus' clock
    statuses = await scripted_mix(run)
    assert statuses["alpha 200"] > 0, statuses
    assert statuses["beta 200"] > 0
    assert statuses["beta 403"] == 1
    assert statuses["alpha 402"] >= 1

    # Settled, and the last values scraped: Prometheus holds what the gateway exports.
    books = await ledger(run)
    async with asyncio.timeout(60):
        while True:
            direct = await gateway_spend(run)
            if all(
                math.isclose(direct.get(team, 0.0), float(books.get(team, 0)), abs_tol=1e-9)
                for team in TEAMS
            ):
                scraped = {
                    r["metric"]["team"]: float(r["value"][1])
                    for r in await query(run, "sum by (team) (clipia_proxy_spend_credits_total)")
                }
                if all(math.isclose(scraped.get(t, 0.0), direct.get(t, 0.0)) for t in TEAMS):
                    break
            books = await ledger(run)
            await asyncio.sleep(0.2)
    # Evaluate at the last scrape's own timestamp: no extrapolation past the newest sample.
    [last] = await query(run, "timestamp(clipia_proxy_build_info)")
    at = float(last["value"][1])
    values = {
        "team": ".*",
        "model": ".*",
        "rubles_per_credit": str(RUBLES_PER_CREDIT),
        "__range": f"{math.ceil(at - started) + 10}s",
        "__rate_interval": "15s",
        "__interval": "1s",
    }

    # Every query of the dashboard evaluates (api() asserts status success).
    answers: dict[str, list[dict[str, Any]]] = {}
    for where, expr in dashboard_queries():
        answers[where] = await query(run, substitute(expr, values), at)
    for name in ("team", "model"):
        labels = await api(
            run, f"label/{name}/values", **{"match[]": "clipia_proxy_spend_credits_total"}
        )
        assert set(TEAMS) <= set(labels) if name == "team" else "gpt-5.5" in labels

    # The spend per team over the run equals the ledger, in credits and in rubles.
    credits_table = [
        answer
        for where, answer in answers.items()
        if where.startswith("Spend per team and model in the selected range")
        and where.endswith("#A")
    ]
    [table] = credits_table
    per_team: dict[str, float] = defaultdict(float)
    for row in table:
        per_team[row["metric"]["team"]] += float(row["value"][1])
    [rubles] = [a for w, a in answers.items() if w.startswith("Spend per team in the selected")]
    rubles_per_team = {row["metric"]["team"]: float(row["value"][1]) for row in rubles}
    figures = []
    for team in TEAMS:
        expected = books[team]
        assert expected > 0
        assert per_team[team] == pytest.approx(float(expected), abs=1e-6), team
        assert rubles_per_team[team] == pytest.approx(
            float(expected * RUBLES_PER_CREDIT), abs=1e-6
        ), team
        figures.append(f"{team}: ledger {expected} cr, dashboard {per_team[team]:.6f} cr")
    print("dashboard vs ledger:", "; ".join(figures))  # noqa: T201 - the report quotes it

    # The refused team's budget alerts are pending or firing: the refusal itself, and its
    # headroom (remaining / typical reservation) below 10 requests; none for beta.
    wanted = {"ClipiaProxyBudgetRefusing", "ClipiaProxyBudgetHeadroomLow"}
    async with asyncio.timeout(45):
        while True:
            alerts = (await api(run, "alerts"))["alerts"]
            active = {
                (a["labels"]["alertname"], a["labels"].get("team"))
                for a in alerts
                if a["state"] in {"pending", "firing"}
            }
            if {(name, "alpha") for name in wanted} <= active:
                break
            await asyncio.sleep(0.5)
    assert not [key for key in active if key[0] in wanted and key[1] == "beta"]
    headroom = await query(
        run, 'min by (team) (clipia_proxy_budget_headroom_requests{team="alpha"})'
    )
    assert float(headroom[0]["value"][1]) < 10

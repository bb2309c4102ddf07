"""Metrics (docs/architecture.md §5.6) through HTTP: scrape ``/metrics`` after a scripted mix and check exact values.

Every counter is checked against an independent account of the same traffic: the requests this
test sent (requests, rejections, stream terminations), the emulator's own log (upstream
attempts), the ledger's settled records (spend, tokens, usage sources) and ``GET /v1/key``
(budget gauges).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PCounter
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import clipia_proxy
from clipia_proxy import __version__
from clipia_proxy.app import apply_config, refresh_budget_gauges
from clipia_proxy.auth import generate_key
from clipia_proxy.emulator import Fault
from clipia_proxy.keys import CATALOG, LIVE, QUOTAS
from clipia_proxy.metrics import REJECTION_REASONS, STREAM_REASONS, BudgetSnapshot, Metrics
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, RecordState, UsageSource
from clipia_proxy.quotas.store import LedgerRecord
from tests.harness import Stack, make_config, start_stack, stop_stack, wait_settled

P: Final = "clipia_proxy_"
CHAT: Final = "/v1/chat/completions"
HELLO: Final = [{"role": "user", "content": "hi"}]
TOLERANCE: Final = 1e-9

TEAMS: Final = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models:
      allow: ["*"]
      deny: ["claude-opus-*"]
      aliases: {{fast: claude-sonnet-4-6}}
    caps: {{max_tokens: 50, n: 1}}
    budget: {{day: 10, month: 100}}
  - id: broke
    keys: [{{id: broke-1, sha256: {broke}}}]
    models: {{allow: ["gpt-5.5"]}}
    budget: {{day: 0.000001}}
  - id: rpm
    keys: [{{id: rpm-1, sha256: {rpm}}}]
    models: {{allow: ["gpt-5.5"]}}
    limits: {{rpm: 1}}
  - id: tpm
    keys: [{{id: tpm-1, sha256: {tpm}}}]
    models: {{allow: ["gpt-5.5"]}}
    limits: {{tpm: 5}}
  - id: conc
    keys: [{{id: conc-1, sha256: {conc}}}]
    models: {{allow: ["gpt-5.5"]}}
    limits: {{concurrency: 1}}
  - id: shadow
    keys: [{{id: shadow-1, sha256: {shadow}}}]
    models: {{allow: ["gpt-5.5"]}}
    budget: {{day: 0.000001}}
    shadow: true
"""
TEAM_IDS: Final = ("search", "broke", "rpm", "tpm", "conc", "shadow")

Labels = frozenset[tuple[str, str]]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def mixed() -> AsyncIterator[Stack]:
    made = await start_stack(teams=TEAMS, team_ids=TEAM_IDS)
    try:
        yield made
    finally:
        await stop_stack(made)


@dataclass
class Scrape:
    """One ``/metrics`` answer, parsed."""

    content_type: str
    text: str
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = sample.value

    def series(self, name: str) -> dict[Labels, float]:
        """Every series of the sample ``name`` (full name, e.g. ``..._total``)."""
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Series of ``name`` keyed by the values of ``keys`` (which must be all its labels)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.series(name).items():
            as_dict = dict(labels)
            assert set(as_dict) == set(keys), (name, as_dict)
            out[tuple(as_dict[k] for k in keys)] = value
        return out


async def scrape(stack: Stack, session: aiohttp.ClientSession | None = None) -> Scrape:
    async def fetch(client: aiohttp.ClientSession) -> Scrape:
        async with client.get(f"{stack.admin_url}/metrics") as reply:
            assert reply.status == 200
            return Scrape(reply.headers["Content-Type"], await reply.text())

    if session is not None:
        return await fetch(session)
    async with aiohttp.ClientSession() as own:
        return await fetch(own)


def chat_body(model: str = "gpt-5.5", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, "max_tokens": 20, **fields}


async def settled_records(stack: Stack) -> list[LedgerRecord]:
    records = await stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf"))
    assert all(r.state == RecordState.SETTLED for r in records), "unsettled records remain"
    return records


def nonzero(values: Mapping[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in values.items() if v}


@dataclass
class Traffic:
    """What the test sent and what it expects the gateway to have counted."""

    stack: Stack
    session: aiohttp.ClientSession
    requests: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    rejections: Counter[tuple[str, str]] = field(default_factory=Counter)

    async def send(
        self,
        method: str,
        path: str,
        *,
        team: str | None = "search",
        body: dict[str, Any] | bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, str, str],
        rejection: str | None = None,
    ) -> bytes:
        """Send one request; ``expect`` is (status, model label, route label)."""
        sent = dict(self.stack.auth(team) if team is not None else {})
        sent.update(headers or {})
        kwargs: dict[str, Any] = {"headers": sent}
        if isinstance(body, bytes):
            kwargs["data"] = body
            sent["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(
            method, f"http://127.0.0.1:{self.stack.running.port}{path}", **kwargs
        ) as reply:
            data = await reply.read()
        status, model, route = expect
        assert reply.status == status, (path, body, data)
        who = team or "unknown"
        self.requests[who, model, route, str(status)] += 1
        if rejection is not None:
            self.rejections[who, rejection] += 1
        return data


# --------------------------------------------------------------------------- tests


async def test_series_for_configured_teams_exist_before_any_traffic(mixed: Stack) -> None:
    got = await scrape(mixed)
    assert got.content_type.startswith("text/plain")
    assert "version=" in got.content_type
    inflight = got.by(P + "inflight_requests", "team")
    assert inflight == {(team,): 0.0 for team in TEAM_IDS}
    rejections = got.by(P + "rejections_total", "team", "reason")
    assert rejections == {(t, r): 0.0 for t in TEAM_IDS for r in REJECTION_REASONS}
    terminations = got.by(P + "stream_terminations_total", "team", "reason")
    assert terminations == {(t, r): 0.0 for t in TEAM_IDS for r in STREAM_REASONS}
    assert got.series(P + "requests_total") == {}
    assert got.value(P + "build_info", version=__version__) == 1.0
    # Spend and tokens: every (team, catalog model its policy allows) and other, at 0, so that
    # increase() over any range also counts each series' first request.
    app = mixed.running.app
    policies, models = app[LIVE].policies, app[CATALOG].model_ids()
    pairs = {(t, m) for t in TEAM_IDS for m in models if policies[t].allows(m)}
    pairs |= {(t, "other") for t in TEAM_IDS}
    assert ("broke", "gpt-5.5") in pairs
    assert ("search", "claude-opus-4-8") not in pairs
    # Every team of this stack is live: environment="live" on all of them.
    assert got.by(P + "spend_credits_total", "team", "model", "environment") == {
        (t, m, "live"): 0.0 for t, m in pairs
    }
    assert got.by(P + "tokens_total", "team", "model", "environment", "type") == {
        (t, m, "live", kind): 0.0 for t, m in pairs for kind in ("prompt", "completion")
    }
    assert got.by(P + "usage_source_total", "source") == {(s.value,): 0.0 for s in UsageSource}


async def test_exact_counters_after_a_scripted_mix(mixed: Stack) -> None:
    stack = mixed
    app = stack.running.app
    chat_models = app[CATALOG].model_ids()
    assert {"gpt-5.5", "claude-sonnet-4-6", "claude-opus-4-8"} <= chat_models
    assert "flux-2-pro" not in chat_models  # media models are not chat ids
    async with aiohttp.ClientSession() as session:
        t = Traffic(stack, session)
        ok: Final = (200, "gpt-5.5", CHAT)

        # Allowed: plain, streamed (via an alias), streamed with the client's own usage.
        await t.send("POST", CHAT, body=chat_body(), expect=ok)
        await t.send("POST", CHAT, body=chat_body(), expect=ok)
        streamed = await t.send(
            "POST",
            CHAT,
            body=chat_body("fast", stream=True),
            expect=(200, "claude-sonnet-4-6", CHAT),
        )
        assert streamed.endswith(b"data: [DONE]\n\n")
        await t.send(
            "POST",
            CHAT,
            body=chat_body(stream=True, stream_options={"include_usage": True}),
            expect=ok,
        )

        # Streamed and disconnected: the client leaves after the first bytes.
        stack.emulator.push_fault(Fault(chunk_gap=0.05))
        async with session.post(
            f"{stack.base_url}/chat/completions",
            headers=stack.auth(),
            json=chat_body(stream=True, max_tokens=50),
        ) as reply:
            assert reply.status == 200
            first = await reply.content.readany()
            assert first.startswith(b"data: ")
            reply.close()
        t.requests["search", "gpt-5.5", CHAT, "200"] += 1

        # The upstream breaks the stream off after its first chunk.
        stack.emulator.push_fault(Fault(reset_after_chunks=1))
        await t.send("POST", CHAT, body=chat_body(stream=True), expect=ok)

        # Upstream error: passed on after one attempt (the client's retries are the only ones).
        stack.emulator.push_fault(Fault(status=500, retry_after="0"))
        await t.send("POST", CHAT, body=chat_body(), expect=(500, "gpt-5.5", CHAT))
        assert stack.emulator.pending_faults == 0

        # Refused before the upstream, for every reason but store_unavailable (its own test).
        await t.send(
            "POST",
            CHAT,
            body=chat_body("claude-opus-4-8"),
            expect=(403, "claude-opus-4-8", CHAT),  # in the catalog: its canonical id
            rejection="model_not_allowed",
        )
        await t.send(
            "POST",
            CHAT,
            body=chat_body("claude-opus-0-nope"),
            expect=(403, "other", CHAT),  # denied and not in the catalog: still bounded
            rejection="model_not_allowed",
        )
        await t.send(
            "POST",
            CHAT,
            body=chat_body("no-such-model"),
            expect=(404, "other", CHAT),
            rejection="model_not_found",
        )
        await t.send(
            "POST",
            CHAT,
            body=chat_body("flux-2-pro"),
            expect=(404, "other", CHAT),
            rejection="model_not_found",
        )
        await t.send(
            "POST",
            CHAT,
            body=chat_body(max_tokens=100),
            expect=(400, "gpt-5.5", CHAT),
            rejection="cap",
        )
        await t.send(
            "POST", CHAT, body=b"{not json", expect=(400, "other", CHAT), rejection="bad_request"
        )
        await t.send(
            "POST",
            CHAT,
            team=None,
            headers={"Authorization": "Bearer cpx_" + "x" * 40},
            body=chat_body(),
            expect=(401, "other", CHAT),
            rejection="auth",
        )
        await t.send(
            "POST",
            CHAT,
            team=None,
            body=chat_body(),
            expect=(401, "other", CHAT),
            rejection="auth",
        )
        await t.send(
            "POST",
            CHAT,
            team="broke",
            body=chat_body(),
            expect=(402, "gpt-5.5", CHAT),
            rejection="budget",
        )
        await t.send("POST", CHAT, team="rpm", body=chat_body(), expect=ok)
        await t.send(
            "POST",
            CHAT,
            team="rpm",
            body=chat_body(),
            expect=(429, "gpt-5.5", CHAT),
            rejection="rpm",
        )
        await t.send(
            "POST",
            CHAT,
            team="tpm",
            body=chat_body(),
            expect=(429, "gpt-5.5", CHAT),
            rejection="tpm",
        )

        # Concurrency: one request held in the emulator, a second one refused meanwhile.
        stack.emulator.hold = asyncio.Event()
        bills = len(stack.emulator.bills)
        async with asyncio.TaskGroup() as group:
            held = group.create_task(t.send("POST", CHAT, team="conc", body=chat_body(), expect=ok))
            async with asyncio.timeout(5):
                while len(stack.emulator.bills) == bills:  # noqa: ASYNC110 - emulator state
                    await asyncio.sleep(0.005)
            during = await scrape(stack, session)
            assert during.value(P + "inflight_requests", team="conc") == 1.0
            await t.send(
                "POST",
                CHAT,
                team="conc",
                body=chat_body(),
                # Refused before its body is read: the model is not known yet.
                expect=(429, "other", CHAT),
                rejection="concurrency",
            )
            stack.emulator.hold.set()
        held.result()
        stack.emulator.hold = None

        # Shadow: over its budget, served anyway, counted as would-be refused.
        await t.send("POST", CHAT, team="shadow", body=chat_body(), expect=ok)

        # Other routes: listings, an unknown route, a wrong method, an unknown model id.
        await t.send("GET", "/v1/models", expect=(200, "other", "/v1/models"))
        await t.send("GET", "/v1/key", expect=(200, "other", "/v1/key"))
        await t.send(
            "GET",
            "/v1/models/no-such-model",
            expect=(404, "other", "/v1/models/{model_id}"),
            rejection="model_not_found",
        )
        await t.send("GET", "/v1/models/gpt-5.5", expect=(200, "other", "/v1/models/{model_id}"))
        await t.send("GET", "/v1/nope", expect=(404, "other", "other"))
        await t.send("GET", CHAT, expect=(405, "other", "other"))

        await wait_settled(stack)
        await refresh_budget_gauges(app)
        got = await scrape(stack, session)
        key_views = {}
        for team in ("search", "broke", "shadow"):
            async with session.get(f"{stack.base_url}/key", headers=stack.auth(team)) as reply:
                key_views[team] = (await reply.json())["data"]
    records = await settled_records(stack)
    check_all(got, t, stack, records, key_views)


def check_all(
    got: Scrape,
    t: Traffic,
    stack: Stack,
    records: list[LedgerRecord],
    key_views: dict[str, Any],
) -> None:
    assert got.content_type.startswith("text/plain")

    # requests_total: exactly the requests sent (the /v1/key reads came after the scrape).
    requests = got.by(P + "requests_total", "team", "model", "route", "code")
    assert requests == {k: float(v) for k, v in t.requests.items()}

    # rejections_total: every configured team x reason, plus what unknown callers caused.
    rejections = got.by(P + "rejections_total", "team", "reason")
    assert set(rejections) >= {(tm, r) for tm in TEAM_IDS for r in REJECTION_REASONS}
    assert nonzero(rejections) == {k: float(v) for k, v in t.rejections.items()}
    assert {r for _, r in t.rejections} == set(REJECTION_REASONS) - {
        "store_unavailable",
        "overloaded",
    }
    assert nonzero(got.by(P + "shadow_would_reject_total", "team", "reason")) == {
        ("shadow", "budget"): 1.0
    }

    # stream_terminations_total per reason.
    assert nonzero(got.by(P + "stream_terminations_total", "team", "reason")) == {
        ("search", "completed"): 2.0,
        ("search", "client_disconnect"): 1.0,
        ("search", "upstream_error"): 1.0,
    }

    # upstream_requests_total: every attempt the emulator saw (catalog and lookups included).
    emulator_codes = Counter(str(r.status) for r in stack.emulator.requests)
    assert got.by(P + "upstream_requests_total", "code") == {
        (code,): float(n) for code, n in emulator_codes.items()
    }
    chat_codes = Counter(str(r.status) for r in stack.chat_requests())
    assert chat_codes["500"] == 1

    # Spend and tokens per (team, model) equal the ledger's settled records.
    spend: dict[tuple[str, ...], float] = {
        (team, model): value
        for (team, model, environment), value in got.by(
            P + "spend_credits_total", "team", "model", "environment"
        ).items()
        if environment == "live"  # every team of this stack is live
    }
    tokens: dict[tuple[str, ...], float] = {
        (team, model, kind): value
        for (team, model, environment, kind), value in got.by(
            P + "tokens_total", "team", "model", "environment", "type"
        ).items()
        if environment == "live"
    }
    ledger_spend: Counter[tuple[str, ...]] = Counter()
    ledger_tokens: Counter[tuple[str, ...]] = Counter()
    for r in records:
        ledger_spend[r.team, r.model] += r.cost
        ledger_tokens[r.team, r.model, "prompt"] += r.prompt_tokens
        ledger_tokens[r.team, r.model, "completion"] += r.completion_tokens
    assert set(ledger_spend) <= set(spend)
    for key, value in spend.items():
        expected = ledger_spend.get(key, 0) / MICRO_PER_CREDIT
        assert value == pytest.approx(expected, abs=TOLERANCE), key
    assert nonzero(tokens) == {k: float(v) for k, v in ledger_tokens.items() if v}
    for team in TEAM_IDS:  # and so per team: the spend series add up to each team's ledger
        team_spend = sum(v for (tm, _), v in spend.items() if tm == team)
        team_micro = sum(r.cost for r in records if r.team == team)
        assert team_spend == pytest.approx(team_micro / MICRO_PER_CREDIT, abs=TOLERANCE)
    assert sum(r.cost for r in records) > 0
    by_source = Counter(r.usage_source for r in records)
    assert got.by(P + "usage_source_total", "source") == {
        (s.value,): float(by_source.get(s.value, 0)) for s in UsageSource
    }
    assert sum(by_source.values()) == len(records) == 10
    assert by_source["generation"] >= 1  # the broken stream's cost was looked up
    # The ledger bills what the emulator billed.
    billed = sum((b.cost for b in stack.emulator.bills.values()), Decimal(0))
    assert sum(spend.values()) == pytest.approx(float(billed), abs=TOLERANCE)
    assert billed * MICRO_PER_CREDIT == sum(r.cost for r in records)

    # Nothing in flight any more.
    assert got.by(P + "inflight_requests", "team") == {(tm,): 0.0 for tm in TEAM_IDS}

    # Budget gauges (after refresh_budget_gauges) equal GET /v1/key's budgets.
    gauges = {
        name: got.by(P + f"budget_{name}", "team", "period")
        for name in (
            "limit_credits",
            "spent_credits",
            "reserved_credits",
            "remaining_credits",
            "reset_timestamp_seconds",
        )
    }
    expected_keys: set[tuple[str, ...]] = set()
    for team, view in key_views.items():
        for budget in view["budgets"]:
            period = budget["period"]
            expected_keys.add((team, period))
            for field_name, gauge in (
                ("limit", "limit_credits"),
                ("spent", "spent_credits"),
                ("reserved", "reserved_credits"),
                ("remaining", "remaining_credits"),
            ):
                assert gauges[gauge][team, period] == pytest.approx(
                    float(Decimal(str(budget[field_name]))), abs=TOLERANCE
                ), (team, period, field_name)
            resets = dt.datetime.fromisoformat(budget["resets_at"]).timestamp()
            assert gauges["reset_timestamp_seconds"][team, period] == pytest.approx(resets)
    assert expected_keys == {
        ("search", "day"),
        ("search", "month"),
        ("broke", "day"),
        ("shadow", "day"),
    }
    for values in gauges.values():
        assert set(values) == expected_keys
    assert gauges["spent_credits"]["search", "day"] > 0
    assert gauges["reserved_credits"]["search", "day"] == 0

    # Catalog, build.
    age = got.value(P + "catalog_age_seconds")
    assert age is not None
    assert age >= 0
    refreshed = got.value(P + "catalog_refreshes_total", result="success")
    assert refreshed is not None
    assert refreshed >= 1
    assert got.value(P + "build_info", version=__version__) == 1.0
    assert got.series(P + "build_info") == {frozenset({("version", __version__)}): 1.0}

    # Histograms: overhead for every request sent upstream, TTFT for every first byte.
    admitted = 10  # 2 plain + 4 streams + the 500 + rpm + conc + shadow
    assert got.value(P + "overhead_seconds_count", route=CHAT) == admitted
    assert got.by(P + "overhead_seconds_count", "route") == {(CHAT,): float(admitted)}
    assert got.by(P + "time_to_first_token_seconds_count", "team", "model") == {
        ("search", "gpt-5.5"): 5.0,  # 2 plain, 1 stream, 1 disconnected, 1 broken off
        ("search", "claude-sonnet-4-6"): 1.0,
        ("rpm", "gpt-5.5"): 1.0,
        ("conc", "gpt-5.5"): 1.0,
        ("shadow", "gpt-5.5"): 1.0,
    }
    durations = got.by(P + "request_duration_seconds_count", "team", "route", "stream")
    assert sum(durations.values()) == sum(t.requests.values())
    assert durations["search", CHAT, "true"] == 4.0


async def test_store_unavailable_is_counted(stacks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPIA_TEST_DEAD_REDIS", "redis://127.0.0.1:1/0")
    stack: Stack = await stacks(
        store="{backend: redis, redis_url_env: CLIPIA_TEST_DEAD_REDIS, timeout_seconds: 0.5}"
        "\nledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_DEAD_DSN}"
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                f"{stack.base_url}/chat/completions", headers=stack.auth(), json=chat_body()
            ) as reply:
                assert reply.status == 503
                assert b"quota_store_unavailable" in await reply.read()
        got = await scrape(stack, session)
    assert stack.chat_requests() == []
    assert nonzero(got.by(P + "rejections_total", "team", "reason")) == {
        ("search", "store_unavailable"): 2.0
    }
    assert got.by(P + "requests_total", "team", "model", "route", "code") == {
        ("search", "gpt-5.5", CHAT, "503"): 2.0
    }
    assert got.value(P + "store_errors_total", on_error="fail_closed") == 2.0
    assert got.by(P + "inflight_requests", "team") == {("search",): 0.0, ("research",): 0.0}
    assert got.series(P + "overhead_seconds_count") == {}


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def _pairs(metrics: Metrics) -> set[tuple[str, str]]:
    """(team, model) of every spend series, each checked to have both token series at 0."""
    samples = _samples(metrics)
    pairs = set()
    for (name, labels), value in samples.items():
        if name == P + "spend_credits_total":
            found = dict(labels)
            pairs.add((found["team"], found["model"]))
            assert value == 0.0
            for kind in ("prompt", "completion"):
                key = (P + "tokens_total", tuple(sorted({**found, "type": kind}.items())))
                assert samples[key] == 0.0, key
    return pairs


def test_spend_series_follow_teams_policies_and_the_catalog() -> None:
    """Every (team, allowed catalog model) pair, and other, at 0; reloads and refreshes too."""
    catalog = {"models": frozenset({"gpt-5.5", "claude-opus-4-8"})}
    policy = {"search": ["gpt-5.5", "claude-opus-4-8"], "ops": ["gpt-5.5"]}
    metrics = Metrics(
        ["search", "ops"],
        version="test",
        models=lambda: catalog["models"],
        allows=lambda team, model: model in policy.get(team, []),
    )
    assert _pairs(metrics) == {
        ("search", "gpt-5.5"),
        ("search", "claude-opus-4-8"),
        ("search", "other"),
        ("ops", "gpt-5.5"),
        ("ops", "other"),
    }
    # A catalog refresh adds a model the policy allows and drops one.
    catalog["models"] = frozenset({"gpt-5.5", "gpt-6"})
    policy["ops"].append("gpt-6")
    metrics.set_models()
    assert _pairs(metrics) == {
        ("search", "gpt-5.5"),
        ("search", "other"),
        ("ops", "gpt-5.5"),
        ("ops", "gpt-6"),
        ("ops", "other"),
    }
    # Spend recorded on a kept pair survives a reload that changes another team.
    metrics.record_settlement(
        team="search", model="gpt-5.5", cost=Decimal("0.5"), prompt_tokens=3, completion_tokens=2
    )
    policy["new"] = ["gpt-6"]
    metrics.set_teams(["search", "new"])
    samples = _samples(metrics)
    spend = {
        dict(labels)["team"] + "/" + dict(labels)["model"]: value
        for (name, labels), value in samples.items()
        if name == P + "spend_credits_total"
    }
    assert spend == {
        "search/gpt-5.5": 0.5,
        "search/other": 0.0,
        "new/gpt-6": 0.0,
        "new/other": 0.0,
    }
    assert not any(dict(labels).get("team") == "ops" for _name, labels in samples)


def test_a_sandbox_teams_spend_is_labelled_test_and_follows_a_reload() -> None:
    environments = {"search": "live", "ci": "test"}
    metrics = Metrics(
        ["search", "ci"],
        version="test",
        models=lambda: frozenset({"gpt-5.5"}),
        environment=lambda team: environments.get(team, "live"),
    )
    for team in ("search", "ci"):
        metrics.record_settlement(
            team=team, model="gpt-5.5", cost=Decimal("0.5"), prompt_tokens=3, completion_tokens=2
        )

    def spend() -> dict[tuple[str, str], float]:
        return {
            (dict(labels)["team"], dict(labels)["environment"]): value
            for (name, labels), value in _samples(metrics).items()
            if name == P + "spend_credits_total" and dict(labels)["model"] == "gpt-5.5"
        }

    assert spend() == {("search", "live"): 0.5, ("ci", "test"): 0.5}
    environments["ci"] = "live"  # a reload moves ci to the live key: its series move too
    metrics.set_teams(["search", "ci"])
    assert spend() == {("search", "live"): 0.5, ("ci", "live"): 0.0}


def test_record_functions_equal_the_public_api() -> None:
    """The façade writes what prometheus-client's own calls would (no shortcut in between)."""
    models = frozenset({"gpt-5.5"})
    metrics = Metrics(["search"], version="test", models=lambda: models)
    chat = "/v1/chat/completions"
    registry = CollectorRegistry()
    requests = PCounter(P + "requests", "", ["team", "model", "route", "code"], registry=registry)
    duration = Histogram(
        P + "request_duration_seconds",
        "",
        ["team", "route", "stream"],
        buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
        registry=registry,
    )
    for code, model in ((200, "gpt-5.5"), (200, "nope"), (429, None)):
        metrics.record_request(
            team="search", model=model, route=chat, code=code, stream=False, duration=0.3
        )
        label = model if model in models else "other"
        requests.labels("search", label, chat, str(code)).inc()
        duration.labels("search", chat, "false").observe(0.3)
    mine = {
        k: v for k, v in _samples(metrics).items() if "request" in k[0] and "inflight" not in k[0]
    }
    reference = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert mine == reference
    # In-flight: the end recorded on the same series even after a reload dropped the team.
    ended = metrics.record_request_started("search")
    assert _samples(metrics)[(P + "inflight_requests", (("team", "search"),))] == 1.0
    metrics.set_teams(["search"])
    ended()
    assert _samples(metrics)[(P + "inflight_requests", (("team", "search"),))] == 0.0


def test_budget_headroom_is_remaining_over_the_typical_reservation() -> None:
    metrics = Metrics(["search", "ops"], version="test")
    snapshot = BudgetSnapshot(
        limit=Decimal(10),
        spent=Decimal(7),
        reserved=Decimal(1),
        remaining=Decimal(2),
        resets_at=None,
    )
    metrics.set_budgets({("search", "day"): snapshot, ("ops", "day"): snapshot})
    headroom = P + "budget_headroom_requests"
    assert not [key for key in _samples(metrics) if key[0] == headroom]  # no request seen yet
    metrics.record_reservation("search", Decimal("0.5"))
    assert _samples(metrics)[(headroom, (("period", "day"), ("team", "search")))] == 4.0
    for _ in range(200):  # the average follows the team's recent requests
        metrics.record_reservation("search", Decimal("0.25"))
    assert _samples(metrics)[(headroom, (("period", "day"), ("team", "search")))] == pytest.approx(
        8.0, rel=1e-6
    )
    metrics.record_reservation("ghost", Decimal(1))  # unknown teams are not tracked
    assert metrics.typical_reservation.keys() == {"search"}


PRIVATE_PROMETHEUS: Final = re.compile(
    r"(?<!\bself)\._(value|sum|buckets|upper_bounds|metrics|labelnames|lock|multiprocess|created)\b"
    r"|prometheus_client\.(values|metrics|utils)\b|\bMutexValue\b"
)


def test_the_package_uses_no_private_prometheus_client_attribute() -> None:
    """Nothing reads or swaps prometheus-client's private parts (an object's own are fine).

    Scans every module that imports prometheus-client (the metric objects never leave them:
    see the next test).
    """
    package = Path(clipia_proxy.__file__).parent
    users = [p for p in sorted(package.rglob("*.py")) if "prometheus_client" in p.read_text()]
    assert {p.name for p in users} >= {"metrics.py"}
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in users
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PRIVATE_PROMETHEUS.search(line)
    ]
    assert found == []


def test_the_record_functions_are_the_only_way_to_record() -> None:
    """No metric object is reachable from outside the façade, nor written outside metrics.py."""
    metrics = Metrics(["search"], version="test")
    public = {name: getattr(metrics, name) for name in dir(metrics) if not name.startswith("_")}
    exposed = [name for name, value in public.items() if isinstance(value, MetricWrapperBase)]
    assert exposed == []
    package = Path(clipia_proxy.__file__).parent
    writes = re.compile(r"\.labels\(|prometheus_client")
    outside = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "metrics.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if writes.search(line)
    ]
    # The admin app serves the registry with prometheus-client's aiohttp handler: a read.
    assert all(where.startswith("app.py") for where in outside), outside


async def test_spend_series_follow_a_reload_of_the_running_gateway(mixed: Stack) -> None:
    """A reload adds a team's series at 0, drops a removed team's, keeps counted spend."""
    stack = mixed
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json=chat_body()
        ) as reply:
            assert reply.status == 200
        await wait_settled(stack)
        before = (await scrape(stack, session)).by(
            P + "spend_credits_total", "team", "model", "environment"
        )
        assert before["search", "gpt-5.5", "live"] > 0
        # Team "extra" added (claude-sonnet-* only), team "tpm" renamed "gone".
        keys = {**stack.keys, "extra": generate_key(), "gone": stack.keys["tpm"]}
        teams = TEAMS.replace(
            "  - id: shadow\n",
            "  - id: extra\n    keys: [{{id: extra-1, sha256: {extra}}}]\n"
            '    models: {{allow: ["claude-sonnet-*"]}}\n  - id: shadow\n',
        )
        teams = teams.replace("id: tpm\n", "id: gone\n").replace("{tpm}", "{gone}")
        apply_config(stack.running.app, make_config(stack.emulator_url, keys, teams=teams))
        after = (await scrape(stack, session)).by(
            P + "spend_credits_total", "team", "model", "environment"
        )
    assert after["search", "gpt-5.5", "live"] == before["search", "gpt-5.5", "live"]
    extra = {model for team, model, _env in after if team == "extra"}
    models = stack.running.app[CATALOG].model_ids()
    assert extra == {m for m in models if m.startswith("claude-sonnet-")} | {"other"}
    assert all(after["extra", m, "live"] == 0.0 for m in extra)
    assert not [key for key in after if key[0] == "tpm"]
    assert ("gone", "gpt-5.5", "live") in after

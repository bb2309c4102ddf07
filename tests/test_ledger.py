"""Ledger rules: every branch of the settlement chain, generation lookups and reconciliation.

``decide`` is pure given the generation answer; ``settle`` and ``reconcile`` run against a real
emulator (``/v1/generation``, with scripted lag) through the real ``UpstreamClient``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import msgspec
import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Config, Secret, UpstreamConfig, parse_config
from clipia_proxy.emulator import EmulatorState
from clipia_proxy.emulator.faults import Fault
from clipia_proxy.ledger import Ledger, _GenerationCost
from clipia_proxy.quotas.admission import Admission
from clipia_proxy.quotas.estimate import Estimate
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import Micro, Outcome, RecordState, UsageSource, to_micro
from clipia_proxy.quotas.service import QuotaService
from clipia_proxy.record import RequestInfo
from clipia_proxy.upstream import UpstreamClient, read_body
from clipia_proxy.wire import Usage
from tests.harness import Clock, start_emulator

NOW = 1_795_000_000.0
PROMPT_PRICE = Decimal("0.0004")  # gpt-5.5 in the emulator's catalog: what it bills
COMPLETION_PRICE = Decimal("0.0024")
RUBLES = Decimal(3)


def make_config() -> Config:
    text = f"""
store: {{backend: memory}}
upstream: {{first_byte_timeout_seconds: 120}}
accounting: {{lease_seconds: 600}}
teams:
  - id: search
    keys: [{{id: search-1, sha256: {hash_key(generate_key())}}}]
"""
    return parse_config(text, source="test.yaml", resolve_secrets=False)


@dataclass
class Env:
    state: EmulatorState
    upstream: UpstreamClient
    store: MemoryStore
    quotas: QuotaService
    ledger: Ledger
    clock: Clock
    sleeps: list[float]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    emulator = await start_emulator(seed=7)
    upstream = UpstreamClient(
        UpstreamConfig(base_url=emulator.base_url, api_key_env=None, retries=0),
        Secret(emulator.clipia_key),
    )
    await upstream.start()
    clock = Clock(NOW)
    store = MemoryStore()
    quotas = QuotaService(store, make_config(), clock=clock)
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    ledger = Ledger(quotas, upstream, rubles_per_credit=RUBLES, sleep=fake_sleep)
    try:
        yield Env(emulator.state, upstream, store, quotas, ledger, clock, sleeps)
    finally:
        await upstream.close()
        await emulator.stop()


ESTIMATE = Estimate(prompt_tokens=500, output_tokens=1000, n=2, amount=Micro(12_345))


def admission(rid: str = "req-1", *, reserved: bool = True) -> Admission:
    return Admission(
        request_id=rid,
        team="search",
        amount=ESTIMATE.amount,
        estimate=ESTIMATE,
        reserved=reserved,
        headers={},
    )


def admitted(rid: str = "req-1", **kwargs: object) -> RequestInfo:
    """An admitted request's record (outcome ``completed`` unless given)."""
    kwargs.setdefault("outcome", Outcome.COMPLETED)
    return RequestInfo(
        request_id=rid,
        started=0.0,
        team="search",
        model="gpt-5.5",
        admission=kwargs.pop("admission", None) or admission(rid),  # type: ignore[arg-type]
        prompt_price=kwargs.pop("prompt_price", PROMPT_PRICE),  # type: ignore[arg-type]
        completion_price=kwargs.pop("completion_price", COMPLETION_PRICE),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


async def chat(env: Env, *, fault: Fault | None = None) -> tuple[str, Decimal, int, int]:
    """Send one real chat request to the emulator; return (upstream id, cost, tokens)."""
    if fault is not None:
        env.state.push_fault(fault)
    body = msgspec.json.encode(
        {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
    )
    response = await env.upstream.send(
        "POST", "/chat/completions", request_id=f"chat-{secrets.token_hex(4)}", body=body
    )
    try:
        assert response.status == 200
        data = msgspec.json.decode(await read_body(response, 1 << 20))
    finally:
        response.release()
    bill = env.state.bills[data["id"]]
    return data["id"], bill.cost, bill.prompt_tokens, bill.completion_tokens


async def reserve(env: Env, rid: str) -> Admission:
    return await env.quotas.admit(
        request_id=rid,
        team="search",
        key_id="search-1",
        model="gpt-5.5",
        stream=True,
        estimate=ESTIMATE,
    )


# -- decide: the chain, best source first ----------------------------------------------------


async def test_not_sent_costs_nothing(env: Env) -> None:
    got = env.ledger.decide(admitted(outcome=Outcome.NOT_SENT, usage=Usage(cost=Decimal(1))), None)
    assert (got.cost, got.outcome, got.usage_source) == (0, Outcome.NOT_SENT, UsageSource.COUNTED)
    assert got.now == NOW


@pytest.mark.parametrize("status", [400, 402, 404, 422, 429, 500, 503])
async def test_error_status_costs_nothing(env: Env, status: int) -> None:
    got = env.ledger.decide(
        admitted(upstream_status=status, upstream_id="chatcmpl-x", usage=Usage(cost=Decimal(1))),
        _GenerationCost(cost=Micro(5), prompt_tokens=1, completion_tokens=1),
    )
    assert (got.cost, got.outcome, got.usage_source) == (
        0,
        Outcome.UPSTREAM_ERROR,
        UsageSource.RESPONSE,
    )
    assert got.upstream_id == "chatcmpl-x"


@pytest.mark.parametrize(("from_stream", "source"), [(False, "response"), (True, "stream")])
async def test_usage_cost_wins(env: Env, from_stream: bool, source: str) -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=20, cost=Decimal("0.0000123"))
    got = env.ledger.decide(
        admitted(
            upstream_status=200,
            usage=usage,
            usage_source=UsageSource.STREAM if from_stream else UsageSource.RESPONSE,
            upstream_id="chatcmpl-a",
            outcome=Outcome.CLIENT_DISCONNECT,
        ),
        _GenerationCost(cost=Micro(999), prompt_tokens=1, completion_tokens=1),
    )
    assert got.cost == 13  # 12.3 micro-credits, rounded up
    assert (got.prompt_tokens, got.completion_tokens) == (10, 20)
    assert got.usage_source.value == source
    assert got.outcome is Outcome.CLIENT_DISCONNECT
    assert got.upstream_id == "chatcmpl-a"


async def test_generation_beats_counting(env: Env) -> None:
    usage = Usage(prompt_tokens=10, completion_tokens=20)  # no cost
    got = env.ledger.decide(
        admitted(usage=usage, upstream_id="chatcmpl-g", outcome=Outcome.TIMEOUT),
        _GenerationCost(cost=Micro(777), prompt_tokens=11, completion_tokens=22),
    )
    assert (got.cost, got.prompt_tokens, got.completion_tokens) == (777, 11, 22)
    assert got.usage_source is UsageSource.GENERATION
    assert got.outcome is Outcome.TIMEOUT


async def test_counted_from_tokens_and_catalog_prices(env: Env) -> None:
    got = env.ledger.decide(admitted(usage=Usage(prompt_tokens=1000, completion_tokens=333)), None)
    rubles = 1000 * PROMPT_PRICE + 333 * COMPLETION_PRICE
    assert got.cost == to_micro(rubles / RUBLES)
    assert got.cost == 399_734  # 1.1992 ₽ / 3 = 0.39973(3) credits, rounded up
    assert got.usage_source is UsageSource.COUNTED
    assert (got.prompt_tokens, got.completion_tokens) == (1000, 333)


@pytest.mark.parametrize(
    ("usage", "prices"),
    [
        (None, (PROMPT_PRICE, COMPLETION_PRICE)),
        (Usage(prompt_tokens=10), (PROMPT_PRICE, COMPLETION_PRICE)),
        (Usage(completion_tokens=10), (PROMPT_PRICE, COMPLETION_PRICE)),
        (Usage(prompt_tokens=10, completion_tokens=10), (None, COMPLETION_PRICE)),
    ],
)
async def test_reserved_when_nothing_better_is_known(
    env: Env, usage: Usage | None, prices: tuple[Decimal | None, Decimal | None]
) -> None:
    got = env.ledger.decide(
        admitted(
            usage=usage, prompt_price=prices[0], completion_price=prices[1], outcome=Outcome.TIMEOUT
        ),
        None,
    )
    assert got.cost == ESTIMATE.amount
    assert got.usage_source is UsageSource.RESERVED
    assert got.prompt_tokens == 500
    assert got.completion_tokens == 2 * 1000
    assert got.outcome is Outcome.TIMEOUT


# -- settle: with the emulator's /v1/generation ----------------------------------------------


async def test_settle_with_usage_cost_makes_no_lookup(env: Env) -> None:
    await reserve(env, "r")
    before = len(env.state.requests)
    got = await env.ledger.settle(
        admitted(
            "r",
            upstream_status=200,
            usage=Usage(prompt_tokens=1, completion_tokens=2, cost=Decimal("0.001")),
            upstream_id="chatcmpl-zzz",
        )
    )
    assert got.cost == 1_000
    assert len(env.state.requests) == before
    record = await env.store.record("r")
    assert record is not None
    assert record.state is RecordState.SETTLED
    assert record.cost == 1_000
    assert env.ledger.usage_sources == {"response": 1}


async def test_settle_via_generation_lookup(env: Env) -> None:
    upstream_id, cost, prompt, completion = await chat(env)
    await reserve(env, "r")
    got = await env.ledger.settle(
        admitted(
            "r",
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
            upstream_id=upstream_id,
        )
    )
    assert got.usage_source is UsageSource.GENERATION
    assert got.cost == to_micro(cost)
    assert (got.prompt_tokens, got.completion_tokens) == (prompt, completion)
    assert env.sleeps == []
    record = await env.store.record("r")
    assert record is not None
    assert record.cost == to_micro(cost)
    assert record.upstream_id == upstream_id
    assert await env.store.owner_of(upstream_id) == "search"


async def test_generation_lag_is_retried(env: Env) -> None:
    upstream_id, cost, _, _ = await chat(env, fault=Fault(generation_lag=2))
    await reserve(env, "r")
    got = await env.ledger.settle(admitted("r", upstream_id=upstream_id))
    assert got.usage_source is UsageSource.GENERATION
    assert got.cost == to_micro(cost)
    assert env.sleeps == [0.25, 0.5]  # two 404s, backing off
    lookups = [r for r in env.state.requests if r.path == "/v1/generation"]
    assert len(lookups) == 3


async def test_generation_lagging_too_long_falls_back_to_counting(env: Env) -> None:
    upstream_id, _cost, prompt, completion = await chat(env, fault=Fault(generation_lag=10))
    await reserve(env, "r")
    got = await env.ledger.settle(
        admitted(
            "r",
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
            upstream_id=upstream_id,
        )
    )
    assert got.usage_source is UsageSource.COUNTED
    assert env.sleeps == [0.25, 0.5, 1.0]  # four lookups, backing off between them
    assert got.cost == to_micro((prompt * PROMPT_PRICE + completion * COMPLETION_PRICE) / RUBLES)


async def test_unknown_generation_without_tokens_charges_the_reservation(env: Env) -> None:
    await reserve(env, "r")
    got = await env.ledger.settle(
        admitted("r", upstream_id="chatcmpl-doesnotexist", outcome=Outcome.UPSTREAM_ERROR)
    )
    assert got.usage_source is UsageSource.RESERVED
    assert got.cost == ESTIMATE.amount
    assert got.outcome is Outcome.UPSTREAM_ERROR
    usage = await env.store.usage("search", ["total"], NOW)
    assert (usage["total"].spent, usage["total"].reserved) == (ESTIMATE.amount, 0)


async def test_no_upstream_id_means_no_lookup(env: Env) -> None:
    await reserve(env, "r")
    got = await env.ledger.settle(admitted("r"))
    assert got.usage_source is UsageSource.RESERVED
    assert env.state.requests == []


async def test_fail_open_admission_is_not_written(env: Env) -> None:
    got = await env.ledger.settle(
        admitted(
            "never",
            admission=admission("never", reserved=False),
            usage=Usage(cost=Decimal("0.012")),
        )
    )
    assert got.cost == 12_000
    assert await env.store.record("never") is None
    assert env.ledger.usage_sources == {"response": 1}


async def test_settle_twice_charges_once(env: Env) -> None:
    await reserve(env, "r")
    one = admitted("r", usage=Usage(cost=Decimal("0.002")))
    await env.ledger.settle(one)
    await env.ledger.settle(admitted("r", usage=Usage(cost=Decimal("0.9"))))
    usage = await env.store.usage("search", ["total"], NOW)
    assert usage["total"].spent == 2_000


# -- reconcile ---------------------------------------------------------------------------------


async def test_reconcile_charges_the_reservation_without_an_upstream_id(env: Env) -> None:
    await reserve(env, "crashed")
    assert await env.ledger.reconcile(only_expired=False) == 1
    record = await env.store.record("crashed")
    assert record is not None
    assert record.state is RecordState.SETTLED
    assert (record.cost, record.usage_source, record.outcome) == (
        ESTIMATE.amount,
        "reserved",
        Outcome.CRASHED,
    )
    assert await env.ledger.reconcile(only_expired=False) == 0


async def test_reconcile_uses_generation_when_the_upstream_id_is_known(env: Env) -> None:
    upstream_id, cost, prompt, completion = await chat(env, fault=Fault(generation_lag=1))
    await reserve(env, "crashed")
    await env.store.note_upstream_id("crashed", upstream_id)
    # The generation lags: the record waits for the next pass, its money still reserved.
    assert await env.ledger.reconcile(only_expired=False) == 0
    assert env.ledger.postponed == 1
    usage = await env.store.usage("search", ["total"], env.clock.t)
    assert (usage["total"].spent, usage["total"].reserved) == (0, ESTIMATE.amount)
    assert await env.ledger.reconcile(only_expired=False) == 1
    assert env.ledger.postponed == 0
    record = await env.store.record("crashed")
    assert record is not None
    assert (record.cost, record.usage_source, record.outcome) == (
        to_micro(cost),
        "generation",
        Outcome.CRASHED,
    )
    assert (record.prompt_tokens, record.completion_tokens) == (prompt, completion)
    assert env.sleeps == []  # one lookup per pass: start-up is not held up


async def test_reconcile_charges_the_reservation_once_the_generation_never_came(
    env: Env,
) -> None:
    upstream_id, _cost, _prompt, _completion = await chat(env, fault=Fault(generation_lag=100))
    await reserve(env, "crashed")
    await env.store.note_upstream_id("crashed", upstream_id)
    assert await env.ledger.reconcile(only_expired=False) == 0
    env.clock.advance(3601)
    assert await env.ledger.reconcile(only_expired=False) == 1
    record = await env.store.record("crashed")
    assert record is not None
    assert (record.cost, record.usage_source, record.upstream_id) == (
        ESTIMATE.amount,
        "reserved",
        upstream_id,
    )


async def test_reconcile_only_expired_leaves_live_leases_alone(env: Env) -> None:
    await reserve(env, "live")
    env.clock.advance(100)
    await reserve(env, "later")
    env.clock.advance(550)  # "live" expired (lease 600 s), "later" has 50 s left
    assert await env.ledger.reconcile(only_expired=True) == 1
    live = await env.store.record("live")
    later = await env.store.record("later")
    assert live is not None
    assert live.state is RecordState.SETTLED
    assert live.outcome is Outcome.CRASHED
    assert later is not None
    assert later.state is RecordState.DISPATCHED
    env.clock.advance(60)
    assert await env.ledger.reconcile(only_expired=True) == 1
    assert await env.store.dispatched() == []
    usage = await env.store.usage("search", ["total"], env.clock.t)
    assert (usage["total"].spent, usage["total"].reserved) == (2 * ESTIMATE.amount, 0)


async def test_reconcile_skips_records_settled_meanwhile(env: Env) -> None:
    await reserve(env, "a")
    await reserve(env, "b")
    await env.ledger.settle(admitted("a", usage=Usage(cost=Decimal("0.000001"))))
    assert await env.ledger.reconcile(only_expired=False) == 1
    a = await env.store.record("a")
    assert a is not None
    assert a.cost == 1
    assert a.outcome is Outcome.COMPLETED

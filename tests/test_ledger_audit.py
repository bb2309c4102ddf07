"""Upstream and store faults, each ending with the ledger audit (tests/audit.py).

Every request goes through the real HTTP entry point of a gateway on a loopback socket, with
the emulator as the only upstream and its faults scripted per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import pytest

from clipia_proxy.emulator import Fault
from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Outcome, UsageSource
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import LedgerRecord
from clipia_proxy.wire import decode_json
from tests.audit import (
    CHAT_PATH,
    AuditError,
    Cluster,
    audit,
    emulator_served,
    redis_store,
)
from tests.harness import ClusterFactory, Stack

PROMPT: list[dict[str, object]] = [{"role": "user", "content": "tell me a long story"}]
TEAMS = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 1000, month: 10000}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 1000, month: 10000}}
"""


@pytest.fixture
def clusters(clusters: ClusterFactory) -> ClusterFactory:
    """The conftest factory, with this module's teams unless a test names others."""
    return functools.partial(clusters, teams=TEAMS)


@dataclass
class Reply:
    status: int
    request_id: str
    body: bytes


async def chat(
    gateway: Stack,
    *,
    stream: bool,
    team: str = "search",
    max_tokens: int = 40,
    session: aiohttp.ClientSession | None = None,
) -> Reply:
    """Send one chat request and read the whole answer."""
    body = {"model": "gpt-5.5", "messages": PROMPT, "max_tokens": max_tokens, "stream": stream}
    own = session is None
    client = aiohttp.ClientSession() if session is None else session
    try:
        async with client.post(
            f"{gateway.base_url}/chat/completions", json=body, headers=gateway.auth(team)
        ) as response:
            return Reply(response.status, response.headers["X-Request-Id"], await response.read())
    finally:
        if own:
            await client.close()


async def record_of(gateway: Stack, request_id: str) -> LedgerRecord:
    record = await gateway.running.app[QUOTAS].store.record(request_id)
    assert record is not None, request_id
    return record


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def bill_micro(cluster: Cluster, request_id: str) -> int:
    return emulator_served(cluster.emulator)[request_id].cost


def attempts(cluster: Cluster, request_id: str) -> list[int]:
    return [
        r.status
        for r in cluster.emulator.requests
        if r.path == CHAT_PATH and r.request_id == request_id
    ]


# --------------------------------------------------------------------------- stream faults

STREAM_FAULTS = [
    # (id, fault, outcome, usage_source)
    ("reset", Fault(reset_after_chunks=2), Outcome.UPSTREAM_ERROR, UsageSource.GENERATION),
    ("close_before_usage", Fault(close_before_usage=True), Outcome.UPSTREAM_ERROR, "generation"),
    ("no_usage", Fault(no_usage=True), Outcome.COMPLETED, UsageSource.GENERATION),
    ("usage_without_cost", Fault(usage_without_cost=True), Outcome.COMPLETED, "generation"),
    ("generation_lag", Fault(no_usage=True, generation_lag=2), Outcome.COMPLETED, "generation"),
    ("framing", Fault(crlf=True, tiny_writes=True, comments=True), Outcome.COMPLETED, "stream"),
    ("usage_unasked", Fault(usage_unasked=True), Outcome.COMPLETED, UsageSource.STREAM),
]


@pytest.mark.parametrize(
    ("fault", "outcome", "source"),
    [pytest.param(f, o, s, id=name) for name, f, o, s in STREAM_FAULTS],
)
async def test_stream_fault_settles_at_the_bill(
    clusters: ClusterFactory, fault: Fault, outcome: Outcome, source: str
) -> None:
    cluster = await clusters()
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(fault)
    reply = await chat(gateway, stream=True)
    assert reply.status == 200
    done = reply.body.rstrip().endswith(b"data: [DONE]")
    if outcome is Outcome.UPSTREAM_ERROR:
        assert b'"error"' in reply.body
        assert not done
    else:
        assert done
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    assert (record.outcome, record.usage_source) == (outcome, source)
    assert record.cost == bill_micro(cluster, reply.request_id) > 0


async def test_stall_mid_stream_times_out_and_settles_via_generation(
    clusters: ClusterFactory,
) -> None:
    cluster = await clusters(upstream="idle_timeout_seconds: 0.4")
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(Fault(stall_after_chunks=2, stall_seconds=3))
    reply = await chat(gateway, stream=True)
    assert reply.status == 200
    assert b"upstream_timeout" in reply.body
    assert not reply.body.endswith(b"data: [DONE]\n\n")
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    assert (record.outcome, record.usage_source) == (Outcome.TIMEOUT, UsageSource.GENERATION)
    assert record.prompt_tokens > 0


async def test_generation_never_answers_falls_back_to_counted(clusters: ClusterFactory) -> None:
    """``usage`` without ``cost`` and a lookup that lags past every retry: tokens times price."""
    cluster = await clusters()
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(Fault(usage_without_cost=True, generation_lag=100))
    reply = await chat(gateway, stream=True)
    assert reply.status == 200
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    assert record.usage_source == UsageSource.COUNTED
    assert record.cost >= bill_micro(cluster, reply.request_id)
    assert record.prompt_tokens > 0


# --------------------------------------------------------------------------- non-stream


@pytest.mark.parametrize(
    ("fault", "source"),
    [
        pytest.param(Fault(), UsageSource.RESPONSE, id="plain"),
        pytest.param(Fault(no_usage=True), UsageSource.GENERATION, id="no_usage"),
        pytest.param(Fault(usage_without_cost=True), UsageSource.GENERATION, id="no_cost"),
        pytest.param(Fault(no_usage=True, generation_lag=1), UsageSource.GENERATION, id="lag"),
    ],
)
async def test_non_stream_settles_at_the_bill(
    clusters: ClusterFactory, fault: Fault, source: str
) -> None:
    cluster = await clusters()
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(fault)
    reply = await chat(gateway, stream=False)
    assert reply.status == 200
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    assert (record.outcome, record.usage_source) == (Outcome.COMPLETED, source)
    assert record.cost == bill_micro(cluster, reply.request_id)


# --------------------------------------------------------------------------- upstream statuses


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("faults", "status", "billed", "tries"),
    [
        pytest.param([Fault(status=500)], 200, True, 2, id="500-then-ok"),
        pytest.param([Fault(status=429, retry_after="0")], 200, True, 2, id="429-then-ok"),
        pytest.param([Fault(status=500, times=3)], 500, False, 3, id="500-exhausted"),
        pytest.param(
            [Fault(status=429, retry_after="0", times=3)], 429, False, 3, id="429-exhausted"
        ),
        pytest.param([Fault(status=503, retry_after="30")], 503, False, 1, id="503-long-wait"),
        pytest.param([Fault(status=400)], 400, False, 1, id="400"),
    ],
)
async def test_upstream_error_statuses(
    clusters: ClusterFactory,
    faults: list[Fault],
    status: int,
    billed: bool,
    tries: int,
    stream: bool,
) -> None:
    """Retried answers are one request id and one record; refused ones cost 0.

    The gateway retries statuses only when the operator opts in (``retry_on_status``).
    """
    cluster = await clusters(upstream="retry_on_status: [429, 500, 503]")
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(*faults)
    reply = await chat(gateway, stream=stream)
    assert reply.status == status
    assert len(attempts(cluster, reply.request_id)) == tries
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    if billed:
        assert record.cost == bill_micro(cluster, reply.request_id)
        assert record.outcome is Outcome.COMPLETED
    else:
        assert reply.request_id not in emulator_served(cluster.emulator)
        assert record.cost == 0
        assert record.outcome is Outcome.UPSTREAM_ERROR


async def test_upstream_down_is_not_sent_at_zero(clusters: ClusterFactory) -> None:
    cluster = await clusters()
    gateway = cluster.gateways[0]
    await chat(gateway, stream=False)  # the catalog is warm, the emulator known good
    await cluster.runner.cleanup()  # nothing listens there any more
    replies = [await chat(gateway, stream=stream) for stream in (False, True)]
    await audit(cluster.gateways, cluster.emulator)
    for reply in replies:
        assert reply.status == 502
        assert decode_json(reply.body)["error"]["code"] == "upstream_unavailable"  # type: ignore[index]
        record = await record_of(gateway, reply.request_id)
        assert (record.outcome, record.cost) == (Outcome.NOT_SENT, 0)


async def test_a_full_upstream_pool_sheds_503_overloaded_and_nothing_is_sent(
    clusters: ClusterFactory,
) -> None:
    """All ``max_connections`` taken: the next request is shed at once with 503, never sent."""
    cluster = await clusters(upstream="max_connections: 1\nconnect_timeout_seconds: 0.3")
    gateway = cluster.gateways[0]
    await chat(gateway, stream=False)  # the catalog is warm: no fetch needs the connection
    arrived = len(cluster.emulator.requests)
    cluster.emulator.push_fault(Fault(first_byte_delay=1.5))
    async with asyncio.TaskGroup() as group:
        slow = group.create_task(chat(gateway, stream=False))
        await eventually(lambda: len(cluster.emulator.requests) > arrived)  # it holds the one
        # Another team: the first one's share (the whole pool of 1) is not what refuses it.
        busy = await chat(gateway, stream=True, team="research")
        assert not slow.done()  # refused while the slow one still held the only connection
    assert slow.result().status == 200
    await audit(cluster.gateways, cluster.emulator)
    assert busy.status == 503
    assert decode_json(busy.body)["error"]["code"] == "overloaded"  # type: ignore[index]
    assert busy.request_id not in emulator_served(cluster.emulator)
    # Shed before its admission: no reservation, no ledger record.
    assert await gateway.running.app[QUOTAS].store.record(busy.request_id) is None
    assert (await chat(gateway, stream=True)).status == 200  # the connection is free again


async def test_slow_first_byte_is_504_charged_the_reservation(clusters: ClusterFactory) -> None:
    cluster = await clusters(upstream="first_byte_timeout_seconds: 0.3")
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(Fault(first_byte_delay=0.6))
    reply = await chat(gateway, stream=True)
    assert reply.status == 504
    # The emulator bills once its delay is over: "maybe charged" became "charged".
    await eventually(lambda: reply.request_id in emulator_served(cluster.emulator))
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, reply.request_id)
    assert (record.outcome, record.usage_source) == (Outcome.TIMEOUT, UsageSource.RESERVED)
    assert attempts(cluster, reply.request_id) == [200]


# --------------------------------------------------------------------------- client gone


@pytest.mark.parametrize("on_disconnect", ["drain", "cancel"])
async def test_client_gone_after_first_chunk(clusters: ClusterFactory, on_disconnect: str) -> None:
    cluster = await clusters(extra=f"accounting: {{on_disconnect: {on_disconnect}}}")
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(Fault(chunk_gap=0.05))
    body = {"model": "gpt-5.5", "messages": PROMPT, "max_tokens": 40, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.base_url}/chat/completions", json=body, headers=gateway.auth()
        ) as response,
    ):
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        first = await response.content.readany()
        assert first.startswith(b"data: ")
        response.close()
    await audit(cluster.gateways, cluster.emulator)
    record = await record_of(gateway, request_id)
    assert record.outcome is Outcome.CLIENT_DISCONNECT
    expected = UsageSource.STREAM if on_disconnect == "drain" else UsageSource.GENERATION
    assert record.usage_source == expected
    assert record.cost == bill_micro(cluster, request_id)
    (upstream,) = [r for r in cluster.emulator.requests if r.request_id == request_id]
    # drain reads the upstream to its end; cancel closes it.
    assert upstream.completed is (on_disconnect == "drain")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("on_disconnect", ["drain", "cancel"])
async def test_client_gone_before_headers(
    clusters: ClusterFactory, on_disconnect: str, stream: bool
) -> None:
    """The client leaves while Clipia computes: one settled record, never below the bill."""
    cluster = await clusters(extra=f"accounting: {{on_disconnect: {on_disconnect}}}")
    gateway = cluster.gateways[0]
    cluster.emulator.push_fault(Fault(first_byte_delay=0.4))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.15):
            await chat(gateway, stream=stream)
    await eventually(lambda: bool(emulator_served(cluster.emulator)))
    records = await audit(cluster.gateways, cluster.emulator)
    ((request_id, served),) = emulator_served(cluster.emulator).items()
    (record,) = records
    assert record.request_id == request_id
    assert record.cost >= served.cost
    assert record.prompt_tokens > 0


# --------------------------------------------------------------------------- mixed load

MIXED_FAULTS = [
    Fault(reset_after_chunks=1),
    Fault(close_before_usage=True),
    Fault(no_usage=True),
    Fault(usage_without_cost=True),
    Fault(status=500),
    Fault(status=429, retry_after="0"),
    Fault(status=400),
    Fault(stall_after_chunks=1, stall_seconds=0.2),
    Fault(no_usage=True, generation_lag=1),
    Fault(crlf=True, events_per_write=3),
]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_mixed_load_audits_clean(
    clusters: ClusterFactory,
    backend: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """~300 requests, 20 at a time, two teams, stream and not, 5% faults, 5% disconnects.

    SQLite: one gateway. Redis: three gateways sharing it, requests spread round-robin.
    """
    total, parallel = 300, 20
    rng = random.Random(20261125)
    if backend == "sqlite":
        cluster = await clusters()
    else:
        postgres_dsn = request.getfixturevalue("postgres_dsn")
        cluster = await clusters(
            3,
            store=redis_store(redis_url, monkeypatch, postgres_dsn=postgres_dsn, label="mixed"),
        )
    gateways = cluster.gateways
    cluster.emulator.push_fault(
        *(rng.choice(MIXED_FAULTS) if rng.random() < 0.05 else Fault() for _ in range(2 * total))
    )
    gate = asyncio.Semaphore(parallel)
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=parallel * 2)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> None:
            gateway = gateways[index % len(gateways)]
            team = "search" if index % 2 else "research"
            stream = rng.random() < 0.5
            leave_early = rng.random() < 0.05
            body = {
                "model": "gpt-5.5",
                "messages": [{"role": "user", "content": f"story {index}"}],
                "max_tokens": 30,
                "stream": stream,
            }
            async with gate:
                if leave_early:
                    try:
                        async with (
                            asyncio.timeout(rng.uniform(0.0, 0.02)),
                            session.post(
                                f"{gateway.base_url}/chat/completions",
                                json=body,
                                headers=gateway.auth(team),
                            ) as response,
                        ):
                            await response.content.readany()
                    except TimeoutError:
                        statuses.append(-1)
                    else:
                        statuses.append(response.status)
                    return
                async with session.post(
                    f"{gateway.base_url}/chat/completions", json=body, headers=gateway.auth(team)
                ) as response:
                    await response.read()
                    statuses.append(response.status)

        async with asyncio.timeout(30):
            await asyncio.gather(*(one(i) for i in range(total)))
    assert len(statuses) == total
    assert set(statuses) <= {200, 400, 429, 500, -1}
    assert statuses.count(200) > total * 0.8
    records = await audit(cluster.gateways, cluster.emulator)
    served = emulator_served(cluster.emulator)
    assert len(served) > total * 0.8
    # GET /v1/key agrees with the ledger, to the micro-credit, for both teams, everywhere.
    async with aiohttp.ClientSession() as session:
        for gateway, team in itertools.product(gateways, ("search", "research")):
            async with session.get(f"{gateway.base_url}/key", headers=gateway.auth(team)) as got:
                assert got.status == 200
                data = decode_json(await got.read())["data"]  # type: ignore[index]
            ledger = sum(r.cost for r in records if r.team == team)
            assert ledger > 0
            expected = Decimal(ledger) / MICRO_PER_CREDIT
            assert Decimal(str(data["usage"])) == expected
            assert {b["period"] for b in data["budgets"]} == {"day", "month"}
            for budget in data["budgets"]:
                assert Decimal(str(budget["spent"])) == expected
                assert Decimal(str(budget["reserved"])) == 0


# --------------------------------------------------------------------------- the audit itself


async def test_audit_detects_disagreement(clusters: ClusterFactory) -> None:
    """The audit is not vacuous: each kind of disagreement with the emulator fails it."""
    cluster = await clusters()
    gateway = cluster.gateways[0]
    replies = [await chat(gateway, stream=stream) for stream in (False, True)]
    await audit(cluster.gateways, cluster.emulator)
    emulator = cluster.emulator
    (generation,) = [g for g, b in emulator.bills.items() if b.request_id == replies[0].request_id]
    original = emulator.bills[generation]

    # A bill one micro-credit higher than the ledger's settlement.
    emulator.bills[generation] = dataclasses.replace(
        original, cost=original.cost + Decimal("0.000001")
    )
    with pytest.raises(AuditError, match="differs from the bill"):
        await audit(cluster.gateways, emulator)
    emulator.bills[generation] = original

    # A generation the emulator served that the ledger never recorded.
    (recorded,) = [r for r in emulator.requests if r.request_id == replies[1].request_id]
    ghost = dataclasses.replace(recorded, request_id="ghost", generation_id=generation)
    emulator.requests.append(ghost)
    with pytest.raises(AuditError, match="not in the ledger: ghost"):
        await audit(cluster.gateways, emulator)
    emulator.requests.remove(ghost)

    # A request the test saw refused, yet in the ledger and at the upstream.
    with pytest.raises(AuditError, match="refused request"):
        await audit(cluster.gateways, emulator, refused=[replies[0].request_id])

    # The store's spent drifting from the records.
    store = gateway.running.app[QUOTAS].store
    assert isinstance(store, SqliteStore)
    store.engine.add_spent("search", "total", 1)
    with pytest.raises(AuditError, match="store spent"):
        await audit(cluster.gateways, emulator)
    store.engine.add_spent("search", "total", -1)
    await audit(cluster.gateways, emulator)

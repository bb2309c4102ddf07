"""Barrier-released races through the real HTTP entry point: no budget or limit overshoot.

M identical requests wait on one ``asyncio.Event`` and go together while the emulator holds
every billed reply (``state.hold``) until all M have been decided: each one is either refused
by the gateway or waiting inside the emulator. Only then are the replies released. One replica
on SQLite, and three replicas sharing one Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import msgspec
import pytest

from clipia_proxy.emulator.catalog import catalog_entry, chat_price
from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.estimate import estimate
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Period
from clipia_proxy.wire import encode_json
from tests.audit import CHAT_PATH, Cluster, audit
from tests.audit import redis_store as shared_redis
from tests.harness import BOUND, ClusterFactory, Stack

MODEL = "gpt-5.5"
BODY: dict[str, object] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "barrier race"}],
    "max_tokens": 64,
}
K = 10
M = 200
DECIDE_WITHIN = BOUND
"""How long 200 requests may take to be decided: a bound on a hang (8 s was exceeded by a
loaded 2-core machine), not a speed requirement."""


def reservation(body: dict[str, object]) -> int:
    """Return the worst-case reservation (micro-credits) the gateway makes for ``body``."""
    price = chat_price(str(body["model"]))
    entry = catalog_entry(str(body["model"]))
    assert price is not None
    assert entry is not None
    context = entry.get("context_length")
    return estimate(
        raw_body=encode_json(body),
        body=body,
        prompt_price=price.prompt,
        completion_price=price.completion,
        context_length=context if isinstance(context, int) else None,
        team_max_tokens=None,
        default_output_tokens=4096,
        image_reserve_tokens=2000,
        rubles_per_credit=Decimal(3),
        ceiling=None,
    ).amount


RESERVE = reservation(BODY)


def credits_text(micro: int) -> str:
    return format(Decimal(micro) / MICRO_PER_CREDIT, "f")


def team_yaml(*, budget: str = "", limits: str = "") -> str:
    lines = [
        "teams:",
        "  - id: search",
        "    keys: [{{id: search-1, sha256: {search}}}]",
        '    models: {{allow: ["*"]}}',
    ]
    if budget:
        lines.append(f"    budget: {{{{{budget}}}}}")
    if limits:
        lines.append(f"    limits: {{{{{limits}}}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Reply:
    status: int
    request_id: str
    retry_after: str | None
    code: str | None


@dataclass
class Race:
    replies: list[Reply]
    held: int
    """Requests waiting inside the emulator when every one had been decided."""
    max_held: int

    def by_status(self, status: int) -> list[Reply]:
        return [r for r in self.replies if r.status == status]


def held(cluster: Cluster) -> int:
    """Return how many billed chat requests are waiting on the emulator's hold."""
    return sum(
        1
        for r in cluster.emulator.requests
        if r.path == CHAT_PATH and r.generation_id is not None and r.status == 0
    )


async def race(
    cluster: Cluster,
    count: int,
    *,
    body: dict[str, object] = BODY,
    on_decided: Callable[[], Awaitable[None]] | None = None,
) -> Race:
    """Release ``count`` identical requests together, round-robin over the gateways.

    Replies are held by the emulator until every request is decided (refused, or held);
    ``on_decided`` runs at that point, before the replies are released.
    """
    hold = asyncio.Event()
    cluster.emulator.hold = hold
    go = asyncio.Event()
    done: list[Reply] = []
    payload = encode_json(body)
    gateways = cluster.gateways
    connector = aiohttp.TCPConnector(limit=count + 10)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> Reply:
            gateway = gateways[index % len(gateways)]
            await go.wait()
            async with session.post(
                f"{gateway.base_url}/chat/completions",
                data=payload,
                headers={**gateway.auth(), "Content-Type": "application/json"},
            ) as response:
                raw = await response.read()
                code = None
                if response.status != 200:
                    code = msgspec.json.decode(raw)["error"]["code"]
                reply = Reply(
                    status=response.status,
                    request_id=response.headers["X-Request-Id"],
                    retry_after=response.headers.get("Retry-After"),
                    code=code,
                )
            done.append(reply)
            return reply

        replies = asyncio.gather(*(one(i) for i in range(count)))
        max_held = 0
        try:
            go.set()
            async with asyncio.timeout(DECIDE_WITHIN):
                while True:
                    now_held = held(cluster)
                    max_held = max(max_held, now_held)
                    if len(done) + now_held >= count:
                        break
                    await asyncio.sleep(0.005)
            decided_held = held(cluster)
            assert len(done) + decided_held == count
            if on_decided is not None:
                await on_decided()
        finally:
            hold.set()
        async with asyncio.timeout(DECIDE_WITHIN):
            results = await replies
    cluster.emulator.hold = None
    return Race(replies=list(results), held=decided_held, max_held=max_held)


def received_ids(cluster: Cluster) -> set[str]:
    return {
        r.request_id
        for r in cluster.emulator.requests
        if r.path == CHAT_PATH and r.request_id is not None
    }


async def window_usage(stack: Stack, period: Period) -> tuple[int, int]:
    quotas = stack.running.app[QUOTAS]
    now = quotas.now()
    key = quotas.windows(now)[period].key
    used = (await quotas.store.usage("search", [key], now))[key]
    return used.spent, used.reserved


@pytest.fixture
def redis_store(redis_url: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``store:`` and ``ledger:`` for three gateways sharing one Redis and one PostgreSQL."""
    return shared_redis(redis_url, monkeypatch, postgres_dsn=postgres_dsn, replicas=3, label="race")


async def start_backend(
    clusters: ClusterFactory, backend: str, redis_store: str | None, teams: str
) -> Cluster:
    if backend == "sqlite":
        return await clusters(1, teams=teams)
    return await clusters(3, teams=teams, store=redis_store)


# --------------------------------------------------------------------------- budget


async def check_budget_race(cluster: Cluster, budget: int) -> None:
    result = await race(cluster, M)
    admitted = result.by_status(200)
    refused = result.by_status(402)
    assert result.held == K
    assert len(admitted) == K, [r.status for r in result.replies]
    assert len(refused) == M - K
    for reply in refused:
        assert reply.code == "budget_exceeded"
        assert reply.retry_after is not None
        assert int(reply.retry_after) > 0
    assert not {r.request_id for r in refused} & received_ids(cluster)
    records = await audit(
        cluster.gateways, cluster.emulator, refused=[r.request_id for r in refused]
    )
    assert sorted(r.request_id for r in records) == sorted(r.request_id for r in admitted)
    assert {r.reserved for r in records} == {RESERVE}
    spent, reserved = await window_usage(cluster.gateways[0], Period.DAY)
    assert reserved == 0
    assert 0 < spent <= budget


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_budget_race_admits_exactly_k(
    clusters: ClusterFactory, backend: str, request: pytest.FixtureRequest
) -> None:
    budget = (K + 1) * RESERVE - 1
    store = request.getfixturevalue("redis_store") if backend == "redis" else None
    cluster = await start_backend(
        clusters, backend, store, team_yaml(budget=f"day: {credits_text(budget)}")
    )
    await check_budget_race(cluster, budget)


async def test_budget_race_sqlite_repeated(clusters: ClusterFactory) -> None:
    budget = (K + 1) * RESERVE - 1
    for _ in range(5):
        cluster = await clusters(1, teams=team_yaml(budget=f"day: {credits_text(budget)}"))
        await check_budget_race(cluster, budget)
        await cluster.stop()


@pytest.mark.parametrize("tight", [Period.DAY, Period.MONTH])
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_day_and_month_budget_all_or_nothing(
    clusters: ClusterFactory, backend: str, tight: Period, request: pytest.FixtureRequest
) -> None:
    """A request refused by one period leaves no reservation on the other."""
    tight_budget = (K + 1) * RESERVE - 1
    loose_budget = 3 * K * RESERVE
    day, month = (
        (tight_budget, loose_budget) if tight is Period.DAY else (loose_budget, tight_budget)
    )
    store = request.getfixturevalue("redis_store") if backend == "redis" else None
    cluster = await start_backend(
        clusters,
        backend,
        store,
        team_yaml(budget=f"day: {credits_text(day)}, month: {credits_text(month)}"),
    )
    gateway = cluster.gateways[0]
    outcome: list[tuple[int, int]] = []

    async def inspect_while_held() -> None:
        # Every request is decided and the admitted ones are held: nothing has settled yet.
        for period in (Period.DAY, Period.MONTH):
            outcome.append(await window_usage(gateway, period))

    result = await race(cluster, 60, on_decided=inspect_while_held)
    assert len(result.by_status(200)) == K
    assert {r.code for r in result.by_status(402)} == {"budget_exceeded"}
    assert len(result.by_status(402)) == 60 - K
    # While held: exactly the K admitted reservations on both periods, nothing from refusals.
    assert outcome == [(0, K * RESERVE), (0, K * RESERVE)]
    records = await audit(
        cluster.gateways,
        cluster.emulator,
        refused=[r.request_id for r in result.by_status(402)],
    )
    spent = sum(r.cost for r in records)
    for period in (Period.DAY, Period.MONTH):
        assert await window_usage(gateway, period) == (spent, 0)
    assert spent <= tight_budget


# --------------------------------------------------------------------------- concurrency, rpm


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_concurrency_race_never_exceeds_limit(
    clusters: ClusterFactory, backend: str, request: pytest.FixtureRequest
) -> None:
    limit = 4
    store = request.getfixturevalue("redis_store") if backend == "redis" else None
    cluster = await start_backend(
        clusters, backend, store, team_yaml(limits=f"concurrency: {limit}")
    )
    result = await race(cluster, 60)
    assert result.max_held <= limit
    assert result.held == limit
    assert len(result.by_status(200)) == limit
    refused = result.by_status(429)
    assert len(refused) == 60 - limit
    assert {r.code for r in refused} == {"concurrency_limit_exceeded"}
    assert all(r.retry_after is not None for r in refused)
    await audit(cluster.gateways, cluster.emulator, refused=[r.request_id for r in refused])
    # The leases are back: the next request is served.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{cluster.gateways[-1].base_url}/chat/completions",
            json=BODY,
            headers=cluster.gateways[-1].auth(),
        ) as response,
    ):
        assert response.status == 200
    await audit(cluster.gateways, cluster.emulator)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_rpm_race_across_replicas(
    clusters: ClusterFactory, backend: str, request: pytest.FixtureRequest
) -> None:
    rpm = 10
    store = request.getfixturevalue("redis_store") if backend == "redis" else None
    cluster = await start_backend(clusters, backend, store, team_yaml(limits=f"rpm: {rpm}"))
    result = await race(cluster, 60)
    assert result.held == rpm
    assert len(received_ids(cluster)) == rpm
    assert len(result.by_status(200)) == rpm
    refused = result.by_status(429)
    assert len(refused) == 60 - rpm
    assert {r.code for r in refused} == {"rate_limit_exceeded"}
    assert all(r.retry_after is not None and int(r.retry_after) > 0 for r in refused)
    await audit(cluster.gateways, cluster.emulator, refused=[r.request_id for r in refused])

"""A team key's own budget (``teams[].keys[].budget``): through HTTP, and across a restart.

The key's budget is reserved in the same record as the team's, on key-scoped windows, so a CI
key with a small budget is refused while the team's other keys keep working, and what the key
spent is rebuilt from the ledger when the gateway starts again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from clipia_proxy.keys import QUOTAS
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.quotas.ledgered import EngineStore
from clipia_proxy.quotas.model import Micro, Period, ReserveRequest, Settlement, TeamLimits
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import Store
from tests.conftest import Stack, fresh_postgres_schema, wait_settled
from tests.harness import decided

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys:
      - {{id: app-key, sha256: {search}}}
      - {{id: ci-key, sha256: {research}, budget: {{day: 0.000001}}}}
    models: {{allow: ["*"]}}
    budget: {{day: 100}}
"""
BODY = {"model": "gpt-5.5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_key_over_its_budget_is_refused_while_the_others_work(
    stacks: Factory, counters: str | None
) -> None:
    # On memory, SQLite and Redis counters; "research" is the second key of team search.
    stack = await stacks(teams=TEAMS, store=counters)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(
                f"{stack.base_url}/chat/completions", json=BODY, headers=stack.auth("research")
            ) as reply:
                assert reply.status == 402
                error = (await reply.json())["error"]
                assert error["code"] == "budget_exceeded"
                assert error["message"].startswith("Key 'ci-key' of team 'search' has used 0 ")
                assert "credits per day" in error["message"]
                assert int(reply.headers["Retry-After"]) > 0
            async with http.post(
                f"{stack.base_url}/chat/completions", json=BODY, headers=stack.auth("search")
            ) as reply:
                assert reply.status == 200, await reply.text()
                assert float(reply.headers["x-clipia-budget-remaining"]) > 99
        # /v1/key: the key's own budget next to the team's; limit_remaining is the tighter.
        async with http.get(f"{stack.base_url}/key", headers=stack.auth("research")) as reply:
            data = (await reply.json())["data"]
        assert (data["key_id"], data["limit"], data["limit_remaining"]) == ("ci-key", 1e-06, 1e-06)
        (own,) = data["key"]["budgets"]
        assert (own["period"], own["limit"], own["spent"]) == ("day", 1e-06, 0)
        assert data["key"]["rate_limit"] is None
        assert [b["limit"] for b in data["budgets"]] == [100]
        async with http.get(f"{stack.base_url}/key", headers=stack.auth("search")) as reply:
            data = (await reply.json())["data"]
        assert (data["key_id"], data["limit"], data["key"]) == ("app-key", 100, None)
    await wait_settled(stack)
    records = await stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf"))
    assert [r.key_id for r in records] == ["app-key", "app-key"]
    assert len(stack.chat_requests()) == 2  # the refused key's requests never went upstream


def reserve(request_id: str, now: float, day: str) -> ReserveRequest:
    return ReserveRequest(
        request_id=request_id,
        team="search",
        amount=Micro(1_000),
        tokens=10,
        periods={
            Period.DAY: day,
            Period.TOTAL: "total",
            Period.KEY_DAY: f"{day}:key:ci",
            Period.KEY_TOTAL: "total:key:ci",
        },
        now=now,
        lease_seconds=600,
        limits=TeamLimits(budgets={Period.KEY_DAY: Micro(1_500), Period.KEY_TOTAL: Micro(10**6)}),
        key_id="ci",
    )


async def spend_then_restart(make: Callable[[], Awaitable[Store]]) -> None:
    now = time.time()
    day = "day:" + time.strftime("%Y-%m-%d", time.localtime(now))
    store = await make()
    try:
        assert (await decided(store, reserve("r1", now, day))).admitted
        assert await store.settle("r1", Settlement(cost=Micro(800), now=now))
    finally:
        await store.close()
    store = await make()  # a new process: counters rebuilt from the ledger
    try:
        keys = [f"{day}:key:ci", "total:key:ci"]
        usage = await store.usage("search", keys, now)
        assert [usage[key].spent for key in keys] == [800, 800]
        refused = await decided(store, reserve("r2", now, day))
        assert (refused.admitted, refused.period) == (False, Period.KEY_DAY)
    finally:
        await store.close()


async def test_a_keys_spend_survives_a_restart_on_sqlite(tmp_path: Path) -> None:
    async def make() -> Store:
        store = SqliteStore(tmp_path / "ledger.db", clock=time.time)
        await store.start()
        return store

    await spend_then_restart(make)


async def test_a_keys_spend_survives_a_restart_on_postgres(postgres_dsn: str) -> None:
    dsn = await fresh_postgres_schema(postgres_dsn)

    async def make() -> Store:
        store = EngineStore(PostgresLedger(dsn), clock=time.time)
        await store.start()
        return store

    await spend_then_restart(make)

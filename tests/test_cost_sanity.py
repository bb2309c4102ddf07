"""Upstream costs are sanity-checked before they are settled, through HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from clipia_proxy.emulator import Fault
from tests.conftest import Stack, wait_settled

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    caps: {{max_tokens: 100}}
    budget: {{day: 10}}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""

BODY: dict[str, Any] = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}


async def metric(stack: Stack, session: aiohttp.ClientSession, line_start: str) -> float:
    async with session.get(f"{stack.admin_url}/metrics") as reply:
        text = await reply.text()
    (line,) = [line for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


async def spent_today(stack: Stack, session: aiohttp.ClientSession) -> Decimal:
    await wait_settled(stack)
    async with session.get(f"{stack.base_url}/key", headers=stack.auth("search")) as reply:
        budgets = (await reply.json())["data"]["budgets"]
    (day,) = [b for b in budgets if b["period"] == "day"]
    return Decimal(str(day["spent"]))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reported", ["1e9", "17"])
async def test_an_implausible_upstream_cost_is_settled_from_tokens(
    stacks: Factory, stream: bool, reported: str
) -> None:
    stack = await stacks(teams=TEAMS)
    stack.emulator.push_fault(Fault(reported_cost=reported))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{stack.base_url}/chat/completions",
            headers=stack.auth("search"),
            json={**BODY, "stream": stream},
        ) as reply:
            assert reply.status == 200
            await reply.read()
        spent = await spent_today(stack, session)
        implausible = await metric(stack, session, "clipia_proxy_upstream_cost_implausible_total")
        counted = await metric(stack, session, 'clipia_proxy_usage_source_total{source="counted"}')
        # The team is not locked out: its next request is served.
        async with session.post(
            f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json=BODY
        ) as reply:
            assert reply.status == 200
    (bill,) = list(stack.emulator.bills.values())[:1]
    # Tokens x catalog prices: the emulator's true bill (it rounds to 6 places, we round up).
    assert bill.cost <= spent <= bill.cost + Decimal("0.000001")
    assert implausible == 1
    assert counted == 1


async def test_a_plausible_cost_is_taken_as_reported(stacks: Factory) -> None:
    stack = await stacks(teams=TEAMS)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json=BODY
        ) as reply:
            assert reply.status == 200
        spent = await spent_today(stack, session)
        implausible = await metric(stack, session, "clipia_proxy_upstream_cost_implausible_total")
    (bill,) = stack.emulator.bills.values()
    assert spent == bill.cost
    assert implausible == 0

"""``GET /v1/generation`` counts against the team's RPM and is answered from the ledger."""

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
    limits: {{rpm: 5}}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""

BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


async def chat(stack: Stack, session: aiohttp.ClientSession, **extra: Any) -> tuple[int, bytes]:
    async with session.post(
        f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json={**BODY, **extra}
    ) as reply:
        return reply.status, await reply.read()


async def lookup(
    stack: Stack, session: aiohttp.ClientSession, upstream_id: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.get(
        f"{stack.base_url}/generation", params={"id": upstream_id}, headers=stack.auth("search")
    ) as reply:
        return reply.status, dict(reply.headers), await reply.json()


def upstream_lookups(stack: Stack) -> int:
    return sum(1 for r in stack.emulator.requests if r.path == "/v1/generation")


@pytest.mark.parametrize(
    ("stream", "fault"),
    [(False, None), (True, None), (False, Fault(usage_without_cost=True))],
    ids=["response", "stream", "settled-from-generation"],
)
async def test_a_settled_generation_is_answered_from_the_ledger(
    stacks: Factory, stream: bool, fault: Fault | None
) -> None:
    stack = await stacks(teams=TEAMS)
    if fault is not None:
        stack.emulator.push_fault(fault)
    async with aiohttp.ClientSession() as session:
        status, _ = await chat(stack, session, stream=stream)
        assert status == 200
        await wait_settled(stack)
        (bill,) = stack.emulator.bills.values()
        before = upstream_lookups(stack)  # the settlement's own lookup, if it needed one
        status, _, answer = await lookup(stack, session, bill.id)
    assert status == 200
    assert upstream_lookups(stack) == before
    data = answer["data"]
    assert data["id"] == bill.id
    assert data["model"] == bill.model
    assert data["streamed"] is stream
    assert Decimal(str(data["total_cost"])) == bill.cost
    assert (data["tokens_prompt"], data["tokens_completion"]) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )


async def test_lookups_count_against_the_teams_rpm(stacks: Factory) -> None:
    stack = await stacks(teams=TEAMS)
    async with aiohttp.ClientSession() as session:
        assert (await chat(stack, session))[0] == 200
        (bill,) = stack.emulator.bills.values()
        statuses = [(await lookup(stack, session, bill.id))[0] for _ in range(5)]
        # One chat + four lookups fill the 5 requests per minute; the fifth lookup is refused,
        # and so is the next chat request: lookups took their places.
        assert statuses == [200, 200, 200, 200, 429]
        status, headers, answer = await lookup(stack, session, "chatcmpl-000000000000")
        assert status == 429
        assert answer["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert (await chat(stack, session))[0] == 429
    assert len(stack.chat_requests()) == 1

"""A budget is a bound: what the upstream may write is what was reserved, through HTTP.

The emulator writes long answers (``completion_tokens``) and, scripted, ignores
``max_tokens``; the spend is read from the emulator's bills and the gateway's ledger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec

from clipia_proxy.emulator import Fault
from clipia_proxy.emulator.text import count_tokens
from tests.conftest import Stack, wait_settled

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    caps: {caps}
    budget: {budget}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""

LONG = 20_000
"""Tokens the emulated model would write for every answer (16 credits on gpt-5.5)."""

BODY: dict[str, Any] = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}


def teams(caps: str = "{}", budget: str = "{day: 10}") -> str:
    def escaped(text: str) -> str:  # the template goes through str.format
        return text.replace("{", "{{").replace("}", "}}")

    return TEAMS.replace("{caps}", escaped(caps)).replace("{budget}", escaped(budget))


async def post(
    stack: Stack, session: aiohttp.ClientSession, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(
        f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json=body
    ) as reply:
        return reply.status, await reply.read()


async def spent_today(stack: Stack, session: aiohttp.ClientSession) -> Decimal:
    await wait_settled(stack)
    async with session.get(f"{stack.base_url}/key", headers=stack.auth("search")) as reply:
        budgets = (await reply.json())["data"]["budgets"]
    (day,) = [b for b in budgets if b["period"] == "day"]
    return Decimal(str(day["spent"]))


def billed(stack: Stack) -> Decimal:
    return sum((bill.cost for bill in stack.emulator.bills.values()), Decimal(0))


async def test_the_team_cap_is_sent_as_max_tokens(stacks: Factory) -> None:
    stack = await stacks(teams=teams(caps="{max_tokens: 1000}"))
    stack.emulator.push_fault(Fault(completion_tokens=LONG))
    async with aiohttp.ClientSession() as session:
        status, raw = await post(stack, session, BODY)
        spent = await spent_today(stack, session)
    assert status == 200
    answer = msgspec.json.decode(raw)
    assert answer["usage"]["completion_tokens"] == 1000
    assert answer["choices"][0]["finish_reason"] == "length"
    (sent,) = stack.chat_requests()
    assert sent.json["max_tokens"] == 1000
    assert spent == billed(stack) < Decimal(1)


async def test_concurrent_requests_without_max_tokens_stay_within_the_budget(
    stacks: Factory,
) -> None:
    stack = await stacks(teams=teams())
    stack.emulator.push_fault(Fault(completion_tokens=LONG, times=200))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        replies = await asyncio.gather(
            *(post(stack, session, {**BODY, "stream": i % 2 == 0}) for i in range(200))
        )
        spent = await spent_today(stack, session)
    assert spent == billed(stack) <= Decimal(10)
    statuses = [status for status, _ in replies]
    assert set(statuses) == {200, 402}
    served = stack.chat_requests()
    assert len(served) == statuses.count(200)
    # The default reserve (4096 tokens) was sent with every request, and bounded its answer.
    assert {request.json["max_tokens"] for request in served} == {4096}
    assert all(bill.completion_tokens == 4096 for bill in stack.emulator.bills.values())


async def test_a_team_without_budget_or_cap_is_not_bounded(stacks: Factory) -> None:
    stack = await stacks(teams=teams(budget="{}"))
    async with aiohttp.ClientSession() as session:
        status, _ = await post(stack, session, BODY)
    assert status == 200
    (sent,) = stack.chat_requests()
    assert "max_tokens" not in sent.json


async def test_the_clients_own_max_tokens_is_kept(stacks: Factory) -> None:
    stack = await stacks(teams=teams(caps="{max_tokens: 1000}"))
    async with aiohttp.ClientSession() as session:
        status, _ = await post(stack, session, {**BODY, "max_completion_tokens": 7})
    assert status == 200
    (sent,) = stack.chat_requests()
    assert sent.json["max_completion_tokens"] == 7
    assert "max_tokens" not in sent.json


async def test_a_stream_past_its_bound_is_cut_with_an_error_event(stacks: Factory) -> None:
    stack = await stacks(teams=teams(caps="{max_tokens: 100}"))
    stack.emulator.push_fault(Fault(completion_tokens=LONG, ignore_max_tokens=True))
    async with aiohttp.ClientSession() as session:
        status, raw = await post(stack, session, {**BODY, "stream": True})
        await wait_settled(stack)
    assert status == 200
    assert b"data: [DONE]" not in raw
    events = [block for block in raw.split(b"\n\n") if block.strip()]
    error = msgspec.json.decode(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "output_limit_exceeded"
    text = ""
    for event in events[:-1]:
        chunk = msgspec.json.decode(event.removeprefix(b"data: "))
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
    # Cut after the read in which the count passed the 100 tokens reserved: what that read
    # held is relayed, the rest of the 20,000 never is.
    assert 100 < count_tokens(text) < LONG / 4
    (sent,) = stack.chat_requests()
    assert sent.json["max_tokens"] == 100


async def test_an_honest_long_stream_ends_normally(stacks: Factory) -> None:
    stack = await stacks(teams=teams(caps="{max_tokens: 300}"))
    stack.emulator.push_fault(Fault(completion_tokens=LONG))
    async with aiohttp.ClientSession() as session:
        status, raw = await post(stack, session, {**BODY, "stream": True})
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in raw

"""Quotas through HTTP: headers, 402/429 with Retry-After, shadow, /v1/key, store failures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from clipia_proxy.keys import QUOTAS
from tests.conftest import Stack, wait_settled

TEAM = """
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5", "claude-sonnet-4-6"]}}
    caps: {{max_tokens: 20}}
    budget: {budget}
    limits: {limits}
    shadow: {shadow}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""

BODY = {"model": "gpt-5.5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}

Factory = Callable[..., Awaitable[Stack]]


def team(budget: str = "{day: 10}", limits: str = "{rpm: 100}", shadow: str = "false") -> str:
    def escaped(text: str) -> str:  # the teams template goes through str.format
        return text.replace("{", "{{").replace("}", "}}")

    return (
        TEAM.replace("{budget}", escaped(budget))
        .replace("{limits}", escaped(limits))
        .replace("{shadow}", shadow)
    )


async def post(
    stack: Stack, session: aiohttp.ClientSession, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        f"{stack.base_url}/chat/completions", headers=stack.auth("search"), json=body or BODY
    ) as reply:
        return reply.status, dict(reply.headers), await reply.read()


async def test_admitted_responses_carry_rate_and_budget_headers(stacks: Factory) -> None:
    stack = await stacks(teams=team(limits="{rpm: 5, tpm: 100000}"))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(stack, session)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == "4"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 100000
        assert Decimal(headers["x-clipia-budget-remaining"]) < Decimal(10)
        assert headers["x-clipia-budget-reset"].endswith("Z")
        status, headers, body = await post(stack, session, {**BODY, "stream": True})
        assert status == 200
        assert headers["x-ratelimit-remaining-requests"] == "3"
        assert body.endswith(b"data: [DONE]\n\n")


async def test_over_budget_is_402_with_retry_after_and_nothing_sent(stacks: Factory) -> None:
    stack = await stacks(teams=team(budget="{day: 0.000001}"))
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(stack, session)
    assert status == 402
    error = msgspec.json.decode(body)["error"]
    assert error["code"] == "budget_exceeded"
    assert "credits per day" in error["message"]
    assert "resets in" in error["message"]
    assert 0 < int(headers["Retry-After"]) <= 86400 + 3600
    assert stack.chat_requests() == []


async def test_rpm_is_429_with_retry_after(stacks: Factory) -> None:
    stack = await stacks(teams=team(limits="{rpm: 2}"))
    async with aiohttp.ClientSession() as session:
        assert (await post(stack, session))[0] == 200
        assert (await post(stack, session))[0] == 200
        status, headers, body = await post(stack, session)
    assert status == 429
    assert b"rate_limit_exceeded" in body
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert len(stack.chat_requests()) == 2


async def test_shadow_team_is_served_and_counted(stacks: Factory) -> None:
    stack = await stacks(teams=team(budget="{day: 0.000001}", shadow="true"))
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(stack, session)
    assert status == 200
    assert stack.running.app[QUOTAS].would_reject["search", "budget"] == 1
    assert len(stack.chat_requests()) == 1


async def test_key_shows_budgets_that_match_the_ledger(stacks: Factory) -> None:
    stack = await stacks(teams=team(budget="{day: 10, month: 100}", limits="{rpm: 50}"))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await post(stack, session))[0] == 200
        await wait_settled(stack)
        async with session.get(f"{stack.base_url}/key", headers=stack.auth("search")) as reply:
            data = (await reply.json())["data"]
    billed = sum(bill.cost for bill in stack.emulator.bills.values())
    budgets = {b["period"]: b for b in data["budgets"]}
    assert set(budgets) == {"day", "month"}
    assert Decimal(str(budgets["day"]["spent"])) == billed
    assert Decimal(str(budgets["day"]["reserved"])) == 0
    assert Decimal(str(budgets["day"]["remaining"])) == Decimal(10) - billed
    assert Decimal(str(data["usage"])) == billed
    assert data["rate_limit"] == {"requests": 50, "tokens": None, "interval": "1m"}
    assert Decimal(str(data["limit"])) == Decimal(10)


async def test_store_down_fail_closed_is_503_and_not_ready(
    stacks: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPIA_TEST_DEAD_REDIS", "redis://127.0.0.1:1/0")
    stack = await stacks(
        teams=team(),
        store="{backend: redis, redis_url_env: CLIPIA_TEST_DEAD_REDIS, timeout_seconds: 0.5}"
        "\nledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_DEAD_DSN}",
    )
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(stack, session)
        async with session.get(f"{stack.admin_url}/readyz") as ready:
            problems = (await ready.json())["problems"]
            ready_status = ready.status
    assert status == 503
    assert b"quota_store_unavailable" in body
    assert headers["Retry-After"] == "1"
    assert stack.chat_requests() == []
    assert ready_status == 503
    assert "quota store unavailable" in problems


async def test_store_down_fail_open_serves(
    stacks: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLIPIA_TEST_DEAD_REDIS", "redis://127.0.0.1:1/0")
    stack = await stacks(
        teams=team(),
        store=(
            "{backend: redis, redis_url_env: CLIPIA_TEST_DEAD_REDIS, timeout_seconds: 0.5,"
            f" on_error: fail_open, journal_path: {tmp_path}/outage.jsonl}}"
            "\nledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_DEAD_DSN}"
        ),
    )
    async with aiohttp.ClientSession() as session:
        status, _, _ = await post(stack, session)
        async with session.get(f"{stack.admin_url}/readyz") as ready:
            ready_status = ready.status
    assert status == 200
    assert stack.running.app[QUOTAS].store_errors["fail_open"] == 1
    assert ready_status == 200

"""A team key's own RPM, TPM and concurrency (``teams[].keys[].limits``), through HTTP.

On memory, SQLite and Redis counters: a key over its own limit gets the team-level refusal
(429, the same codes, an honest ``Retry-After``, nothing sent upstream) while the team's other
keys keep working; the refused reservation takes no place in the team's minute; admitted
answers carry the tighter of the key's and the team's ``x-ratelimit-*``. ``check-config``
validates the section. (The store-contract suite covers every backend in both directions.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from clipia_proxy.config import ConfigError, parse_config
from clipia_proxy.tasks import TaskRegistry
from tests.conftest import Stack, wait_settled
from tests.e2e.test_mcp import session_for, structured

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys:
      - {{id: app-key, sha256: {search}}}
      - {{id: ci-key, sha256: {research}, limits: {key_limits}}}
    models: {{allow: ["*"]}}
    limits: {{rpm: 10, tpm: 100000}}
"""
BODY = {"model": "gpt-5.5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
APP, CI = "search", "research"  # the conftest's two generated keys: both in team "search"


def teams(key_limits: str) -> str:
    return TEAMS.replace("{key_limits}", key_limits.replace("{", "{{").replace("}", "}}"))


async def post(
    stack: Stack, http: aiohttp.ClientSession, key: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.post(
        f"{stack.base_url}/chat/completions", json=body or BODY, headers=stack.auth(key)
    ) as reply:
        return reply.status, dict(reply.headers), msgspec.json.decode(await reply.read())


async def test_a_key_over_its_rpm_is_refused_while_the_teams_other_key_works(
    stacks: Factory, counters: str | None
) -> None:
    stack = await stacks(teams=teams("{rpm: 2}"), store=counters)
    async with aiohttp.ClientSession() as http:
        for remaining in ("1", "0"):
            status, headers, _ = await post(stack, http, CI)
            assert status == 200
            # The key's own limit is the tighter: the headers are the key's.
            assert headers["x-ratelimit-limit-requests"] == "2"
            assert headers["x-ratelimit-remaining-requests"] == remaining
        status, headers, body = await post(stack, http, CI)
        assert status == 429
        error = body["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert error["message"].startswith(
            "Key 'ci-key' of team 'search' reached 2 requests per minute; retry in "
        )
        assert 1 <= int(headers["Retry-After"]) <= 60
        # OpenAI's headers on the refusal name the limit that refused it: the key's.
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # The team's other key: the team's headers, and the refused request took no place.
        status, headers, _ = await post(stack, http, APP)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "10"
        # 2 of ci-key, then this one: the key's refusals take no place in the team's minute.
        assert headers["x-ratelimit-remaining-requests"] == "7"
        for _ in range(3):  # a key hammering past its own limit
            assert (await post(stack, http, CI))[0] == 429
        status, headers, _ = await post(stack, http, APP)
        assert status == 200
        assert headers["x-ratelimit-remaining-requests"] == "6"
    assert len(stack.chat_requests()) == 4  # the refused requests never went upstream


async def test_the_mcp_chat_tool_keeps_a_keys_own_limit(stacks: Factory) -> None:
    """The official ``mcp`` client: the chat tool takes the same admission as the REST route."""
    stack = await stacks(teams=teams("{rpm: 1}"))
    async with session_for(stack, stack.auth(CI)) as session:
        await session.initialize()
        first = await session.call_tool("chat", {"model": "gpt-5.5", "prompt": "hi"})
        assert first.isError is False
        refused = await session.call_tool("chat", {"model": "gpt-5.5", "prompt": "hi"})
    assert refused.isError is True
    error = structured(refused)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith("Key 'ci-key' of team 'search' reached 1 requests per")
    assert 1 <= error["retry_after"] <= 60
    async with session_for(stack, stack.auth(APP)) as session:
        await session.initialize()
        served = await session.call_tool("chat", {"model": "gpt-5.5", "prompt": "hi"})
        assert served.isError is False
    assert len(stack.chat_requests()) == 2


async def test_a_key_over_its_tpm_is_refused_while_the_teams_other_key_works(
    stacks: Factory, counters: str | None
) -> None:
    stack = await stacks(teams=teams("{tpm: 500}"), store=counters)
    big = {**BODY, "max_tokens": 600}  # its estimate alone is over the key's 500
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.base_url}/key", headers=stack.auth(CI)) as reply:
            key = (await reply.json())["data"]["key"]
        assert key == {
            "budgets": [],
            "rate_limit": {"requests": None, "tokens": 500, "interval": "1m"},
            "concurrency": None,
        }
        status, headers, _ = await post(stack, http, CI)
        assert status == 200
        assert headers["x-ratelimit-limit-tokens"] == "500"
        assert int(headers["x-ratelimit-remaining-tokens"]) < 500
        assert headers["x-ratelimit-limit-requests"] == "10"  # no key RPM: the team's
        status, headers, body = await post(stack, http, CI, big)
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert body["error"]["message"].startswith(
            "Key 'ci-key' of team 'search' reached 500 tokens per minute (this request may use "
        )
        assert headers["Retry-After"] == "60"  # larger than the key's minute: a whole window
        assert headers["x-ratelimit-limit-tokens"] == "500"
        status, headers, _ = await post(stack, http, APP, big)
        assert status == 200
        assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert len(stack.chat_requests()) == 2


async def test_a_key_at_its_concurrency_is_refused_while_the_teams_other_key_works(
    stacks: Factory, counters: str | None
) -> None:
    stack = await stacks(teams=teams("{concurrency: 1}"), store=counters)
    stack.emulator.hold = asyncio.Event()  # billed requests wait upstream until it is set
    tasks = TaskRegistry()
    async with aiohttp.ClientSession() as http:
        held = tasks.spawn(post(stack, http, CI), name="held")
        while not stack.chat_requests():  # noqa: ASYNC110 - emulator state
            await asyncio.sleep(0.01)
        status, headers, body = await post(stack, http, CI)
        assert status == 429
        assert body["error"]["code"] == "concurrency_limit_exceeded"
        assert body["error"]["message"] == (
            "Key 'ci-key' of team 'search' already has 1 of 1 requests in flight; retry when "
            "one finishes."
        )
        assert int(headers["Retry-After"]) >= 1
        other = tasks.spawn(post(stack, http, APP), name="other")
        while len(stack.chat_requests()) < 2:  # noqa: ASYNC110 - the other key got through
            await asyncio.sleep(0.01)
        stack.emulator.hold.set()
        assert (await held)[0] == 200
        assert (await other)[0] == 200
        await wait_settled(stack)  # the slot is freed at settlement
        assert (await post(stack, http, CI))[0] == 200
    assert len(stack.chat_requests()) == 3


HASH = "ab" * 32
ENV = {"CLIPIA_API_KEY": "clipia_test_x"}


def key_config(limits: str, team_limits: str = "{}") -> str:
    return (
        "teams:\n  - id: a\n"
        f"    keys: [{{id: k1, sha256: {HASH}, limits: {limits}}}]\n"
        f"    models: {{allow: ['gpt-5.5']}}\n    limits: {team_limits}\n"
    )


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ("{rpm: 0}", "c.yaml: teams[0].keys[0].limits.rpm: must be a positive integer (got 0)"),
        ("{tpm: -5}", "c.yaml: teams[0].keys[0].limits.tpm: must be a positive integer (got -5)"),
        (
            "{concurrency: 0}",
            "c.yaml: teams[0].keys[0].limits.concurrency: must be a positive integer (got 0)",
        ),
        ("{rpm: lots}", "c.yaml: teams[0].keys[0].limits.rpm: expected int | null (got 'lots')"),
        ("{rph: 5}", "c.yaml: teams[0].keys[0].limits.rph: unknown key"),
    ],
)
def test_check_config_refuses_bad_key_limits(limits: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(key_config(limits), source="c.yaml", environ=ENV)
    assert expected in info.value.problems


def test_check_config_refuses_a_bad_key_budget() -> None:
    text = key_config("{rpm: 1}").replace("limits: {rpm: 1}", "budget: {day: -1}")
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml", environ=ENV)
    assert "c.yaml: teams[0].keys[0].budget.day: must be a positive number (got -1)" in (
        info.value.problems
    )


def test_check_config_warns_of_a_key_limit_above_its_teams() -> None:
    config = parse_config(
        key_config("{rpm: 50, tpm: 100, concurrency: 2}", "{rpm: 10, concurrency: 2}"),
        source="c.yaml",
        environ=ENV,
    )
    assert config.warnings == (
        "c.yaml: teams[0].keys[0].limits.rpm: key 'k1' allows 50 but its team 'a' only 10: "
        "the team's limit binds first",
    )
    assert config.teams[0].keys[0].limits is not None
    assert config.teams[0].keys[0].limits.tpm == 100

"""``/mcp`` with the official ``mcp`` Python client, and its JSON-RPC bad-input table by raw HTTP.

The client is the SDK's own Streamable HTTP transport (``streamable_http_client`` with an
``httpx.AsyncClient`` carrying the team key) and ``ClientSession``; the gateway talks to the
emulator. The chat tool must take the same path as ``/v1/chat/completions``: ledger record,
spend metric, ``/v1/key`` spend, refusals with the REST codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import httpx
import msgspec
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.model import RecordState
from tests.conftest import Stack, wait_settled
from tests.test_metrics import scrape

pytestmark = pytest.mark.e2e

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models:
      allow: ["gpt-5.5", "claude-sonnet-*"]
      deny: ["claude-sonnet-4-5"]
      aliases: {{fast: claude-sonnet-4-6}}
    caps: {{max_tokens: 50}}
    budget: {{day: 10}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 0.000001}}
"""


def mcp_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.running.port}/mcp"


@contextlib.asynccontextmanager
async def session_for(stack: Stack, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        httpx.AsyncClient(headers=headers, timeout=20) as http,
        streamable_http_client(mcp_url(stack), http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        yield session


def structured(result: CallToolResult) -> dict[str, Any]:
    assert result.structuredContent is not None
    return result.structuredContent


def text_of(result: CallToolResult) -> str:
    (content,) = result.content
    assert isinstance(content, TextContent)
    return content.text


@pytest.fixture
async def mcp_stack(stacks: Factory) -> Stack:
    return await stacks(teams=TEAMS)


async def test_initialize_and_tools_list(mcp_stack: Stack) -> None:
    async with session_for(mcp_stack, mcp_stack.auth("search")) as session:
        init = await session.initialize()
        assert init.serverInfo.name == "clipia-proxy"
        assert init.capabilities.tools is not None
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == {"chat", "list_models", "get_model", "get_balance"}
        assert tools["chat"].inputSchema["required"] == ["model"]
        assert await session.send_ping() is not None


async def test_chat_tool_is_billed_like_the_rest_route(mcp_stack: Stack) -> None:
    stack = mcp_stack
    async with session_for(stack, stack.auth("search")) as session:
        await session.initialize()
        result = await session.call_tool("chat", {"model": "fast", "prompt": "Hello there"})
        assert result.isError is False, result
        data = structured(result)
        assert data["reply"]
        assert text_of(result) == data["reply"]
        assert data["model"] == "claude-sonnet-4-6"  # the alias resolved, as on REST
        assert data["usage"]["completion_tokens"] > 0
        cost = Decimal(str(data["cost"]))
        assert cost > 0
        await wait_settled(stack)
        balance = structured(await session.call_tool("get_balance", {}))
    # The upstream saw one chat with the canonical model and the team's cap.
    (sent,) = stack.chat_requests()
    body = msgspec.json.decode(sent.body)
    assert body["model"] == "claude-sonnet-4-6"
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert "stream" not in body or body["stream"] is False
    # Ledger: one settled record for the team, charged what the tool reported.
    records = await stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf"))
    (record,) = records
    assert record.team == "search"
    assert record.key_id == "search-1"
    assert record.state == RecordState.SETTLED
    assert Decimal(record.cost) / 1_000_000 == cost
    # /v1/key (and get_balance, its MCP twin) show the spend.
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.base_url}/key", headers=stack.auth("search")) as reply,
    ):
        key = (await reply.json())["data"]
    assert Decimal(str(key["usage"])) == cost
    assert Decimal(str(balance["usage"])) == cost
    assert Decimal(str(balance["budgets"][0]["spent"])) == cost
    # Metrics: the spend, and the request on the /mcp route.
    got = await scrape(stack)
    assert got.value(
        "clipia_proxy_spend_credits_total",
        team="search",
        model="claude-sonnet-4-6",
        environment="live",
    ) == float(cost)
    requests = got.series("clipia_proxy_requests_total")
    mcp_chats = [
        value
        for labels, value in requests.items()
        if dict(labels)["route"] == "/mcp" and dict(labels)["model"] == "claude-sonnet-4-6"
    ]
    assert mcp_chats == [1.0]


async def test_denied_model_is_a_tool_error_with_the_rest_code(mcp_stack: Stack) -> None:
    stack = mcp_stack
    async with session_for(stack, stack.auth("search")) as session:
        await session.initialize()
        result = await session.call_tool("chat", {"model": "claude-sonnet-4-5", "prompt": "hi"})
        missing = await session.call_tool("get_model", {"model": "claude-opus-4-8"})
    assert result.isError is True
    error = structured(result)["error"]
    assert error["code"] == "model_not_allowed"
    assert error["type"] == "permission_error"
    assert "may not use model 'claude-sonnet-4-5'" in error["message"]
    assert text_of(result).startswith("model_not_allowed: ")
    assert "Traceback" not in text_of(result)
    assert missing.isError is True
    assert structured(missing)["error"]["code"] == "model_not_found"
    assert stack.chat_requests() == []  # nothing reached the upstream
    got = await scrape(stack)
    assert (
        got.value("clipia_proxy_rejections_total", team="search", reason="model_not_allowed") == 1.0
    )


async def test_team_over_budget_gets_budget_exceeded_and_its_reset(mcp_stack: Stack) -> None:
    stack = mcp_stack
    async with session_for(stack, stack.auth("research")) as session:
        await session.initialize()
        result = await session.call_tool("chat", {"model": "gpt-5.5", "prompt": "hi"})
    assert result.isError is True
    error = structured(result)["error"]
    assert error["code"] == "budget_exceeded"
    assert "resets in" in error["message"]
    assert error["retry_after"] > 0
    assert stack.chat_requests() == []
    assert await stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf")) == []


async def test_bad_key_is_refused_before_anything(mcp_stack: Stack) -> None:
    stack = mcp_stack
    bad = {"Authorization": "Bearer cpx_" + "A" * 43}
    with pytest.raises(BaseExceptionGroup) as caught:
        async with session_for(stack, bad) as session:
            await session.initialize()
    errors: list[BaseException] = [caught.value]
    statuses: list[int] = []
    while errors:
        error = errors.pop()
        if isinstance(error, BaseExceptionGroup):
            errors.extend(error.exceptions)
        elif isinstance(error, httpx.HTTPStatusError):
            statuses.append(error.response.status_code)
    assert statuses == [401]
    # The same key as a raw call: the REST envelope, invalid_api_key.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            mcp_url(stack),
            headers={**bad, "Accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        ) as reply,
    ):
        assert reply.status == 401
        assert (await reply.json())["error"]["code"] == "invalid_api_key"
    assert stack.chat_requests() == []


async def test_the_three_key_schemes_work(mcp_stack: Stack) -> None:
    key = mcp_stack.keys["search"]
    for headers in (
        {"Authorization": f"Bearer {key}"},
        {"Authorization": f"Key {key}"},
        {"X-Api-Key": key},
    ):
        async with session_for(mcp_stack, headers) as session:
            await session.initialize()
            listed = structured(await session.call_tool("list_models", {}))
        ids = {entry["id"] for entry in listed["data"]}
        assert "fast" in ids
        assert "gpt-5.5" in ids
        assert "claude-sonnet-4-5" not in ids
        assert "claude-opus-4-8" not in ids

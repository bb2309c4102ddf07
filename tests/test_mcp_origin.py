"""``/mcp`` validates ``Origin`` (DNS-rebinding protection), by raw HTTP.

A request whose ``Origin`` is not in ``mcp.allowed_origins`` gets 403 ``origin_not_allowed``
(the OpenAI envelope, before identity) and nothing goes upstream; a request without ``Origin``
(agents, SDKs) is served as before. Entries are exact origins or ``scheme://host:*``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
import pytest

from clipia_proxy.config import ConfigError, parse_config
from tests.conftest import Stack
from tests.http_client import Reply, assert_envelope, bearer, raw_http, raw_request

Factory = Callable[..., Awaitable[Stack]]

CHAT = msgspec.json.encode(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "chat", "arguments": {"model": "gpt-5.5", "prompt": "hi"}},
    }
)
ALLOWED = 'mcp: {allowed_origins: ["https://chat.example.com", "http://localhost:*"]}'


async def mcp(stack: Stack, origins: list[str], *, key: bool = True, method: str = "POST") -> Reply:
    headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        *(("Origin", origin) for origin in origins),
        *([bearer(stack)] if key else []),
    ]
    body = CHAT if method == "POST" else b""
    return await raw_http(stack, raw_request(method, "/mcp", headers, body))


async def assert_refused(stack: Stack, reply: Reply, before: int) -> None:
    error = assert_envelope(reply, 403, "origin_not_allowed")
    assert error["type"] == "permission_error"
    assert "mcp.allowed_origins" in error["message"]
    assert len(stack.chat_requests()) == before  # nothing went upstream


def assert_chat_served(reply: Reply) -> None:
    assert reply.status == 200, reply.body[:300]
    result = reply.json()["result"]
    assert result["isError"] is False, result


@pytest.mark.parametrize(
    "origins",
    [
        ["https://evil.example"],
        ["http://localhost"],  # no port: ':*' stands for a port
        ["http://localhost:3000.evil.example"],
        ["https://chat.example.com.evil.example"],
        ["null"],  # a sandboxed frame or a file:// page
        ["https://chat.example.com", "https://evil.example"],  # several: ambiguous
    ],
)
async def test_an_origin_not_allowed_is_403_before_anything(
    stacks: Factory, origins: list[str]
) -> None:
    stack = await stacks(extra=ALLOWED)
    await assert_refused(stack, await mcp(stack, origins), 0)
    await assert_refused(stack, await mcp(stack, origins, key=False), 0)  # before identity
    await assert_refused(stack, await mcp(stack, origins, method="GET"), 0)  # every method


@pytest.mark.parametrize(
    "origins",
    [
        [],  # agents and SDKs send none
        ["https://chat.example.com"],
        ["HTTPS://Chat.Example.COM"],  # case-insensitive
        ["http://localhost:3000"],
        ["http://localhost:8080"],
    ],
)
async def test_no_origin_or_an_allowed_one_is_served(stacks: Factory, origins: list[str]) -> None:
    stack = await stacks(extra=ALLOWED)
    assert_chat_served(await mcp(stack, origins))
    assert len(stack.chat_requests()) == 1


async def test_by_default_no_browser_origin_may_call(stacks: Factory) -> None:
    stack = await stacks()
    await assert_refused(stack, await mcp(stack, ["http://localhost:3000"]), 0)
    assert_chat_served(await mcp(stack, []))
    # Only /mcp checks it: the REST API is for programs, which authenticate with a key.
    chat = msgspec.json.encode({"model": "gpt-5.5", "messages": [{"role": "user", "content": "x"}]})
    headers = [("Content-Type", "application/json"), ("Origin", "https://x.example"), bearer(stack)]
    reply = await raw_http(stack, raw_request("POST", "/v1/chat/completions", headers, chat))
    assert reply.status == 200


async def test_a_keyless_sidecar_is_not_reachable_from_a_rebinding_page(stacks: Factory) -> None:
    # auth.mode fixed serves whoever connects: the one case where a page needs no key.
    stack = await stacks(extra="auth: {mode: fixed, team: search}")
    await assert_refused(stack, await mcp(stack, ["http://attacker.example:8080"], key=False), 0)
    assert_chat_served(await mcp(stack, [], key=False))


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://chat.example.com", True),
        ("http://localhost:*", True),
        ("http://[::1]:8080", True),
        ("vscode-webview://abc", True),
        ("https://chat.example.com/", False),
        ("https://chat.example.com/path", False),
        ("HTTPS://chat.example.com", False),
        ("chat.example.com", False),
        ("*", False),
        ("null", False),
    ],
)
def test_check_config_validates_allowed_origins(origin: str, ok: bool) -> None:
    text = f"mcp: {{allowed_origins: [{msgspec.json.encode(origin).decode()}]}}\n"
    environ = {"CLIPIA_API_KEY": "clipia_test_x"}
    if ok:
        assert parse_config(text, source="c.yaml", environ=environ).mcp.allowed_origins == (origin,)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml", environ=environ)
    assert info.value.problems[0].startswith("c.yaml: mcp.allowed_origins[0]: ")
    assert "an origin is scheme://host" in info.value.problems[0]

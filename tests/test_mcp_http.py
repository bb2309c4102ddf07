"""``/mcp`` bad input, by raw HTTP: every refusal is a clean JSON-RPC answer and nothing goes upstream."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest

from clipia_proxy.mcp_http import PROTOCOL_VERSIONS
from tests.conftest import Stack

BOTH = "application/json, text/event-stream"
LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def call(name: str, arguments: Any, request_id: int = 7) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


async def post(
    stack: Stack,
    body: bytes | dict[str, Any] | list[Any],
    *,
    accept: str | None = BOTH,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    sent = {**stack.auth("search"), "Content-Type": "application/json", **(headers or {})}
    if accept is not None:
        sent["Accept"] = accept
    data = body if isinstance(body, bytes) else msgspec.json.encode(body)
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Accept"]) as http,
        http.post(f"http://127.0.0.1:{stack.running.port}/mcp", data=data, headers=sent) as reply,
    ):
        return reply.status, dict(reply.headers), await reply.read()


# (case, body, Accept, extra headers, HTTP status, JSON-RPC error code or None for 202)
BAD_INPUT: list[tuple[str, bytes | dict[str, Any] | list[Any], str | None, dict[str, str], int, int | None]] = [
    ("no Accept", LIST, None, {}, 406, -32000),
    ("Accept html only", LIST, "text/html", {}, 406, -32000),
    ("Accept json with q=0", LIST, "application/json;q=0", {}, 406, -32000),
    ("unknown protocol version", LIST, BOTH, {"MCP-Protocol-Version": "1999-01-01"}, 400, -32000),
    ("not JSON media type", LIST, BOTH, {"Content-Type": "text/plain"}, 415, -32000),
    ("compressed body", LIST, BOTH, {"Content-Encoding": "gzip"}, 415, -32000),
    ("truncated JSON", b'{"jsonrpc": "2.0", "id": 1,', BOTH, {}, 400, -32700),
    ("NaN", b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}', BOTH, {}, 400, -32700),
    ("nested too deep", b"[" * 100_000 + b"]" * 100_000, BOTH, {}, 400, -32700),
    ("trailing data", b'{"jsonrpc": "2.0", "id": 1, "method": "ping"} {}', BOTH, {}, 400, -32700),
    ("batch", [LIST, {**LIST, "id": 2}], BOTH, {}, 400, -32600),
    ("empty batch", [], BOTH, {}, 400, -32600),
    ("a string", b'"tools/list"', BOTH, {}, 400, -32600),
    ("no jsonrpc member", {"id": 1, "method": "ping"}, BOTH, {}, 400, -32600),
    ("jsonrpc 1.0", {"jsonrpc": "1.0", "id": 1, "method": "ping"}, BOTH, {}, 400, -32600),
    ("null id", {"jsonrpc": "2.0", "id": None, "method": "ping"}, BOTH, {}, 400, -32600),
    ("fractional id", b'{"jsonrpc": "2.0", "id": 1.5, "method": "ping"}', BOTH, {}, 400, -32600),
    ("boolean id", {"jsonrpc": "2.0", "id": True, "method": "ping"}, BOTH, {}, 400, -32600),
    ("object id", {"jsonrpc": "2.0", "id": {}, "method": "ping"}, BOTH, {}, 400, -32600),
    ("numeric method", {"jsonrpc": "2.0", "id": 1, "method": 5}, BOTH, {}, 400, -32600),
    ("no method", {"jsonrpc": "2.0", "id": 1}, BOTH, {}, 400, -32600),
    ("unknown method", {"jsonrpc": "2.0", "id": 1, "method": "resources/list"}, BOTH, {}, 200, -32601),
    ("params array", {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": []}, BOTH, {}, 200, -32602),
    ("unknown tool", call("delete_everything", {}), BOTH, {}, 200, -32602),
    ("tool name missing", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}, BOTH, {}, 200, -32602),
    ("arguments not an object", call("chat", ["gpt-5.5"]), BOTH, {}, 200, -32602),
    ("initialize without a version", {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, BOTH, {}, 200, -32602),
    ("notification", {"jsonrpc": "2.0", "method": "notifications/initialized"}, BOTH, {}, 202, None),
    ("unknown notification", {"jsonrpc": "2.0", "method": "chat"}, BOTH, {}, 202, None),
    ("a response", {"jsonrpc": "2.0", "id": 3, "result": {}}, BOTH, {}, 202, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "accept", "headers", "status", "code"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
async def test_bad_input_is_refused_cleanly(
    stack: Stack,
    body: bytes | dict[str, Any] | list[Any],
    accept: str | None,
    headers: dict[str, str],
    status: int,
    code: int | None,
) -> None:
    got, reply_headers, data = await post(stack, body, accept=accept, headers=headers)
    assert got == status, data
    if code is None:
        assert data == b""
    else:
        assert reply_headers["Content-Type"].startswith("application/json")
        answer = msgspec.json.decode(data)
        assert answer["jsonrpc"] == "2.0"
        assert answer["error"]["code"] == code
        assert "Traceback" not in answer["error"]["message"]
        assert "result" not in answer
    assert stack.chat_requests() == []


BAD_CHAT_ARGUMENTS: list[tuple[str, Any, str]] = [
    ("no model", {"prompt": "hi"}, "model"),
    ("empty model", {"model": "", "prompt": "hi"}, "model"),
    ("neither prompt nor messages", {"model": "gpt-5.5"}, "prompt"),
    ("both prompt and messages", {"model": "gpt-5.5", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("empty messages", {"model": "gpt-5.5", "messages": []}, "messages"),
    ("messages not objects", {"model": "gpt-5.5", "messages": ["hi"]}, "messages"),
    ("unknown argument", {"model": "gpt-5.5", "prompt": "hi", "api_base": "http://evil"}, "api_base"),
    ("stream asked", {"model": "gpt-5.5", "prompt": "hi", "stream": True}, "stream"),
    ("max_tokens zero", {"model": "gpt-5.5", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("system without prompt", {"model": "gpt-5.5", "system": "x", "messages": [{"role": "user", "content": "b"}]}, "system"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("arguments", "param"),
    [case[1:] for case in BAD_CHAT_ARGUMENTS],
    ids=[case[0] for case in BAD_CHAT_ARGUMENTS],
)
async def test_bad_chat_arguments_are_invalid_request_tool_errors(
    stack: Stack, arguments: Any, param: str
) -> None:
    status, _, data = await post(stack, call("chat", arguments))
    assert status == 200
    result = msgspec.json.decode(data)["result"]
    assert result["isError"] is True
    error = result["structuredContent"]["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == param
    assert stack.chat_requests() == []


async def test_get_and_delete_are_405_without_a_stream(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.running.port}/mcp"
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "DELETE"):
            headers = {**stack.auth("search"), "Accept": "text/event-stream"}
            async with http.request(method, url, headers=headers) as reply:
                assert reply.status == 405
                assert reply.headers["Allow"] == "POST"
                assert (await reply.json())["error"]["code"] == -32000


async def test_oversized_body_is_413_before_it_is_read(stack: Stack) -> None:
    """A declared length over ``server.max_body_bytes``: refused from the headers (raw socket)."""
    limit = stack.config.server.max_body_bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.running.port)
    try:
        writer.write(
            (
                "POST /mcp HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {stack.keys['search']}\r\n"
                f"Accept: {BOTH}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {limit + 1}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = msgspec.json.decode(await reader.readexactly(length))
        assert answer["error"]["code"] == -32000
        assert str(limit) in answer["error"]["message"]
    finally:
        writer.close()
    assert stack.chat_requests() == []


async def test_json_or_sse_per_accept_and_version_negotiation(stack: Stack) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": "a",
        "method": "initialize",
        "params": {"protocolVersion": "2031-01-01", "capabilities": {}, "clientInfo": {}},
    }
    status, headers, data = await post(stack, init, accept="application/json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert "Mcp-Session-Id" not in headers  # stateless: no session
    answer = msgspec.json.decode(data)
    assert answer["id"] == "a"
    assert answer["result"]["protocolVersion"] == PROTOCOL_VERSIONS[0]
    # A client that takes only SSE gets the one answer as one event.
    status, headers, data = await post(
        stack, LIST, accept="text/event-stream", headers={"MCP-Protocol-Version": "2025-06-18"}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert data.startswith(b"event: message\ndata: ")
    assert data.endswith(b"\n\n")
    listed = msgspec.json.decode(data.split(b"data: ", 1)[1])
    assert {tool["name"] for tool in listed["result"]["tools"]} >= {"chat", "get_balance"}

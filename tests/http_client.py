"""One way to talk HTTP to a gateway in tests: raw sockets, aiohttp, and the refusal checks.

Raw sockets (:func:`raw_http`, :func:`raw_request`, :func:`connection`, :func:`read_reply`)
send bytes exactly as written, for the HTTP layer; :func:`http` and :func:`post_chat` use
aiohttp without normalising the path. :func:`assert_refused` is the full refusal contract
every bad-input test checks: status, the OpenAI error envelope with its code, one
``X-Request-Id``, no new request at the emulator, and a valid request served afterwards on a
new connection. Every wait is bounded by :data:`WAIT`, so a regression fails rather than hangs;
the bound is never a speed requirement.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import msgspec
from multidict import CIMultiDict
from yarl import URL

from tests.harness import Stack

WAIT: Final = 10.0
"""Upper bound on any single wait: a regression fails here instead of hanging the suite."""

HELLO: list[dict[str, object]] = [{"role": "user", "content": "hi"}]
VALID: dict[str, object] = {"model": "gpt-5.5", "messages": HELLO}
ENVELOPE_FIELDS: Final = frozenset({"message", "type", "param", "code"})
REQUEST_ID_RE: Final = re.compile(r"[0-9a-f]{32}")


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A fresh TCP connection to 127.0.0.1:``port``, closed (quietly) at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def read_reply(reader: asyncio.StreamReader, *, head: bool = False) -> Reply:
    """Read one HTTP/1.1 answer (status line, headers, ``Content-Length`` body).

    ``head``: the answer to a HEAD request (no body, whatever ``Content-Length`` says).
    """
    block = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = block.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    length = 0 if head else int(headers.get("Content-Length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), WAIT)
    return Reply(status, headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF or reset) within :data:`WAIT`."""
    try:
        rest = await asyncio.wait_for(reader.read(), WAIT)
    except (ConnectionError, OSError):
        return True
    return rest == b""


@dataclass
class Reply:
    """One HTTP answer, as the client saw it."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


def root(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.running.port}"


def encode(obj: object) -> bytes:
    return msgspec.json.encode(obj)


def chat(model: object = "gpt-5.5", **fields: object) -> bytes:
    return encode({"model": model, "messages": HELLO, **fields})


async def http(
    stack: Stack,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: bytes | None = None,
    content_type: str | None = "application/json",
    admin: bool = False,
) -> Reply:
    """Send one request on a fresh connection; ``path`` is sent as written (no normalising)."""
    base = stack.admin_url if admin else root(stack)
    sent: CIMultiDict[str] = CIMultiDict(headers or {})
    if body is not None and content_type is not None and "Content-Type" not in sent:
        sent["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, URL(base + path, encoded=True), headers=sent, data=body
        ) as response,
    ):
        payload = await response.read()
        return Reply(response.status, CIMultiDict(response.headers), payload)


async def post_chat(
    stack: Stack, body: bytes, *, team: str = "search", headers: Mapping[str, str] | None = None
) -> Reply:
    merged = {**stack.auth(team), **(headers or {})}
    return await http(stack, "POST", "/v1/chat/completions", headers=merged, body=body)


async def raw_http(
    stack: Stack, data: bytes | list[bytes], *, admin: bool = False, head: bool = False
) -> Reply:
    """Write raw HTTP/1.1 bytes on a new connection and parse the one answer.

    A list of parts is written part by part, 50 ms apart (a body that arrives late).
    """
    port = stack.running.admin_port if admin else stack.running.port
    async with connection(port) as (reader, writer):
        for index, part in enumerate([data] if isinstance(data, bytes) else data):
            if index:
                await asyncio.sleep(0.05)
            writer.write(part)
            await writer.drain()
        return await read_reply(reader, head=head)


def raw_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """Build raw request bytes; header names and values are written exactly as given."""
    out = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    for name, value in headers:
        n = name if isinstance(name, bytes) else name.encode("latin-1")
        v = value if isinstance(value, bytes) else value.encode("latin-1")
        out += n + b": " + v + b"\r\n"
    if content_length:
        out += f"Content-Length: {len(body)}\r\n".encode()
    return out + b"\r\n" + body


def bearer(stack: Stack, team: str = "search") -> tuple[str, str]:
    return ("Authorization", f"Bearer {stack.keys[team]}")


def assert_envelope(reply: Reply, status: int | set[int], codes: str | set[str]) -> dict[str, Any]:
    statuses = {status} if isinstance(status, int) else status
    allowed = {codes} if isinstance(codes, str) else codes
    assert reply.status in statuses, (reply.status, reply.body[:300])
    assert reply.status != 500
    document = reply.json()
    assert set(document) == {"error"}, document
    error = document["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] in allowed, error
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    request_ids = reply.headers.getall("X-Request-Id", [])
    assert len(request_ids) == 1
    assert REQUEST_ID_RE.fullmatch(request_ids[0]), request_ids
    return dict(error)


async def assert_served(stack: Stack, team: str = "search", model: str = "gpt-5.5") -> Reply:
    """A valid request on a new connection is served and reaches the emulator once."""
    before = len(stack.chat_requests())
    reply = await post_chat(stack, chat(model), team=team)
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["object"] == "chat.completion"
    assert len(stack.chat_requests()) == before + 1
    return reply


async def assert_refused(
    stack: Stack,
    before: int,
    reply: Reply,
    status: int | set[int],
    codes: str | set[str],
    *,
    serve_team: str = "search",
) -> dict[str, Any]:
    """The full refusal contract: envelope, request id, ∅, and the gateway still serves."""
    error = assert_envelope(reply, status, codes)
    assert len(stack.emulator.requests) == before, [
        (r.method, r.path) for r in stack.emulator.requests[before:]
    ]
    await assert_served(stack, team=serve_team)
    return error


async def assert_refused_or_parser_400(stack: Stack, before: int, reply: Reply) -> None:
    """A 400 from the app or from aiohttp's HTTP parser: the same envelope either way."""
    await assert_refused(stack, before, reply, 400, "invalid_request")

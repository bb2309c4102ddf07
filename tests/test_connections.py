"""The connection layer of both ports, over raw sockets (docs/hardening.md, "Connections").

Header and keep-alive deadlines, the request head's total size cap, the connection cap with
the admin port still answering, aiohttp's parser errors in the OpenAI envelope (never echoing
the request's bytes), ``100 Continue`` only after authentication, quiet logs for malformed
requests. Every wait is bounded (``asyncio.wait_for``), so a regression fails rather than hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.harness import Stack, open_connections, start_stack, stop_stack, wait_until
from tests.http_client import (
    WAIT,
    Reply,
    assert_envelope,
    assert_served,
    bearer,
    chat,
    closed_by_server,
    connection,
    raw_http,
    raw_request,
    read_reply,
)


@pytest.fixture
async def tight() -> AsyncIterator[Stack]:
    """Short deadlines and small caps, so each is reached quickly."""
    made = await start_stack(
        server={
            "header_timeout_seconds": 0.5,
            "keepalive_timeout_seconds": 0.5,
            "body_timeout_seconds": 0.5,
            "max_connections": 4,
        }
    )
    try:
        yield made
    finally:
        await stop_stack(made)


# --------------------------------------------------------------------------- H1: parser errors

OBS_FOLD = "obs_fold_authorization"


def _malformed(stack: Stack) -> dict[str, bytes]:
    key = stack.keys["search"].encode()
    good = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = chat()
    length = b"Content-Length: %d\r\n" % len(body)
    return {
        # The key folded onto a continuation line: aiohttp used to echo the line back.
        OBS_FOLD: good + b"Authorization: Bearer\r\n " + key + b"\r\n" + length + b"\r\n" + body,
        "nul_in_header": good + b"X-Junk: a\x00b\r\nAuthorization: Bearer " + key + b"\r\n\r\n",
        "bare_cr": good + b"X-Junk: a\rb\r\nAuthorization: Bearer " + key + b"\r\n\r\n",
        "cl_and_te": good
        + b"Authorization: Bearer "
        + key
        + b"\r\nTransfer-Encoding: chunked\r\n"
        + length
        + b"\r\n0\r\n\r\n",
        "te_chunked123": good + b"Transfer-Encoding: chunked123\r\n\r\n",
        "bad_version": b"GET /v1/models HTTP/1.\xc3\xb6\r\nHost: x\r\n\r\n",
        "space_before_colon": good + b"Authorization : Bearer " + key + b"\r\n\r\n",
        "bad_chunk_size": good + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    }


@pytest.mark.parametrize(
    "case",
    [
        OBS_FOLD,
        "nul_in_header",
        "bare_cr",
        "cl_and_te",
        "te_chunked123",
        "bad_version",
        "space_before_colon",
        "bad_chunk_size",
    ],
)
async def test_parser_errors_answer_the_envelope_without_echoing_bytes(
    stack: Stack, case: str, log_capture: list[str]
) -> None:
    """Errors of aiohttp's own parser: 400 envelope + X-Request-Id, no header bytes, no traceback."""
    before = len(stack.emulator.requests)
    reply = await raw_http(stack, _malformed(stack)[case])
    assert_envelope(reply, 400, "invalid_request")
    key = stack.keys["search"]
    raw = reply.body + str(reply.headers).encode()
    for start in range(len(key) - 8):
        assert key[start : start + 8].encode() not in raw
    for echoed in (b"X-Junk", b"Transfer-Encoding", b"chunked", b"Authorization", b"\xc3"):
        assert echoed not in reply.body
    assert len(stack.emulator.requests) == before
    await assert_served(stack)
    assert not any("Traceback" in line or "ModuleNotFoundError" in line for line in log_capture)


async def test_malformed_requests_log_one_line_per_interval(
    stack: Stack, log_capture: list[str]
) -> None:
    """A burst of malformed requests: one quiet warning line, no traceback (D3)."""
    for _ in range(30):
        reply = await raw_http(stack, _malformed(stack)["nul_in_header"])
        assert reply.status == 400
    malformed = [line for line in log_capture if "malformed request" in line]
    assert len(malformed) == 1, malformed
    assert not any('"exc"' in line for line in log_capture)


# --------------------------------------------------------------------------- 100-continue


async def _expect_continue(
    stack: Stack, headers: list[tuple[str, str]], path: str = "/v1/chat/completions"
) -> tuple[bytes, Reply]:
    """Send a head with ``Expect: 100-continue`` and wait for the first answer before the body."""
    body = chat()
    head = raw_request(
        "POST",
        path,
        [("Content-Type", "application/json"), ("Expect", "100-continue"), *headers],
        b"",
        content_length=False,
    )
    head = head[:-2] + b"Content-Length: %d\r\n\r\n" % len(body)
    async with connection(stack.running.port) as (reader, writer):
        writer.write(head)
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(body)
            await writer.drain()
            return first, await read_reply(reader)
        # Not continued: the first block is the final answer's head.
        lines = first.decode("latin-1").split("\r\n")
        from multidict import CIMultiDict

        parsed: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                parsed.add(name.strip(), value.strip())
        length = int(parsed.get("Content-Length", "0"))
        payload = await asyncio.wait_for(reader.readexactly(length), WAIT)
        return b"", Reply(int(lines[0].split(" ", 2)[1]), parsed, payload)


async def test_100_continue_only_after_authentication(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    continued, reply = await _expect_continue(stack, [])
    assert continued == b""  # no 100 Continue for a request without a key
    assert_envelope(reply, 401, "invalid_api_key")
    continued, reply = await _expect_continue(stack, [("Authorization", "Bearer cpx_wrong")])
    assert continued == b""
    assert_envelope(reply, 401, "invalid_api_key")
    assert len(stack.emulator.requests) == before
    continued, reply = await _expect_continue(stack, [bearer(stack)])
    assert continued.startswith(b"HTTP/1.1 100 Continue")
    assert reply.status == 200, reply.body[:200]
    assert len(stack.emulator.requests) == before + 1


@pytest.mark.parametrize("path", ["/mcp", "/v1/no-such-route"])
async def test_100_continue_only_after_authentication_on_every_route(
    stack: Stack, path: str
) -> None:
    continued, reply = await _expect_continue(stack, [], path)
    assert continued == b""
    assert reply.status == 401


async def test_unknown_expectation_is_417_envelope(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Expect", "teapot")],
            chat(),
        ),
    )
    assert_envelope(reply, 417, "expectation_failed")
    assert len(stack.emulator.requests) == before


# --------------------------------------------------------------------------- D1: head size


async def test_huge_unfinished_head_is_cut_at_the_cap(stack: Stack) -> None:
    """~1 MB of headers that never end (D1): 431 envelope once past ``max_header_bytes``."""
    cap = stack.config.server.max_header_bytes
    async with connection(stack.running.port) as (reader, writer):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            for index in range(120):
                writer.write(b"X-Fill-%d: %s\r\n" % (index, b"a" * 8000))
                await writer.drain()
                sent += 8000
        reply = await read_reply(reader)
        assert_envelope(reply, 431, "request_header_fields_too_large")
        assert await closed_by_server(reader)
    assert sent > cap
    await assert_served(stack)


async def test_head_just_under_the_cap_is_served(stack: Stack) -> None:
    """Many headers that fit the total cap (each under aiohttp's line limit) are served."""
    fill = [(f"X-Fill-{index}", "a" * 4000) for index in range(12)]  # ~48 KiB < 64 KiB
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), *fill],
            chat(),
        ),
    )
    assert reply.status == 200, reply.body[:200]


# --------------------------------------------------------------------------- D2: deadlines


async def test_idle_connection_is_closed_at_the_header_deadline(tight: Stack) -> None:
    async with connection(tight.running.port) as (reader, _writer):
        assert await closed_by_server(reader)


async def test_slowloris_head_is_closed_at_the_header_deadline(tight: Stack) -> None:
    """A byte at a time never resets the deadline: the head must be whole within it."""
    async with connection(tight.running.port) as (reader, writer):
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        closed = False
        for byte in head:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except (ConnectionError, OSError):
                closed = True
                break
            await asyncio.sleep(0.05)
            if reader.at_eof():
                closed = True
                break
        assert closed or await closed_by_server(reader)


async def test_kept_alive_connection_is_closed_when_idle(tight: Stack) -> None:
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % (
        tight.keys["search"].encode()
    )
    async with connection(tight.running.port) as (reader, writer):
        writer.write(request)
        await writer.drain()
        first = await read_reply(reader)
        assert first.status == 200
        writer.write(request)  # kept alive: a second request on the same connection
        await writer.drain()
        second = await read_reply(reader)
        assert second.status == 200
        assert await closed_by_server(reader)


async def test_late_body_is_408_at_the_body_deadline(tight: Stack) -> None:
    before = len(tight.emulator.requests)
    body = chat()
    async with connection(tight.running.port) as (reader, writer):
        writer.write(
            raw_request(
                "POST",
                "/v1/chat/completions",
                [bearer(tight), ("Content-Type", "application/json")],
                b"",
                content_length=False,
            )[:-2]
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body[:10]
        )
        await writer.drain()
        reply = await read_reply(reader)
    assert_envelope(reply, 408, "request_timeout")
    assert len(tight.emulator.requests) == before
    await assert_served(tight)


# --------------------------------------------------------------------------- D2: connection cap


async def test_connection_cap_answers_503_and_admin_probes_still_answer(tight: Stack) -> None:
    cap = 4
    async with contextlib.AsyncExitStack() as held:
        for _ in range(cap):
            await held.enter_async_context(connection(tight.running.port))
        await wait_until(  # the server has accepted them all
            lambda: open_connections(tight.running) == cap, what=f"{cap} accepted connections"
        )
        async with connection(tight.running.port) as (reader, writer):
            # The request is read out (not left unread, which would reset the connection).
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            reply = await read_reply(reader)
            assert await closed_by_server(reader)
        assert_envelope(reply, 503, "overloaded")
        assert reply.headers["Retry-After"] == "1"
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with session.get(tight.admin_url + path) as response:
                    assert response.status == 200, path
    # The idle ones are gone: the data port serves again.
    await assert_served(tight)


async def test_the_admin_port_has_its_own_cap() -> None:
    made = await start_stack(server={"admin_max_connections": 2, "header_timeout_seconds": 5})
    try:
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):
                await held.enter_async_context(connection(made.running.admin_port))
            await wait_until(
                lambda: open_connections(made.running, admin=True) == 2, what="2 admin connections"
            )
            async with connection(made.running.admin_port) as (reader, _writer):
                reply = await read_reply(reader)
            assert_envelope(reply, 503, "overloaded")
            await assert_served(made)  # the data port is unaffected
    finally:
        await stop_stack(made)


async def test_a_refusal_with_its_body_unread_closes_theconnection(stack: Stack) -> None:
    """401 before the body is read: the answer says Connection: close, and the server closes."""
    async with connection(stack.running.port) as (reader, writer):
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000
        )
        await writer.drain()
        reply = await read_reply(reader)
        assert_envelope(reply, 401, "invalid_api_key")
        assert reply.headers.get("Connection", "").lower() == "close"
        assert await closed_by_server(reader)

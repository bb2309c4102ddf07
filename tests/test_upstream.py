"""Upstream faults through the real HTTP entry point, plus the pure seams.

Every test talks to the gateway with ``aiohttp.ClientSession`` at ``stack.base_url`` and checks
what the emulator received. Tests that need small timeouts or a dead upstream use conftest's
``stacks(upstream={...}, base_url=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from clipia_proxy.config import Secret, UpstreamConfig
from clipia_proxy.emulator import Fault
from clipia_proxy.errors import UpstreamTimeout, UpstreamUnavailable
from clipia_proxy.upstream import UpstreamBusy, UpstreamClient, parse_retry_after, read_body
from tests.harness import BOUND, Stack
from tests.transports import pytest_generate_tests, transport_kind

__all__ = ["pytest_generate_tests", "transport_kind"]  # one run per transport

Json = Any
"""Decoded JSON from the wire: the assertions check its shape, not the type checker."""

HELLO: dict[str, object] = {
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "Hello there"}],
}
ENVELOPE_FIELDS = {"message", "type", "param", "code"}
DEAD_UPSTREAM = "http://127.0.0.1:1/v1"
HOUR_TIMEOUTS: dict[str, object] = {"connect_timeout_seconds": 3600}
"""A connect timeout no test outlives: an answer that waited for it hits the test's bound."""
"""Port 1 on loopback: nothing listens there, so every connect is refused at once."""


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test (bounded: no request may hang the suite)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


async def chat(
    session: aiohttp.ClientSession,
    stack: Stack,
    body: Mapping[str, object] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Json, CIMultiDict[str]]:
    """POST a chat completion; return status, decoded body and headers."""
    async with session.post(
        f"{stack.base_url}/chat/completions",
        json=dict(body or HELLO),
        headers={**stack.auth(), **(headers or {})},
    ) as response:
        raw = await response.read()
        return response.status, msgspec.json.decode(raw), CIMultiDict(response.headers)


def attempts(stack: Stack, request_id: str) -> list[Any]:
    """Return the emulator's records of chat requests carrying ``request_id``."""
    return [r for r in stack.chat_requests() if r.request_id == request_id]


def assert_envelope(body: Json, *, code: str | None = None) -> None:
    """Check the OpenAI error envelope: exactly ``message``, ``type``, ``param``, ``code``."""
    assert set(body) == {"error"}
    assert set(body["error"]) == ENVELOPE_FIELDS
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


# --------------------------------------------------------------------------------------------
# parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("30", 30.0),
        (" 5 ", 5.0),
        ("120", 120.0),
        ("abc", None),
        ("-1", None),
        ("1.5", None),
        ("²", None),
        ("٣", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", 1445412480.0),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=0.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    future = email.utils.format_datetime(now + dt.timedelta(seconds=42), usegmt=True)
    past = email.utils.format_datetime(now - dt.timedelta(hours=1), usegmt=True)
    assert parse_retry_after(future, now=now.timestamp()) == pytest.approx(42.0)
    assert parse_retry_after(past, now=now.timestamp()) == 0.0


@given(st.text(max_size=64))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=0.0)
    assert result is None or result >= 0.0


# --------------------------------------------------------------------------------------------
# Upstream down


async def test_connect_failures_retried_within_retries() -> None:
    """A refused connect is retried ``retries`` times with back-off, then 502."""
    for retries in (0, 1, 2):
        sleeps: list[float] = []

        async def sleep(seconds: float, sleeps: list[float] = sleeps) -> None:
            sleeps.append(seconds)

        config = UpstreamConfig(base_url=DEAD_UPSTREAM, api_key_env=None, retries=retries)
        client = UpstreamClient(config, Secret("clipia_live_x"), sleep=sleep)
        await client.start()
        try:
            with pytest.raises(UpstreamUnavailable):
                await client.send("GET", "/models", request_id="r1")
        finally:
            await client.close()
        assert len(sleeps) == retries  # 1 + retries attempts, a wait between each
        assert sleeps == sorted(sleeps)


async def test_upstream_down_without_catalog(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    """Clipia unreachable from the start: 502 upstream_unavailable without a timeout, /readyz 503.

    The connect timeout is an hour long, so an answer that waited for it would hit
    the test's bound instead: a refused connection must end the request by itself.
    """
    stack = await stacks(base_url=DEAD_UPSTREAM, upstream=HOUR_TIMEOUTS)
    async with session.get(f"{stack.admin_url}/readyz") as response:
        assert response.status == 503
        assert "catalog not loaded" in (await response.json())["problems"]
    async with asyncio.timeout(BOUND):
        status, body, headers = await chat(session, stack)
    assert status == 502
    assert_envelope(body, code="upstream_unavailable")
    assert headers["X-Request-Id"]
    async with session.get(f"{stack.base_url}/models", headers=stack.auth()) as response:
        assert response.status == 502
        assert_envelope(await response.json(), code="upstream_unavailable")
    assert stack.emulator.requests == []
    async with session.get(f"{stack.admin_url}/healthz") as response:
        assert response.status == 200


async def test_upstream_goes_down_after_warm_up(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    """The catalog is warm, then Clipia goes away: chat gets a 502 (never a 500, no timeout)."""
    stack = await stacks(upstream=HOUR_TIMEOUTS)
    status, _, _ = await chat(session, stack)
    assert status == 200
    runner = stack.runners.pop()
    await runner.cleanup()
    async with asyncio.timeout(BOUND):  # a refused connection, not an hour-long timeout
        status, body, headers = await chat(session, stack)
    assert status == 502
    assert_envelope(body, code="upstream_unavailable")
    assert headers["X-Request-Id"]


# --------------------------------------------------------------------------------------------
# 429


def _past_http_date() -> str:
    return email.utils.format_datetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), usegmt=True)


RETRY_429 = {"retry_on_status": "[429, 500, 502, 503, 504, 529]"}
"""The operator's opt-in: the gateway retries these statuses itself."""


@pytest.mark.parametrize("retry_after", ["0", None, "past-date", "²"])
async def test_429_short_wait_is_retried_then_served_when_opted_in(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession, retry_after: str | None
) -> None:
    stack = await stacks(upstream=RETRY_429)
    value = _past_http_date() if retry_after == "past-date" else retry_after
    stack.emulator.push_fault(Fault(status=429, retry_after=value))
    status, body, headers = await chat(session, stack)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    seen = attempts(stack, headers["X-Request-Id"])
    assert [r.status for r in seen] == [429, 200]
    assert len(stack.chat_requests()) == 2  # both attempts carried the same request id


async def test_429_is_passed_through_at_once_by_default(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """One retry budget: the client's (it sees Retry-After and may retry), never the gateway's."""
    stack.emulator.push_fault(Fault(status=429, retry_after="0"))
    status, body, headers = await chat(session, stack)
    assert status == 429
    assert_envelope(body, code="rate_limit_exceeded")
    assert headers["Retry-After"] == "0"
    assert "x-should-retry" not in headers  # the client's own retry is the only one
    assert len(attempts(stack, headers["X-Request-Id"])) == 1


async def test_429_long_wait_is_passed_through(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    stack = await stacks(upstream=RETRY_429)
    stack.emulator.push_fault(Fault(status=429, retry_after="30", times=3))
    status, body, headers = await chat(session, stack)
    assert status == 429
    assert headers["Retry-After"] == "30"
    assert headers["x-should-retry"] == "false"  # the gateway owns this status's retries
    assert body == {
        "error": {
            "message": "Rate limit exceeded. Try again later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    seen = attempts(stack, headers["X-Request-Id"])
    # Waiting 30 s is over max_retry_wait: answered at once rather than retried.
    assert len(seen) == 1
    assert not stack.emulator.bills


# --------------------------------------------------------------------------------------------
# 5xx before any byte


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
async def test_5xx_passed_through_once_by_default(
    stack: Stack, session: aiohttp.ClientSession, status: int
) -> None:
    stack.emulator.push_fault(Fault(status=status, times=10))
    got, body, headers = await chat(session, stack)
    assert got == status
    assert_envelope(body)
    expected_code = {503: "service_unavailable"}.get(status, "internal_error")
    assert body["error"]["code"] == expected_code  # Clipia's envelope, not ours
    assert "x-should-retry" not in headers
    assert len(attempts(stack, headers["X-Request-Id"])) == 1
    assert not stack.emulator.bills


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
async def test_5xx_retried_then_passed_through_when_opted_in(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession, status: int
) -> None:
    stack = await stacks(upstream=RETRY_429)
    stack.emulator.push_fault(Fault(status=status, times=10))
    got, body, headers = await chat(session, stack)
    assert got == status
    assert_envelope(body)
    assert headers["x-should-retry"] == "false"  # the gateway spent the retry budget
    seen = attempts(stack, headers["X-Request-Id"])
    assert len(seen) == 1 + stack.config.upstream.retries
    assert len(stack.chat_requests()) == len(seen)
    assert not stack.emulator.bills


async def test_5xx_once_then_served_when_opted_in(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    stack = await stacks(upstream=RETRY_429)
    stack.emulator.push_fault(Fault(status=503))
    status, body, headers = await chat(session, stack)
    assert status == 200
    assert body["choices"]
    assert [r.status for r in attempts(stack, headers["X-Request-Id"])] == [503, 200]
    assert len(stack.emulator.bills) == 1


# --------------------------------------------------------------------------------------------
# 4xx about the request


@pytest.mark.parametrize(
    ("status", "code", "type_"),
    [
        (400, "invalid_request", "invalid_request_error"),
        (404, "not_found", "not_found_error"),
        (422, "model_input_invalid", "invalid_request_error"),
        (402, "insufficient_credits", "billing_error"),
    ],
)
async def test_4xx_passed_through_once(
    stack: Stack, session: aiohttp.ClientSession, status: int, code: str, type_: str
) -> None:
    stack.emulator.push_fault(Fault(status=status, times=3))
    got, body, headers = await chat(session, stack)
    assert got == status
    assert_envelope(body, code=code)
    assert body["error"]["type"] == type_
    assert len(attempts(stack, headers["X-Request-Id"])) == 1
    assert "Set-Cookie" not in headers
    assert not any(name.lower().startswith("ratelimit") for name in headers)


async def test_402_insufficient_credits_from_a_real_limit(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The company key's balance is gone: Clipia's 402 stays distinct from budget_exceeded."""
    stack.emulator.key_limits[stack.clipia_key] = Decimal(0)
    got, body, headers = await chat(session, stack)
    assert got == 402
    assert_envelope(body, code="insufficient_credits")
    assert body["error"]["code"] != "budget_exceeded"
    assert len(attempts(stack, headers["X-Request-Id"])) == 1


@pytest.mark.parametrize(("status", "code"), [(400, "invalid_request"), (502, "upstream_error")])
async def test_non_json_error_body_gets_our_envelope(
    stack: Stack, session: aiohttp.ClientSession, status: int, code: str
) -> None:
    stack.emulator.push_fault(Fault(status=status, non_json_body=True, times=10))
    got, body, headers = await chat(session, stack)
    assert got == status
    assert_envelope(body, code=code)
    assert "<html>" not in body["error"]["message"]
    assert len(attempts(stack, headers["X-Request-Id"])) == 1


# --------------------------------------------------------------------------------------------
# Clipia rejects our key


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_rejects_our_key(
    stack: Stack, session: aiohttp.ClientSession, log_capture: list[str], status: int
) -> None:
    stack.emulator.push_fault(Fault(status=status, body_quotes_key=True))
    async with session.post(
        f"{stack.base_url}/chat/completions", json=HELLO, headers=stack.auth()
    ) as response:
        raw = await response.read()
        got, request_id = response.status, response.headers["X-Request-Id"]
    assert got == 502
    body = msgspec.json.decode(raw)
    assert_envelope(body, code="upstream_unavailable")
    assert stack.clipia_key.encode() not in raw
    assert b"Request failed for key" not in raw
    assert b"Authorization" not in raw
    assert len(attempts(stack, request_id)) == 1  # never retried
    records = [msgspec.json.decode(line) for line in log_capture]
    errors = [
        r for r in records if r["level"] == "error" and r["logger"] == "clipia_proxy.upstream"
    ]
    assert len(errors) == 1
    assert str(status) in errors[0]["msg"]
    assert all(stack.clipia_key not in line for line in log_capture)
    # The next request is served.
    got, _, _ = await chat(session, stack)
    assert got == 200


# --------------------------------------------------------------------------------------------
# Redirects


async def test_redirect_is_never_followed(stack: Stack, session: aiohttp.ClientSession) -> None:
    seen: list[str] = []

    async def canary(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="canary")

    canary_app = web.Application()
    canary_app.router.add_route("*", "/{tail:.*}", canary)
    runner = web.AppRunner(canary_app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        target = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        stack.emulator.push_fault(Fault(redirect_to=target, times=3))
        got, body, headers = await chat(session, stack)
        assert got == 502
        assert_envelope(body, code="upstream_unavailable")
        assert "Location" not in headers
        assert len(attempts(stack, headers["X-Request-Id"])) == 1
        await asyncio.sleep(0.05)
        assert seen == []
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Slow first byte


async def test_slow_first_byte_is_504_without_retry(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    stack = await stacks(upstream={"first_byte_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(first_byte_delay=1.5, times=3))
    got, body, headers = await chat(session, stack)
    # A 504 (not the emulator's late 200) means the first-byte timeout cut the wait.
    assert got == 504
    assert_envelope(body, code="upstream_timeout")
    assert len(attempts(stack, headers["X-Request-Id"])) == 1


async def test_slow_stream_first_byte_is_504(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    stack = await stacks(upstream={"first_byte_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(first_byte_delay=1.5))
    got, body, headers = await chat(session, stack, {**HELLO, "stream": True})
    assert got == 504
    assert_envelope(body, code="upstream_timeout")
    assert len(attempts(stack, headers["X-Request-Id"])) == 1


async def test_first_byte_within_timeout_longer_than_idle(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    """The idle (between reads) timeout must not cut the wait for the first byte."""
    stack = await stacks(upstream={"first_byte_timeout_seconds": 3, "idle_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(first_byte_delay=0.8))
    got, body, _ = await chat(session, stack)
    assert got == 200, body


# --------------------------------------------------------------------------------------------
# Outbound headers


async def test_outbound_headers_are_an_allow_list(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    client_headers = {
        "Cookie": "session=secret-cookie",
        "User-Agent": "client-agent/9.9",
        "OpenAI-Organization": "org-client",
        "Proxy-Authorization": "Basic abc",
        "X-Forwarded-For": "10.0.0.1",
        "X-Custom": "custom",
        "Accept-Encoding": "gzip, br",
    }
    for stream in (False, True):
        async with session.post(
            f"{stack.base_url}/chat/completions",
            json={**HELLO, "stream": stream},
            headers={**stack.auth(), **client_headers},
        ) as response:
            assert response.status == 200
            await response.read()
            request_id = response.headers["X-Request-Id"]
        (record,) = attempts(stack, request_id)
        names = [name.lower() for name, _ in record.headers]
        assert len(names) == len(set(names))
        headers = {name.lower(): value for name, value in record.headers}
        assert set(headers) <= {
            "host",
            "authorization",
            "accept",
            "accept-encoding",
            "content-type",
            "content-length",
            "x-request-id",
            "user-agent",
        }
        assert headers["authorization"] == f"Bearer {stack.clipia_key}"
        assert headers["accept-encoding"] == "identity"
        assert headers["x-request-id"] == request_id
        assert headers["content-type"] == "application/json"
        assert headers["accept"] == ("text/event-stream" if stream else "application/json")
        assert headers["user-agent"].startswith("clipia-proxy/")
        assert record.key == stack.clipia_key
        assert stack.keys["search"] not in str(record.headers)


async def test_read_body_reads_every_chunk_and_stops_at_the_limit() -> None:
    from clipia_proxy.upstream import read_body

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for index in range(50):
            await response.write(b"%02d" % index)
            await asyncio.sleep(0)  # separate TCP writes: the reader sees many chunks
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    expected = b"".join(b"%02d" % index for index in range(50))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert await read_body(response, 1000) == expected
            async with session.get(url) as response:
                capped = await read_body(response, 10)
                assert capped == expected[:11]  # one byte past the limit says "too large"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# The connection pool, against a raw HTTP server that records every connection and request


class RawServer:
    """An HTTP/1.1 server on 127.0.0.1 whose answers the test scripts as raw bytes."""

    def __init__(self, answer: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        self.answer = answer
        self.requests: list[tuple[int, bytes]] = []
        """(connection number, request head) in arrival order."""
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()
        await asyncio.wait_for(self._idle.wait(), 5)  # every connection handler returned

    @property
    def base_url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        self._idle.clear()
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                self.requests.append((number, head))
                reply = await self.answer(head)
                if reply is None:
                    return  # hang up without answering
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            if not self._writers:
                self._idle.set()
            writer.close()


def ok(body: bytes = b"{}", *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{head}\r\n"
    ).encode() + body


def raw_client(base_url: str, **settings: Any) -> UpstreamClient:
    config = UpstreamConfig(base_url=base_url, api_key_env=None, **settings)
    return UpstreamClient(config, Secret("clipia_live_pool"))


async def get(client: UpstreamClient, path: str = "/models", **kwargs: Any) -> tuple[int, bytes]:
    response = await client.send("GET", path, request_id="r1", **kwargs)
    try:
        return response.status, await read_body(response, 1 << 20)
    finally:
        response.release()


async def test_pool_reuses_one_connection_for_sequential_requests() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok(b'{"n": 1}')

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            for _ in range(5):
                assert await get(client) == (200, b'{"n": 1}')
        finally:
            await client.close()
    assert server.connections == 1
    assert [number for number, _ in server.requests] == [1] * 5


async def test_pool_never_opens_more_than_max_connections() -> None:
    async def answer(_head: bytes) -> bytes:
        await asyncio.sleep(0.05)
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, max_connections=2)
        await client.start()
        try:
            results = await asyncio.gather(*(get(client) for _ in range(8)))
        finally:
            await client.close()
    assert results == [(200, b"{}")] * 8
    assert server.most_open <= 2
    assert server.connections == 2


async def test_a_cancelled_wait_for_a_connection_frees_nothing_it_did_not_take() -> None:
    gate = asyncio.Event()

    async def answer(_head: bytes) -> bytes:
        await gate.wait()
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, max_connections=1)
        await client.start()
        try:
            async with asyncio.TaskGroup() as group:
                first = group.create_task(get(client))
                waiting = group.create_task(get(client))
                await asyncio.sleep(0.05)
                waiting.cancel()  # cancelled while waiting for the only connection
                await asyncio.wait([waiting])
                assert waiting.cancelled()
                gate.set()
            assert first.result() == (200, b"{}")
            assert await get(client) == (200, b"{}")  # the connection came back to the pool
        finally:
            await client.close()
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok(b"{}", "Connection: close")

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            for _ in range(3):
                assert await get(client) == (200, b"{}")
                await asyncio.sleep(0.01)
        finally:
            await client.close()
    assert server.connections == 3


async def test_an_unread_body_closes_its_connection() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok(b"x" * 300_000)

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            response = await client.send("GET", "/models", request_id="r1")
            assert (await response.content.readany()).startswith(b"x")
            response.release()  # most of the body unread: the connection cannot be reused
            assert await get(client) == (200, b"x" * 300_000)
        finally:
            await client.close()
    assert server.connections == 2


async def test_close_fails_a_pending_body_read() -> None:
    async def answer(_head: bytes) -> bytes:
        # A chunked body that never ends: the reader waits for the next chunk.
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, idle_timeout_seconds=30)
        await client.start()
        try:
            response = await client.send("GET", "/models", request_id="r1")
            assert await response.content.readany() == b"hi"

            async def next_chunk() -> BaseException | bytes:
                try:
                    return await response.content.readany()
                except aiohttp.ClientConnectionError as exc:
                    return exc

            async with asyncio.TaskGroup() as group:
                pending = group.create_task(next_chunk())
                await asyncio.sleep(0.01)
                response.close()
                await asyncio.wait([pending], timeout=2)
            assert isinstance(pending.result(), aiohttp.ClientConnectionError)
            response.release()  # after close: nothing left to do
        finally:
            await client.close()


async def test_request_line_headers_and_query_are_exact() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok()

    async with RawServer(answer) as server:
        base_url = server.base_url
        client = raw_client(base_url)
        await client.start()
        try:
            tricky = "gen 1&x=2/\r\nX-Injected: yes"
            assert (await get(client, "/generation", query={"id": tricky}))[0] == 200
            response = await client.send(
                "POST", "/chat/completions", request_id="req-7", body=b'{"a":1}'
            )
            response.release()
        finally:
            await client.close()
    port = base_url.split(":")[2].split("/")[0]
    first = server.requests[0][1].decode("latin-1")
    request_line, *header_lines = first.split("\r\n")
    assert request_line == (
        "GET /v1/generation?id=gen%201%26x%3D2%2F%0D%0AX-Injected%3A%20yes HTTP/1.1"
    )
    assert "X-Injected" not in first.split("?")[0] + "".join(header_lines)
    headers = dict(line.split(": ", 1) for line in header_lines if line)
    assert headers["Host"] == f"127.0.0.1:{port}"
    assert headers["Authorization"] == "Bearer clipia_live_pool"
    assert headers["Accept-Encoding"] == "identity"
    post = server.requests[1][1].decode("latin-1")
    assert post.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "Content-Length: 7\r\n" in post
    assert "X-Request-Id: req-7\r\n" in post


async def test_interim_1xx_answers_are_skipped() -> None:
    async def answer(_head: bytes) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"after": "continue"}')

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            assert await get(client) == (200, b'{"after": "continue"}')
        finally:
            await client.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        None,  # the server hangs up without answering
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n",  # a head over 64 KiB
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 300_000,  # one that does not end (many reads)
    ],
    ids=["garbage", "bad-length", "hang-up", "huge-head", "endless-head"],
)
async def test_a_broken_answer_is_502_and_its_connection_is_dropped(reply: bytes | None) -> None:
    replies = [reply, ok(b'{"fine": true}')]

    async def answer(_head: bytes) -> bytes | None:
        return replies.pop(0)

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            # A POST (a chat): never resent once it may have arrived (aiohttp resends only
            # idempotent methods after a hang-up, which is harmless for GETs).
            with pytest.raises(UpstreamUnavailable):
                await client.send("POST", "/chat/completions", request_id="r1", body=b"{}")
            assert await get(client) == (200, b'{"fine": true}')  # on a new connection
        finally:
            await client.close()
    assert server.connections == 2


async def test_an_idle_connection_past_keep_alive_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import clipia_proxy.transport as transport_module

    monkeypatch.setattr(transport_module, "KEEPALIVE_SECONDS", 0.05)

    async def answer(_head: bytes) -> bytes:
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            assert await get(client) == (200, b"{}")
            assert await get(client) == (200, b"{}")
            await asyncio.sleep(0.1)
            assert await get(client) == (200, b"{}")
        finally:
            await client.close()
    assert [number for number, _ in server.requests] == [1, 1, 2]


async def test_a_closed_client_refuses_to_send() -> None:
    client = raw_client(DEAD_UPSTREAM)
    with pytest.raises(RuntimeError):
        await client.send("GET", "/models", request_id="r1")
    await client.start()
    await client.close()
    with pytest.raises(RuntimeError):
        await client.send("GET", "/models", request_id="r1")


async def test_https_upstream_is_verified_and_used() -> None:
    import ssl

    import trustme

    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_tls)

    async def models(request: web.Request) -> web.Response:
        assert request.headers["Host"].startswith("localhost:")
        return web.json_response({"data": [], "secure": request.secure})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls).start()
    base_url = f"https://localhost:{runner.addresses[0][1]}/v1"
    try:
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        client = UpstreamClient(
            UpstreamConfig(base_url=base_url, api_key_env=None),
            Secret("clipia_live_tls"),
            tls=trusting,
        )
        await client.start()
        try:
            status, body = await get(client)
        finally:
            await client.close()
        assert status == 200
        assert msgspec.json.decode(body) == {"data": [], "secure": True}
        # The default context trusts only the system's CAs: this certificate is refused, and
        # nothing was sent.
        untrusting = raw_client(base_url, retries=0)
        await untrusting.start()
        try:
            with pytest.raises(UpstreamUnavailable) as caught:
                await get(untrusting)
        finally:
            await untrusting.close()
        assert "cannot be reached" in caught.value.message
    finally:
        await runner.cleanup()


async def test_read_body_of_an_answer_that_arrived_whole() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok(b"0123456789" * 5)

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            for limit, expected in (
                (1000, b"0123456789" * 5),
                (50, b"0123456789" * 5),
                (10, b"0123456789" + b"0"),
            ):
                response = await client.send("GET", "/models", request_id="r1")
                try:
                    await asyncio.sleep(0.01)  # the body is in the buffer, complete
                    assert response.content.is_eof()
                    assert await read_body(response, limit) == expected
                finally:
                    response.release()
        finally:
            await client.close()


async def test_idle_timeout_after_headers_is_the_idle_one_not_the_first_byte_one() -> None:
    async def answer(_head: bytes) -> bytes:
        # Headers and one chunk at once, then silence.
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"

    async with RawServer(answer) as server:
        client = raw_client(
            server.base_url, first_byte_timeout_seconds=30, idle_timeout_seconds=0.2
        )
        await client.start()
        try:
            response = await client.send("GET", "/models", request_id="r1")
            try:
                assert await response.content.readany() == b"hi"
                async with asyncio.timeout(10):  # far below the 30 s first-byte timeout
                    with pytest.raises(aiohttp.ServerTimeoutError):
                        await response.content.readany()
            finally:
                response.release()
        finally:
            await client.close()


@contextlib.contextmanager
def counted_read_timers() -> Iterator[list[float]]:
    """Record the deadline of every idle-timeout timer the upstream bodies arm meanwhile."""
    from clipia_proxy.transport import IdleWatch

    timers: list[float] = []
    arm = IdleWatch._arm

    def counting_arm(body: Any, deadline: float) -> None:
        timers.append(deadline)
        arm(body, deadline)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(IdleWatch, "_arm", counting_arm)
        yield timers


async def test_a_steady_stream_needs_one_read_timer_not_one_per_chunk() -> None:
    async def slow_chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b"data: {}\n\n")
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", slow_chunks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = raw_client(f"http://127.0.0.1:{runner.addresses[0][1]}/v1", idle_timeout_seconds=0.5)
    await client.start()
    try:
        with counted_read_timers() as timers:
            response = await client.send("GET", "/models", request_id="r1")
            try:
                body = await read_body(response, 1 << 20)
            finally:
                response.release()
    finally:
        await client.close()
        await runner.cleanup()
    assert body == b"data: {}\n\n" * 40
    # One idle timer for the body, at most a few re-arms in 0.2 s: never one per chunk.
    assert 1 <= len(timers) <= 4


async def test_answers_that_arrive_whole_need_no_read_timer() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok(b'{"id": "x"}')

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, first_byte_timeout_seconds=30)
        await client.start()
        try:
            with counted_read_timers() as timers:
                for _ in range(20):
                    assert await get(client) == (200, b'{"id": "x"}')
        finally:
            await client.close()
    assert server.connections == 1
    assert timers == []  # the body came with the headers: no idle wait to time


async def test_a_later_request_on_a_kept_connection_still_times_out_on_time() -> None:
    """A watchdog left by an earlier answer neither fires early nor misses a silence.

    The first answer arrives at once; its watchdog (2 s) would be due 0.5 s into the second
    request, which the server answers after 1 s: a leftover watchdog would cut it. The third
    request gets no answer and must still time out (bounded by ``BOUND``, not measured).
    """
    answers = 0
    done = asyncio.Event()

    async def answer(_head: bytes) -> bytes | None:
        nonlocal answers
        answers += 1
        if answers == 2:
            await asyncio.sleep(1.0)  # past the first request's watchdog, within its own
        if answers == 3:
            await done.wait()  # no answer
            return None
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, first_byte_timeout_seconds=2.0)
        await client.start()
        try:
            assert await get(client) == (200, b"{}")
            await asyncio.sleep(1.5)  # the first request's watchdog is due in 0.5 s
            assert await get(client) == (200, b"{}")
            with pytest.raises(UpstreamTimeout):
                async with asyncio.timeout(BOUND):
                    await get(client)
        finally:
            done.set()
            await client.close()
    assert server.connections == 1


async def test_every_connection_busy_waits_the_connect_timeout_then_refuses() -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def answer(head: bytes) -> bytes:
        if b" /v1/slow " in head:
            arrived.set()
            await release.wait()
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url, max_connections=1, connect_timeout_seconds=0.2)
        await client.start()
        try:
            async with asyncio.TaskGroup() as group:
                slow = group.create_task(get(client, "/slow"))
                await asyncio.wait_for(arrived.wait(), 5)
                with pytest.raises(UpstreamBusy) as caught:
                    await get(client)
                assert (caught.value.status, caught.value.retry_after) == (502, 1)
                assert "busy" in caught.value.message
                assert not slow.done()
                release.set()
            assert slow.result() == (200, b"{}")
            assert await get(client) == (200, b"{}")  # the pool is whole again
        finally:
            release.set()
            await client.close()
    assert server.connections == 1
    assert [head.split(b" ")[1] for _, head in server.requests] == [b"/v1/slow", b"/v1/models"]


async def test_an_answer_without_length_ends_with_its_connection() -> None:
    async def answer(_head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 100_000

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            assert await get(client) == (200, b"z" * 100_000)
            assert await get(client) == (200, b"z" * 100_000)
        finally:
            await client.close()
    assert server.connections == 2  # such a connection is never reused


async def test_a_line_break_in_a_header_value_is_never_sent() -> None:
    async def answer(_head: bytes) -> bytes:
        return ok()

    async with RawServer(answer) as server:
        client = raw_client(server.base_url)
        await client.start()
        try:
            with pytest.raises(ValueError):
                await client.send("GET", "/models", request_id="r1\r\nX-Injected: yes")
            assert await get(client) == (200, b"{}")  # the pool is whole
        finally:
            await client.close()
    assert len(server.requests) == 1
    assert b"X-Injected" not in server.requests[0][1]


def test_the_default_transport_runs_on_uvloop() -> None:
    """The gateway runs on uvloop (its loop has no ``happy_eyeballs_delay``): a request works."""
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> tuple[int, bytes]:
        async def answer(_head: bytes) -> bytes:
            return ok(b'{"loop": "uvloop"}')

        async with RawServer(answer) as server:
            client = raw_client(server.base_url)
            await client.start()
            try:
                return await get(client)
            finally:
                await client.close()

    assert uvloop.run(exchange()) == (200, b'{"loop": "uvloop"}')


# --------------------------------------------------------------------------------------------
# The transport interface: create_app takes one (as tests inject httpx's MockTransport)


async def test_create_app_sends_through_an_injected_transport(
    aiohttp_client: Callable[..., Awaitable[Any]],
) -> None:
    from clipia_proxy.app import create_app
    from clipia_proxy.auth import generate_key
    from clipia_proxy.emulator.catalog import catalog_entry
    from clipia_proxy.upstream import MockTransport, UpstreamRequest, mock_response
    from tests.conftest import make_config

    answer = msgspec.json.encode(
        {
            "id": "gen-mock-1",
            "object": "chat.completion",
            "model": "gpt-5.5",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "from the mock"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }
    )

    async def handler(request: UpstreamRequest) -> Any:
        if request.url.path.endswith("/models"):
            return mock_response(200, msgspec.json.encode({"data": [catalog_entry("gpt-5.5")]}))
        return mock_response(200, answer, {"Content-Type": "application/json"})

    transport = MockTransport(handler)
    key = generate_key()
    config = make_config(
        "http://upstream.invalid",
        {"search": key, "research": generate_key()},
        store="{backend: memory}",
    )
    clipia_key = "clipia_live_" + secrets.token_urlsafe(24)
    app = create_app(config, api_key=Secret(clipia_key), upstream_transport=transport)
    client = await aiohttp_client(app)
    reply = await client.post(
        "/v1/chat/completions", json=HELLO, headers={"Authorization": f"Bearer {key}"}
    )
    assert reply.status == 200, await reply.text()
    assert await reply.read() == answer  # byte for byte
    (chat_request,) = [r for r in transport.requests if r.method == "POST"]
    assert str(chat_request.url) == "http://upstream.invalid/v1/chat/completions"
    assert chat_request.headers["Authorization"] == f"Bearer {clipia_key}"
    assert chat_request.body is not None
    assert msgspec.json.decode(chat_request.body)["model"] == "gpt-5.5"

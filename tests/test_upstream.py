"""Upstream faults through the real HTTP entry point (HARDENING §4), plus the pure seams.

Every test talks to the gateway with ``aiohttp.ClientSession`` at ``stack.base_url`` and checks
what the emulator received. Tests that need small timeouts or a dead upstream use conftest's
``stacks(upstream={...}, base_url=...)``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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
from clipia_proxy.errors import UpstreamUnavailable
from clipia_proxy.upstream import UpstreamClient, parse_retry_after
from tests.conftest import Stack

Json = Any
"""Decoded JSON from the wire: the assertions check its shape, not the type checker."""

HELLO: dict[str, object] = {
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "Hello there"}],
}
ENVELOPE_FIELDS = {"message", "type", "param", "code"}
DEAD_UPSTREAM = "http://127.0.0.1:1/v1"
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
    """Clipia unreachable from the start: fast 502 upstream_unavailable, /readyz 503."""
    stack = await stacks(base_url=DEAD_UPSTREAM)
    async with session.get(f"{stack.admin_url}/readyz") as response:
        assert response.status == 503
        assert "catalog not loaded" in (await response.json())["problems"]
    started = time.monotonic()
    status, body, headers = await chat(session, stack)
    assert time.monotonic() - started < 2.0
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
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    """The catalog is warm, then Clipia goes away: chat gets a fast 502, never a 500."""
    status, _, _ = await chat(session, stack)
    assert status == 200
    runner = stack.runners.pop()
    await runner.cleanup()
    started = time.monotonic()
    status, body, headers = await chat(session, stack)
    assert time.monotonic() - started < 2.0
    assert status == 502
    assert_envelope(body, code="upstream_unavailable")
    assert headers["X-Request-Id"]


# --------------------------------------------------------------------------------------------
# 429


def _past_http_date() -> str:
    return email.utils.format_datetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), usegmt=True)


@pytest.mark.parametrize("retry_after", ["0", None, "past-date", "²"])
async def test_429_short_wait_is_retried_then_served(
    stack: Stack, session: aiohttp.ClientSession, retry_after: str | None
) -> None:
    value = _past_http_date() if retry_after == "past-date" else retry_after
    stack.emulator.push_fault(Fault(status=429, retry_after=value))
    status, body, headers = await chat(session, stack)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    seen = attempts(stack, headers["X-Request-Id"])
    assert [r.status for r in seen] == [429, 200]
    assert len(stack.chat_requests()) == 2  # both attempts carried the same request id


async def test_429_long_wait_is_passed_through(
    stack: Stack, session: aiohttp.ClientSession
) -> None:
    stack.emulator.push_fault(Fault(status=429, retry_after="30", times=3))
    status, body, headers = await chat(session, stack)
    assert status == 429
    assert headers["Retry-After"] == "30"
    assert body == {
        "error": {
            "message": "Rate limit exceeded. Try again later.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    seen = attempts(stack, headers["X-Request-Id"])
    assert 1 <= len(seen) <= 1 + stack.config.upstream.retries
    # Waiting 30 s is over max_retry_wait: answered at once rather than retried.
    assert len(seen) == 1
    assert not stack.emulator.bills


# --------------------------------------------------------------------------------------------
# 5xx before any byte


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
async def test_5xx_retried_then_passed_through(
    stack: Stack, session: aiohttp.ClientSession, status: int
) -> None:
    stack.emulator.push_fault(Fault(status=status, times=10))
    got, body, headers = await chat(session, stack)
    assert got == status
    assert_envelope(body)
    expected_code = {503: "service_unavailable"}.get(status, "internal_error")
    assert body["error"]["code"] == expected_code  # Clipia's envelope, not ours
    seen = attempts(stack, headers["X-Request-Id"])
    assert len(seen) == 1 + stack.config.upstream.retries
    assert len(stack.chat_requests()) == len(seen)
    assert not stack.emulator.bills


async def test_5xx_once_then_served(stack: Stack, session: aiohttp.ClientSession) -> None:
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
    expected = 1 if status < 500 else 1 + stack.config.upstream.retries
    assert len(attempts(stack, headers["X-Request-Id"])) == expected


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
    started = time.monotonic()
    got, body, headers = await chat(session, stack)
    assert time.monotonic() - started < 1.2
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

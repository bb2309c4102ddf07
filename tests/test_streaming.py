"""The SSE relay through the gateway: broken streams, stalls, disconnects, usage, slow readers.

A broken stream must end in our SSE error event, never in a forged ``[DONE]``; a client that
leaves mid-stream is drained to the usage chunk; the usage chunk the gateway asked for itself
never reaches a client that did not ask for it. Every test talks HTTP to a real gateway in
front of the real emulator (or, for the one shape the emulator cannot script, a tiny upstream).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web

from clipia_proxy.emulator import CATALOG, Fault
from clipia_proxy.wire import encode_json
from tests.conftest import Stack

Json = Any

HELLO: dict[str, object] = {
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "Tell me a story about cats"}],
    "stream": True,
}
WITH_USAGE: dict[str, object] = {**HELLO, "stream_options": {"include_usage": True}}
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


async def stream(
    session: aiohttp.ClientSession, stack: Stack, body: Mapping[str, object] = WITH_USAGE
) -> tuple[int, bytes, str]:
    """POST a streaming chat request and read it whole; return status, body, request id."""
    async with session.post(
        f"{stack.base_url}/chat/completions", json=dict(body), headers=stack.auth()
    ) as response:
        raw = await response.read()
        return response.status, raw, response.headers["X-Request-Id"]


def events(raw: bytes) -> list[bytes]:
    """Return the ``data`` payloads of the complete events in ``raw`` (single-line data)."""
    out: list[bytes] = []
    for block in _EVENT_END.split(raw):
        for line in block.splitlines():
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def record_for(stack: Stack, request_id: str) -> Any:
    (record,) = [r for r in stack.chat_requests() if r.request_id == request_id]
    return record


def access_lines(log_capture: list[str], request_id: str) -> list[Json]:
    records = [msgspec.json.decode(line) for line in list(log_capture)]
    return [
        r
        for r in records
        if r.get("logger") == "clipia_proxy.access" and r.get("request_id") == request_id
    ]


async def wait_for(predicate: Callable[[], bool], *, seconds: float = 5.0) -> None:
    """Poll ``predicate`` every 50 ms for at most ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    assert predicate(), "condition not reached in time"


def assert_error_terminated(raw: bytes, code: str) -> None:
    """The stream ends in our error event, with no ``[DONE]`` anywhere."""
    assert b"[DONE]" not in raw
    assert raw.endswith(b"\n\n")
    last = msgspec.json.decode(events(raw)[-1])
    assert set(last) == {"error"}
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["code"] == code


def strip_usage_event(sent: bytes) -> bytes:
    """Return the emulator's bytes without its usage-only event (what the relay must send)."""
    blocks = sent.split(b"\n\n")
    kept = [b for b in blocks if not (b.startswith(b"data: {") and b'"choices":[]' in b)]
    return b"\n\n".join(kept)


# --------------------------------------------------------------------------------------------
# Broken upstream streams


@pytest.mark.parametrize("body", [WITH_USAGE, HELLO], ids=["usage-asked", "usage-injected"])
async def test_reset_mid_stream_ends_in_error_event(
    stack: Stack,
    session: aiohttp.ClientSession,
    log_capture: list[str],
    body: dict[str, object],
) -> None:
    stack.emulator.push_fault(Fault(reset_after_chunks=3))
    status, raw, request_id = await stream(session, stack, body)
    assert status == 200
    assert_error_terminated(raw, "upstream_unavailable")
    record = record_for(stack, request_id)
    assert not record.completed
    assert raw.startswith(bytes(record.sent))  # the relayed part is byte for byte
    assert len(events(raw)) == 4  # three upstream events, then ours
    (line,) = access_lines(log_capture, request_id)
    assert line["outcome"] == "upstream_error"
    assert len(stack.chat_requests()) == 1  # never retried once a byte reached the client


async def test_stall_mid_stream_ends_in_timeout_event(
    stacks: Callable[..., Awaitable[Stack]],
    session: aiohttp.ClientSession,
    log_capture: list[str],
) -> None:
    stack = await stacks(upstream={"idle_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(stall_after_chunks=2, stall_seconds=4))
    status, raw, request_id = await stream(session, stack)
    assert status == 200  # the error event (not the upstream's end after 4 s) ends the stream
    assert_error_terminated(raw, "upstream_timeout")
    assert len(events(raw)) == 3
    (line,) = access_lines(log_capture, request_id)
    assert line["outcome"] == "timeout"
    assert len(stack.chat_requests()) == 1


@pytest.mark.parametrize("body", [WITH_USAGE, HELLO], ids=["usage-asked", "usage-injected"])
async def test_close_before_usage_ends_in_error_event(
    stack: Stack, session: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    stack.emulator.push_fault(Fault(close_before_usage=True))
    status, raw, request_id = await stream(session, stack, body)
    assert status == 200
    assert_error_terminated(raw, "upstream_unavailable")
    assert b'"finish_reason":"stop"' in raw or b'"finish_reason":"length"' in raw
    assert b'"choices":[]' not in raw
    assert raw.startswith(bytes(record_for(stack, request_id).sent))


async def test_openai_sdk_raises_on_broken_stream(stack: Stack) -> None:
    """The terminal signal is one the openai SDK reads as an error, not as success."""
    stack.emulator.push_fault(Fault(reset_after_chunks=3))
    client = openai.AsyncOpenAI(
        base_url=stack.base_url, api_key=stack.keys["search"], max_retries=0, timeout=10
    )
    try:
        chunks: list[object] = []
        response = await client.chat.completions.create(
            model="gpt-5.5",
            messages=[{"role": "user", "content": "Tell me a story"}],
            stream=True,
        )

        async def consume() -> None:
            async for chunk in response:
                chunks.append(chunk)

        with pytest.raises(openai.APIError, match="interrupted"):
            await consume()
        assert 1 <= len(chunks) <= 3
    finally:
        await client.close()


async def test_clean_end_without_done_is_an_error(
    stacks: Callable[..., Awaitable[Stack]], session: aiohttp.ClientSession
) -> None:
    """An upstream that ends its body cleanly but without ``[DONE]`` broke the stream."""
    chunk = encode_json(
        {
            "id": "chatcmpl-000000000001",
            "object": "chat.completion.chunk",
            "model": "gpt-5.5",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        }
    )

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(CATALOG)})

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(2):
            await response.write(b"data: " + chunk + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        stack = await stacks(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
        status, raw, _ = await stream(session, stack, HELLO)
        assert status == 200
        assert raw.startswith((b"data: " + chunk + b"\n\n") * 2)
        assert_error_terminated(raw, "upstream_unavailable")
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Usage chunk


async def test_client_that_asked_for_usage_gets_it(
    stack: Stack, session: aiohttp.ClientSession, log_capture: list[str]
) -> None:
    status, raw, request_id = await stream(session, stack, WITH_USAGE)
    assert status == 200
    record = record_for(stack, request_id)
    assert raw == bytes(record.sent)  # byte for byte
    payloads = events(raw)
    assert payloads[-1] == b"[DONE]"
    usage_events = [msgspec.json.decode(p) for p in payloads[:-1] if b'"choices":[]' in p]
    assert len(usage_events) == 1
    usage = usage_events[0]["usage"]
    bill = stack.emulator.bills[record.generation_id]
    assert usage["prompt_tokens"] == bill.prompt_tokens
    assert usage["completion_tokens"] == bill.completion_tokens
    (line,) = access_lines(log_capture, request_id)
    assert line["outcome"] == "completed"
    assert line["usage_source"] == "stream"
    assert line["prompt_tokens"] == bill.prompt_tokens
    assert line["cost"] == str(bill.cost)


async def test_client_that_did_not_ask_never_sees_usage_event(
    stack: Stack, session: aiohttp.ClientSession, log_capture: list[str]
) -> None:
    status, raw, request_id = await stream(session, stack, HELLO)
    assert status == 200
    record = record_for(stack, request_id)
    options = record.json["stream_options"]
    assert options == {"include_usage": True}  # injected for the gateway's own accounting
    assert b'"choices":[]' in bytes(record.sent)
    assert b'"choices":[]' not in raw
    assert raw == strip_usage_event(bytes(record.sent))
    assert events(raw)[-1] == b"[DONE]"
    bill = stack.emulator.bills[record.generation_id]
    (line,) = access_lines(log_capture, request_id)
    assert line["usage_source"] == "stream"
    assert line["completion_tokens"] == bill.completion_tokens
    assert line["cost"] == str(bill.cost)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(crlf=True),
        Fault(tiny_writes=True),
        Fault(comments=True),
        Fault(events_per_write=5),
    ],
    ids=["crlf", "tiny-writes", "comments", "coalesced"],
)
async def test_framing_variants_relayed_and_usage_dropped(
    stack: Stack, session: aiohttp.ClientSession, log_capture: list[str], fault: Fault
) -> None:
    stack.emulator.push_fault(fault)
    status, raw, request_id = await stream(session, stack, HELLO)
    assert status == 200
    record = record_for(stack, request_id)
    assert b"[DONE]" in raw
    assert b'"choices":[]' not in raw
    assert len(raw) < len(record.sent)
    (line,) = access_lines(log_capture, request_id)
    assert line["outcome"] == "completed"
    assert line["completion_tokens"] == stack.emulator.bills[record.generation_id].completion_tokens


# --------------------------------------------------------------------------------------------
# The client goes away


async def test_client_disconnect_mid_stream_drains_to_usage(
    stacks: Callable[..., Awaitable[Stack]], log_capture: list[str]
) -> None:
    stack = await stacks(extra="accounting: {on_disconnect: drain}")
    stack.emulator.push_fault(Fault(chunk_gap=0.05))
    body = {**HELLO, "n": 2}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        response = await client.post(
            f"{stack.base_url}/chat/completions", json=body, headers=stack.auth()
        )
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        received = b""
        while received.count(b"\n\n") < 2:
            chunk = await response.content.readany()
            assert chunk
            received += chunk
        response.close()  # drop the connection mid-stream
    record = record_for(stack, request_id)
    assert not record.completed
    await wait_for(lambda: record.completed)  # the gateway read on to the end
    assert b"[DONE]" in bytes(record.sent)
    await wait_for(lambda: bool(access_lines(log_capture, request_id)))
    (line,) = access_lines(log_capture, request_id)
    bill = stack.emulator.bills[record.generation_id]
    assert line["outcome"] == "client_disconnect"
    assert line["usage_source"] == "stream"
    assert line["prompt_tokens"] == bill.prompt_tokens
    assert line["completion_tokens"] == bill.completion_tokens
    assert line["cost"] == str(bill.cost)
    # The gateway is fine afterwards.
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.post(
            f"{stack.base_url}/chat/completions", json=WITH_USAGE, headers=stack.auth()
        ) as again,
    ):
        assert again.status == 200
        assert (await again.read()).endswith(b"data: [DONE]\n\n")


async def test_slow_reader_does_not_hurt_the_gateway(stack: Stack) -> None:
    body = {**WITH_USAGE, "n": 8}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as slow:
        response = await slow.post(
            f"{stack.base_url}/chat/completions", json=body, headers=stack.auth()
        )
        try:
            assert response.status == 200
            first = await response.content.read(16)
            await asyncio.sleep(0.8)  # read nothing for a while
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as other,
                other.post(
                    f"{stack.base_url}/chat/completions", json=WITH_USAGE, headers=stack.auth()
                ) as served,
            ):
                assert served.status == 200
                assert (await served.read()).endswith(b"data: [DONE]\n\n")
            rest = await response.read()
        finally:
            response.release()
    raw = first + rest
    assert raw == bytes(record_for(stack, response.headers["X-Request-Id"]).sent)
    assert raw.endswith(b"data: [DONE]\n\n")


# --------------------------------------------------------------------------------------------
# Quiet but alive


async def test_long_quiet_stream_is_relayed_whole(
    stacks: Callable[..., Awaitable[Stack]],
    session: aiohttp.ClientSession,
    log_capture: list[str],
) -> None:
    stack = await stacks(upstream={"idle_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(chunk_gap=0.2, events_per_write=3))
    gaps: list[float] = []

    async def sleep(seconds: float) -> None:
        gaps.append(seconds)
        await asyncio.sleep(seconds)

    stack.emulator.sleep = sleep
    status, raw, request_id = await stream(session, stack, WITH_USAGE)
    assert status == 200
    record = record_for(stack, request_id)
    assert record.completed
    assert raw == bytes(record.sent)
    assert raw.endswith(b"data: [DONE]\n\n")
    writes = -(-len(events(raw)) // 3)
    assert writes >= 5
    # It really was quiet: the emulator waited between every two writes, just under the idle
    # timeout each time.
    assert gaps == [0.2] * (writes - 1)
    (line,) = access_lines(log_capture, request_id)
    assert line["outcome"] == "completed"

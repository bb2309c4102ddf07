"""Upstream answers the gateway must not relay (docs/hardening.md, "Upstream answers").

The emulator quotes the Clipia key it received — whole, JSON-escaped, partly, percent-encoded —
in an error body, a ``Retry-After`` header, a 200 answer or a stream; or answers 200 with a body
that is no chat completion. The client never sees the key (no 8-character piece of its secret
part, raw or unescaped), gets the documented status, and each withheld answer is counted.
"""

from __future__ import annotations

import re
import urllib.parse

import aiohttp
import pytest

from clipia_proxy.emulator import Fault
from tests.harness import Stack
from tests.http_client import Reply, assert_envelope, assert_served, chat, post_chat

FORMS = ["whole", "json_escaped", "partial", "percent"]


def _assert_no_key(stack: Stack, reply: Reply) -> None:
    secret = stack.clipia_key.removeprefix("clipia_live_")
    raw = reply.body + "".join(f"{k}: {v}\n" for k, v in reply.headers.items()).encode()
    views = [
        raw,
        re.sub(rb"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)).encode(), raw),
        urllib.parse.unquote_to_bytes(raw),
    ]
    for view in views:
        for start in range(len(secret) - 7):
            assert secret[start : start + 8].encode() not in view, (start, raw[:300])


async def _withheld(stack: Stack, reason: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    match = re.search(
        rf'^clipia_proxy_upstream_answers_withheld_total\{{reason="{reason}"\}} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert match is not None, "the withheld counter is exported"
    return float(match[1])


@pytest.mark.parametrize("form", FORMS)
async def test_s1_error_body_quoting_the_key_is_replaced(stack: Stack, form: str) -> None:
    before = await _withheld(stack, "key_echo")
    stack.emulator.push_fault(Fault(status=400, quote_key=form))  # type: ignore[arg-type]
    reply = await post_chat(stack, chat())
    error = assert_envelope(reply, 400, {"invalid_request", "upstream_error"})
    assert "answered 400" in error["message"]
    _assert_no_key(stack, reply)
    assert await _withheld(stack, "key_echo") == before + 1
    await assert_served(stack)


async def test_s1_retry_after_quoting_the_key_is_dropped(stack: Stack) -> None:
    stack.emulator.push_fault(
        Fault(status=429, quote_key="whole", quote_key_in="retry_after", times=5)
    )
    reply = await post_chat(stack, chat())
    assert reply.status == 429
    _assert_no_key(stack, reply)
    assert "key=" not in reply.headers.get("Retry-After", "")


@pytest.mark.parametrize("form", FORMS)
async def test_s2_200_answer_quoting_the_key_is_502(stack: Stack, form: str) -> None:
    before = await _withheld(stack, "key_echo")
    stack.emulator.push_fault(Fault(quote_key=form, quote_key_in="answer"))  # type: ignore[arg-type]
    reply = await post_chat(stack, chat())
    assert_envelope(reply, 502, "upstream_invalid_response")
    _assert_no_key(stack, reply)
    assert await _withheld(stack, "key_echo") == before + 1
    await assert_served(stack)


@pytest.mark.parametrize("form", FORMS)
async def test_s2_stream_quoting_the_key_is_cut(stack: Stack, form: str) -> None:
    before = await _withheld(stack, "key_echo")
    stack.emulator.push_fault(Fault(quote_key=form, quote_key_in="stream"))  # type: ignore[arg-type]
    reply = await post_chat(stack, chat(stream=True))
    assert reply.status == 200
    _assert_no_key(stack, reply)
    assert b"upstream_invalid_response" in reply.body
    assert b"[DONE]" not in reply.body
    assert await _withheld(stack, "key_echo") == before + 1
    await assert_served(stack)


@pytest.mark.parametrize("form", ["whole", "json_escaped"])
async def test_s2_key_split_across_reads_is_still_found(stack: Stack, form: str) -> None:
    """One byte per upstream write: the quoted key arrives over many reads."""
    fault = Fault(quote_key=form, quote_key_in="stream", tiny_writes=True)  # type: ignore[arg-type]
    stack.emulator.push_fault(fault)
    reply = await post_chat(stack, chat(stream=True))
    assert reply.status == 200
    _assert_no_key(stack, reply)
    assert b"upstream_invalid_response" in reply.body


async def test_u1_200_that_is_not_json_is_502(stack: Stack) -> None:
    before = await _withheld(stack, "invalid_response")
    stack.emulator.push_fault(Fault(invalid_answer="not_json"))
    reply = await post_chat(stack, chat())
    assert_envelope(reply, 502, "upstream_invalid_response")
    assert b"html" not in reply.body
    assert await _withheld(stack, "invalid_response") == before + 1
    await assert_served(stack)


async def test_u1_sse_for_a_non_streaming_request_is_502_and_settled(stack: Stack) -> None:
    stack.emulator.push_fault(Fault(invalid_answer="sse"))
    reply = await post_chat(stack, chat())
    assert_envelope(reply, 502, "upstream_invalid_response")
    assert b"data:" not in reply.body
    # Billed upstream: the usage the stream carried settles the request (spend > 0).
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{stack.base_url}/key", headers=stack.auth()) as response,
    ):
        key = await response.json()
    assert float(key["data"]["usage"]) > 0
    await assert_served(stack)

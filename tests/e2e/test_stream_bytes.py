"""Byte-exactness of the SSE relay through the real gateway.

The client must receive exactly the bytes the emulator sent for its request, except for the
usage-only event when the *gateway* (not the client) asked for ``include_usage``. The expected
bytes are built here, independently of the gateway's filter: the emulator's recorded bytes are
split into events at blank lines and the ``"choices":[]`` event is dropped whole.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipia_proxy.emulator import Fault, RecordedRequest

if TYPE_CHECKING:
    from tests.conftest import Stack

pytestmark = pytest.mark.e2e

_BLANK_LINE: Final = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")
"""An event ends at an empty line: two line ends in a row (LF, CRLF or CR, not mixed here)."""
_LINE_END: Final = re.compile(rb"\r\n|\n|\r")


def split_events(data: bytes) -> list[bytes]:
    """Split an SSE body into events, each with its terminating blank line; a tail stays last."""
    parts = _BLANK_LINE.split(data)
    events = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if parts[-1]:
        events.append(parts[-1])
    return events


def is_usage_only(event: bytes) -> bool:
    """Return whether ``event`` is a chunk with ``"choices": []`` (and a usage object)."""
    data = [
        line[len(b"data:") :].removeprefix(b" ")
        for line in _LINE_END.split(event)
        if line.startswith(b"data:")
    ]
    if not data:
        return False
    payload = b"\n".join(data)
    if payload == b"[DONE]":
        return False
    decoded = msgspec.json.decode(payload)
    return (
        isinstance(decoded, dict)
        and decoded.get("choices") == []
        and isinstance(decoded.get("usage"), dict)
    )


def expected_bytes(sent: bytes, *, drop_usage: bool) -> bytes:
    if not drop_usage:
        return sent
    return b"".join(event for event in split_events(sent) if not is_usage_only(event))


def test_split_events_helpers() -> None:
    body = (
        b': keep-alive\r\n\r\nevent: message\r\nid: 2\r\ndata: {"choices":[],"usage":{}}'
        b"\r\n\r\ndata: [DONE]\r\n\r\n"
    )
    events = split_events(body)
    assert b"".join(events) == body
    assert [is_usage_only(e) for e in events] == [False, True, False]
    assert expected_bytes(body, drop_usage=True) == b": keep-alive\r\n\r\ndata: [DONE]\r\n\r\n"
    assert split_events(b"data: 1\n\ndata: 2") == [b"data: 1\n\n", b"data: 2"]


async def stream_once(
    stack: Stack,
    session: aiohttp.ClientSession,
    *,
    client_usage: bool,
    content: str = "Stream this, byte for byte.",
    extra: dict[str, Any] | None = None,
) -> tuple[bytes, RecordedRequest, aiohttp.ClientResponse]:
    """POST one streaming chat request; return the raw body, the emulator's record, the response."""
    body: dict[str, Any] = {
        "model": "fast",
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        **(extra or {}),
    }
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    async with session.post(
        f"{stack.base_url}/chat/completions",
        data=msgspec.json.encode(body),
        headers={**stack.auth(), "Content-Type": "application/json"},
    ) as response:
        raw = await response.read()
    assert response.status == 200, raw
    request_id = response.headers.get("X-Request-Id")
    assert request_id
    records = [r for r in stack.chat_requests() if r.request_id == request_id]
    assert len(records) == 1
    return raw, records[0], response


def check_relay(
    raw: bytes, record: RecordedRequest, *, client_usage: bool, upstream_sends_usage: bool
) -> None:
    sent = bytes(record.sent)
    assert record.completed
    assert isinstance(record.json, dict)
    # The gateway always asks for usage upstream, whatever the client asked.
    assert record.json["stream_options"] == {"include_usage": True}
    usage_events = [e for e in split_events(sent) if is_usage_only(e)]
    assert len(usage_events) == (1 if upstream_sends_usage else 0)
    expected = expected_bytes(sent, drop_usage=not client_usage)
    assert raw == expected
    if not client_usage and upstream_sends_usage:
        assert len(raw) == len(sent) - len(usage_events[0])
    assert raw.endswith((b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n"))


FAULT_SHAPES: Final[dict[str, Fault]] = {
    "plain": Fault(),
    "tiny_writes": Fault(tiny_writes=True),
    "crlf": Fault(crlf=True),
    "comments": Fault(comments=True),
    "events_per_write_3": Fault(events_per_write=3),
    "usage_unasked": Fault(usage_unasked=True),
    "no_usage": Fault(no_usage=True),
    "crlf_comments_tiny": Fault(crlf=True, comments=True, tiny_writes=True),
    "comments_grouped": Fault(comments=True, events_per_write=4),
    "usage_without_cost": Fault(usage_without_cost=True, events_per_write=2),
}


@pytest.mark.parametrize("client_usage", [False, True], ids=["proxy_usage", "client_usage"])
@pytest.mark.parametrize("shape", list(FAULT_SHAPES))
async def test_relay_is_byte_exact(stack: Stack, shape: str, client_usage: bool) -> None:
    fault = FAULT_SHAPES[shape]
    stack.emulator.push_fault(fault)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        raw, record, response = await stream_once(stack, session, client_usage=client_usage)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert "Set-Cookie" not in response.headers
    assert stack.emulator.pending_faults == 0
    check_relay(raw, record, client_usage=client_usage, upstream_sends_usage=not fault.no_usage)


@pytest.mark.parametrize("client_usage", [False, True], ids=["proxy_usage", "client_usage"])
@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "lookup",
                        "parameters": {
                            "type": "object",
                            "properties": {"q": {"type": "string"}},
                            "required": ["q"],
                        },
                    },
                }
            ]
        },
    ],
    ids=["two_choices", "tool_call"],
)
async def test_relay_is_byte_exact_for_other_shapes(
    stack: Stack, extra: dict[str, Any], client_usage: bool
) -> None:
    stack.emulator.push_fault(Fault(tiny_writes=True, comments=True))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        raw, record, _ = await stream_once(stack, session, client_usage=client_usage, extra=extra)
    check_relay(raw, record, client_usage=client_usage, upstream_sends_usage=True)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    events_per_write=st.integers(min_value=1, max_value=5),
    tiny_writes=st.booleans(),
    crlf=st.booleans(),
    comments=st.booleans(),
    client_usage=st.booleans(),
    content=st.text(min_size=1, max_size=40),
)
@example(
    events_per_write=1,
    tiny_writes=True,
    crlf=True,
    comments=True,
    client_usage=False,
    content="x",
)
@example(
    events_per_write=5,
    tiny_writes=False,
    crlf=False,
    comments=False,
    client_usage=False,
    content='data: {"choices":[]}\n\n',
)
async def test_relay_is_byte_exact_under_any_write_pattern(
    stack: Stack,
    events_per_write: int,
    tiny_writes: bool,
    crlf: bool,
    comments: bool,
    client_usage: bool,
    content: str,
) -> None:
    stack.emulator.push_fault(
        Fault(
            events_per_write=events_per_write,
            tiny_writes=tiny_writes,
            crlf=crlf,
            comments=comments,
        )
    )
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        raw, record, _ = await stream_once(
            stack, session, client_usage=client_usage, content=content
        )
    check_relay(raw, record, client_usage=client_usage, upstream_sends_usage=True)


@pytest.mark.parametrize("stream_options", [{"include_usage": False}, {}, None])
async def test_client_declining_usage_is_treated_as_not_asking(
    stack: Stack, stream_options: dict[str, Any] | None
) -> None:
    stack.emulator.push_fault(Fault(events_per_write=2))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        raw, record, _ = await stream_once(
            stack, session, client_usage=False, extra={"stream_options": stream_options}
        )
    check_relay(raw, record, client_usage=False, upstream_sends_usage=True)

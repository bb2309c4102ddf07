"""Example tests for clipia_proxy.sse: one test (or table) per sentence of the specifications."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx2
import msgspec
import openai
import pytest

from clipia_proxy.sse import UsageChunkFilter, UsageTap, sse_error_event
from clipia_proxy.wire import Usage

FIXTURES = Path(__file__).parent / "fixtures" / "sse"

# --------------------------------------------------------------------------- helpers


def chunk(
    content: str | None = "hi",
    *,
    cid: str = "chatcmpl-3f9a1c7e2b41",
    model: str = "claude-opus-4-8",
    finish_reason: str | None = None,
    usage: dict[str, object] | None = None,
    choices: list[object] | None = None,
) -> bytes:
    """Return one chat.completion.chunk, encoded."""
    delta: dict[str, object] = {} if content is None else {"content": content}
    obj: dict[str, object] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1782300000,
        "model": model,
        "choices": (
            [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            if choices is None
            else choices
        ),
    }
    if usage is not None:
        obj["usage"] = usage
    return msgspec.json.encode(obj)


USAGE: dict[str, object] = {
    "prompt_tokens": 28,
    "completion_tokens": 64,
    "total_tokens": 92,
    "cost": Decimal("0.0504"),
}


def usage_chunk(usage: dict[str, object] | None = None) -> bytes:
    return chunk(choices=[], usage=USAGE if usage is None else usage)


def event(data: bytes, nl: bytes = b"\n") -> bytes:
    return b"data: " + data + nl + nl


def tap_of(pieces: Iterable[bytes], **kwargs: int) -> UsageTap:
    tap = UsageTap(**kwargs)
    for piece in pieces:
        tap.feed(piece)
    tap.close()
    return tap


def filtered(pieces: Iterable[bytes], **kwargs: int) -> bytes:
    chunk_filter = UsageChunkFilter(**kwargs)
    out = [chunk_filter.feed(piece) for piece in pieces]
    out.append(chunk_filter.flush())
    return b"".join(out)


def bytewise(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


def findings(tap: UsageTap) -> tuple[object, ...]:
    return (
        tap.upstream_id,
        tap.model,
        tap.usage,
        tap.finish_reason,
        tap.saw_done,
        tap.has_error,
        tap.error_event,
        tap.events,
        tap.content_chunks,
        tap.bad_json,
        tap.oversized_lines,
        tap.truncated,
    )


# --------------------------------------------------------------------------- fixtures


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def usage_block(body: bytes, nl: bytes) -> bytes:
    """Return the usage-only event block of a fixture, found by hand (not by the filter)."""
    start = body.index(b'"choices":[],"usage"')
    block_start = body.rindex(nl + nl, 0, start) + 2 * len(nl)
    block_end = body.index(nl + nl, start) + 2 * len(nl)
    return body[block_start:block_end]


FIXTURE_CASES: list[tuple[str, bytes, str, str, str, Decimal | None, int, int]] = [
    # name, line ending, upstream id, model, finish_reason, cost, events, content chunks
    ("lf_with_usage.sse", b"\n", "chatcmpl-3f9a1c7e2b41", "claude-opus-4-8", "stop", Decimal("0.0504"), 9, 5),
    ("crlf_with_usage.sse", b"\r\n", "chatcmpl-a07c5e91d2f8", "claude-opus-4-8", "length", Decimal("0.0125"), 7, 3),
    ("cr_with_usage.sse", b"\r", "chatcmpl-7a1b2c3d4e5f", "claude-opus-4-8", "stop", Decimal("0.0011"), 4, 2),
    ("lf_no_usage.sse", b"\n", "chatcmpl-5b2e8d04c6a1", "gpt-4.1-mini", "stop", None, 6, 3),
    ("comments_event_id_multiline.sse", b"\n", "chatcmpl-c41d9e07ab35", "claude-opus-4-8", "stop", Decimal("0.0075"), 5, 1),
    ("usage_every_chunk.sse", b"\n", "chatcmpl-9e0f3a6b7c12", "claude-opus-4-8", "stop", Decimal("0.0504"), 9, 5),
    ("imitation_in_content.sse", b"\n", "chatcmpl-0d8b6f2e4a97", "claude-opus-4-8", "stop", Decimal("0.0504"), 6, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "nl", "upstream_id", "model", "finish_reason", "cost", "events", "content_chunks"),
    FIXTURE_CASES,
)
def test_tap_reads_fixture(
    name: str,
    nl: bytes,
    upstream_id: str,
    model: str,
    finish_reason: str,
    cost: Decimal | None,
    events: int,
    content_chunks: int,
) -> None:
    body = fixture(name)
    tap = tap_of([body])
    assert tap.upstream_id == upstream_id
    assert tap.model == model
    assert tap.finish_reason == finish_reason
    assert (tap.usage.cost if tap.usage else None) == cost
    assert tap.saw_done
    assert (tap.events, tap.content_chunks, tap.bad_json) == (events, content_chunks, 0)
    assert (tap.has_error, tap.error_event, tap.truncated, tap.oversized_lines) == (
        False,
        False,
        False,
        0,
    )
    assert findings(tap_of(bytewise(body))) == findings(tap)


@pytest.mark.parametrize(("name", "nl"), [(case[0], case[1]) for case in FIXTURE_CASES])
def test_filter_removes_only_the_usage_block_of_fixture(name: str, nl: bytes) -> None:
    body = fixture(name)
    expected = body.replace(usage_block(body, nl), b"") if b'"choices":[]' in body else body
    assert filtered([body]) == expected
    assert filtered(bytewise(body)) == expected


def test_fixture_usage_cost_is_exact_decimal() -> None:
    tap = tap_of([fixture("lf_with_usage.sse")])
    assert tap.usage == Usage(
        prompt_tokens=28, completion_tokens=64, total_tokens=92, cost=Decimal("0.0504")
    )
    assert isinstance(tap.usage.cost, Decimal)


def test_fixture_every_two_way_split_reads_the_same() -> None:
    for name, *_ in FIXTURE_CASES:
        body = fixture(name)
        whole = findings(tap_of([body]))
        expected = filtered([body])
        for cut in range(len(body) + 1):
            assert findings(tap_of([body[:cut], body[cut:]])) == whole, (name, cut)
            assert filtered([body[:cut], body[cut:]]) == expected, (name, cut)


# --------------------------------------------------------------------------- UsageTap, per sentence


def test_tap_split_inside_data_field_name() -> None:
    body = event(chunk("x", usage=USAGE))
    assert findings(tap_of([body[:3], body[3:]])) == findings(tap_of([body]))


def test_tap_split_inside_multibyte_character() -> None:
    body = event(chunk("日本🚀", model="modèle-ü"))
    cut = body.index("🚀".encode()) + 2
    tap = tap_of([body[:cut], body[cut:]])
    assert tap.model == "modèle-ü"
    assert tap.bad_json == 0


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_tap_accepts_each_line_ending(nl: bytes) -> None:
    tap = tap_of([event(chunk("a"), nl) + event(usage_chunk(), nl) + event(b"[DONE]", nl)])
    assert (tap.events, tap.saw_done, tap.bad_json) == (3, True, 0)
    assert tap.usage is not None
    assert tap.usage.cost == Decimal("0.0504")


def test_tap_cr_then_lf_across_feeds_is_one_line_ending() -> None:
    # Were "\r" | "\n" two line endings, the blank line between them would end an event here.
    tap = tap_of([b'data: {"id":"a"}\r', b'\ndata: {"id":"b"}\r\n\r\n'])
    assert (tap.events, tap.bad_json, tap.upstream_id) == (1, 1, None)


def test_tap_lone_cr_then_other_byte_is_a_line_ending() -> None:
    tap = tap_of([b'data: {"id":"a"}\r', b"\r", b'data: {"id":"b"}\r\r'])
    assert (tap.events, tap.bad_json, tap.upstream_id) == (2, 0, "a")


def test_tap_ignores_comments() -> None:
    body = b": data: " + usage_chunk() + b"\n\n: data: [DONE]\n\n" + event(chunk("a"))
    tap = tap_of([body])
    assert (tap.usage, tap.saw_done, tap.events) == (None, False, 1)


def test_tap_data_loses_one_optional_space() -> None:
    tap = tap_of([b"data:" + chunk(model="m1") + b"\n\n"])
    assert tap.model == "m1"
    tap = tap_of([b"data:  [DONE]\n\n"])  # the second space is data: " [DONE]" is not "[DONE]"
    assert (tap.saw_done, tap.bad_json) == (False, 1)


def test_tap_joins_data_lines_with_newline() -> None:
    first, second = chunk("a", model="multi").split(b',"choices":')
    tap = tap_of([b"data: " + first + b',\ndata: "choices":' + second + b"\n\n"])
    assert (tap.model, tap.events, tap.bad_json) == ("multi", 1, 0)
    # Joined with "\n" (JSON whitespace), never with nothing: "1" + "2" would read as 12.
    tap = tap_of([b'data: {"id":"x","usage":{"prompt_tokens":1\ndata: 2}}\n\n'])
    assert tap.bad_json == 1


def test_tap_bare_data_line_contributes_an_empty_line() -> None:
    tap = tap_of([b'data: {"model":\ndata\ndata: "bare"}\n\n'])
    assert (tap.model, tap.bad_json) == ("bare", 0)


def test_tap_ignores_id_retry_and_unknown_fields() -> None:
    body = (
        b"id: 7\nretry: 10\nfoo: bar\nusage: {}\nevent: message\ndata: "
        + chunk(model="m")
        + b"\n\n"
    )
    tap = tap_of([body])
    assert (tap.model, tap.events, tap.error_event, tap.bad_json) == ("m", 1, False, 0)


def test_tap_notes_error_event_name() -> None:
    tap = tap_of([b"event: error\ndata: " + chunk() + b"\n\n"])
    assert tap.error_event
    assert not tap.has_error


def test_tap_reads_an_event_only_at_its_blank_line() -> None:
    tap = UsageTap()
    tap.feed(b"data: " + usage_chunk() + b"\n")
    assert tap.usage is None
    tap.feed(b"\n")
    assert tap.usage is not None


def test_tap_skips_event_without_data() -> None:
    tap = tap_of([b"event: message\nid: 3\n\n\n\n"])
    assert (tap.events, tap.bad_json) == (0, 0)


def test_tap_done_prefix_sets_saw_done() -> None:
    assert tap_of([b"data: [DONE]\n\n"]).saw_done
    assert tap_of([b"data: [DONE] \n\n"]).saw_done  # the openai SDK tests startswith("[DONE]")
    assert not tap_of([b"data: [DONE\n\n"]).saw_done


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"",
        b'{"id": "chatcmpl-3f9a1c7e2b41"',
        b"\xff\xfe",
        b"[" * 5000,
        b'{"cost": NaN}',
        b'{"cost": 1e999999}',
        b'{"a":1} trailing',
    ],
)
def test_tap_counts_undecodable_data_and_never_raises(data: bytes) -> None:
    tap = tap_of([b"data: " + data + b"\n\n"])
    assert (tap.bad_json, tap.events) == (1, 1)


def test_tap_ignores_json_that_is_not_an_object() -> None:
    tap = tap_of([b'data: ["usage"]\n\ndata: 3\n\ndata: "x"\n\n'])
    assert (tap.events, tap.bad_json, tap.usage, tap.upstream_id) == (3, 0, None, None)


def test_tap_keeps_first_id_latest_model_latest_usage_latest_finish_reason() -> None:
    later_usage = dict(USAGE, completion_tokens=70, cost=Decimal("0.06"))
    body = b"".join(
        [
            event(chunk("a", cid="chatcmpl-000000000001", model="m1")),
            event(chunk("b", cid="chatcmpl-000000000002", model="m2", finish_reason="length")),
            event(chunk(None, model="m3", finish_reason="stop", usage=USAGE)),
            event(usage_chunk(later_usage)),
            event(chunk(None, finish_reason=None)),
            event(b'{"id": 5, "model": null, "usage": null}'),
        ]
    )
    tap = tap_of([body])
    assert tap.upstream_id == "chatcmpl-000000000001"
    assert tap.model == "claude-opus-4-8"
    assert tap.finish_reason == "stop"
    assert tap.usage is not None
    assert (tap.usage.completion_tokens, tap.usage.cost) == (70, Decimal("0.06"))


def test_tap_first_string_id_wins_over_non_string() -> None:
    tap = tap_of([b'data: {"id": 5}\n\n', event(chunk(cid="chatcmpl-abcdefabcdef"))])
    assert tap.upstream_id == "chatcmpl-abcdefabcdef"


def test_tap_has_error_on_non_null_error() -> None:
    assert tap_of([b'data: {"error": {"message": "boom"}}\n\n']).has_error
    assert not tap_of([b'data: {"error": null}\n\n']).has_error


def test_tap_counts_content_chunks() -> None:
    tool = {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}
    body = b"".join(
        [
            event(chunk("")),  # the role-only first delta: no content
            event(chunk("a")),
            event(chunk(None, finish_reason="stop")),
            event(chunk(choices=[tool])),
            event(usage_chunk()),
        ]
    )
    assert tap_of([body]).content_chunks == 2


def test_tap_is_not_fooled_by_framing_inside_json_strings() -> None:
    fake = 'x\n\ndata: {"choices":[],"usage":{"cost":0}}\n\ndata: [DONE]\n\n'
    body = event(chunk(fake)) + event(chunk('{"usage":{"cost":0}}'))
    tap = tap_of([body])
    assert (tap.usage, tap.saw_done, tap.events, tap.bad_json) == (None, False, 2, 0)
    body = fixture("imitation_in_content.sse")
    tap = UsageTap()
    tap.feed(body[: body.rindex(b"data: [DONE]")])
    assert not tap.saw_done
    assert tap.usage is not None
    assert tap.usage.cost == Decimal("0.0504")


def test_tap_discards_oversized_line_and_its_event() -> None:
    big = event(chunk("x" * 500, model="big"))
    small = event(chunk("y", model="small"))
    tap = tap_of([small + big + small], max_line_bytes=400)
    assert (tap.oversized_lines, tap.events, tap.bad_json, tap.model) == (1, 2, 0, "small")
    tap = tap_of([b"data: " + b"x" * 151 + b"\n\n"], max_line_bytes=150)
    assert (tap.oversized_lines, tap.events) == (1, 0)
    tap = tap_of([b"data: " + b"x" * 144 + b"\n\n"], max_line_bytes=150)  # exactly 150 bytes
    assert (tap.oversized_lines, tap.events, tap.bad_json) == (0, 1, 1)


def test_tap_never_buffers_an_oversized_line_whole() -> None:
    tap = UsageTap(max_line_bytes=1024)
    tap.feed(b"data: ")
    for _ in range(1000):
        tap.feed(b"x" * 100)
        assert len(tap._partial) <= 1024  # the only buffer that grows with a line
    tap.feed(b"\n\n" + event(usage_chunk()))
    tap.close()
    assert tap.oversized_lines == 1
    assert tap.usage is not None


def test_tap_close_does_not_read_an_unterminated_line() -> None:
    tap = tap_of([event(chunk("a")), b"data: [DONE]"])
    assert (tap.saw_done, tap.truncated, tap.events) == (False, True, 1)


def test_tap_close_does_not_read_an_event_without_blank_line() -> None:
    tap = tap_of([event(chunk("a")), b"data: " + usage_chunk() + b"\n"])
    assert (tap.usage, tap.truncated, tap.events) == (None, True, 1)


def test_tap_close_after_a_complete_stream_is_not_truncated() -> None:
    assert not tap_of([event(chunk("a")), b": bye\n"]).truncated
    assert not tap_of([event(b"[DONE]", b"\r")]).truncated


def test_tap_feed_after_close_raises_and_close_twice_is_harmless() -> None:
    tap = tap_of([event(chunk("a"))])
    tap.close()
    with pytest.raises(ValueError, match="after close"):
        tap.feed(b"data: [DONE]\n\n")


def test_tap_rejects_non_positive_limit() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        UsageTap(max_line_bytes=0)


def test_tap_repr_is_readable() -> None:
    assert "chatcmpl-3f9a1c7e2b41" in repr(tap_of([event(chunk("a"))]))


# --------------------------------------------------------------------------- UsageChunkFilter, per sentence


def test_filter_drops_the_whole_block_with_its_comments_and_fields() -> None:
    keep = event(chunk("a")) + b": keep\n\n"
    block = b": usage follows\nevent: message\nid: 4\nretry: 5\ndata: " + usage_chunk() + b"\n\n"
    done = b"id: 5\ndata: [DONE]\n\n"
    assert filtered([keep + block + done]) == keep + done


def test_filter_drops_usage_only_chunk_blank_line_included() -> None:
    body = event(chunk("a")) + event(usage_chunk()) + event(b"[DONE]")
    assert filtered([body]) == event(chunk("a")) + event(b"[DONE]")


def test_filter_drops_multi_line_usage_only_chunk() -> None:
    first, second = usage_chunk().split(b',"choices":')
    block = b"data: " + first + b',\ndata: "choices":' + second + b"\n\n"
    assert filtered([event(chunk("a")) + block]) == event(chunk("a"))


def test_filter_drops_usage_only_chunk_whose_empty_choices_span_data_lines() -> None:
    block = b'data: {"id":"chatcmpl-3f9a1c7e2b41","choices":[\n: c\ndata: ],"usage":{"cost":1}}\n\n'
    assert filtered([block + event(b"[DONE]")]) == event(b"[DONE]")
    assert filtered(bytewise(block + event(b"[DONE]"))) == event(b"[DONE]")


def test_filter_drops_usage_only_chunk_written_with_whitespace() -> None:
    block = b'data: { "id" : "chatcmpl-3f9a1c7e2b41" , "choices" :\t[  ] , "usage" : {} }\n\n'
    assert filtered([block + event(b"[DONE]")]) == event(b"[DONE]")


def test_filter_drops_usage_only_chunk_with_escaped_key() -> None:
    block = b'data: {"id":"chatcmpl-3f9a1c7e2b41","choices":[],"\\u0075sage":{"cost":0.05}}\n\n'
    assert filtered([block + event(b"[DONE]")]) == event(b"[DONE]")


@pytest.mark.parametrize(
    "block",
    [
        event(chunk("a")),
        event(chunk("a", usage=USAGE)),  # usage *and* choices: the client sees it upstream's way
        event(chunk(choices=[], usage=None)),  # no usage at all
        b'data: {"choices":[],"usage":null}\n\n',
        b'data: {"choices":{},"usage":{"cost":1}}\n\n',
        b'data: [{"choices":[],"usage":{"cost":1}}]\n\n',
        event(b"[DONE]"),
        b": data: " + usage_chunk() + b"\n\n",
        b"event: message\nid: 1\n\n",
        b"data: not json usage\n\n",
        event(chunk('x\n\ndata: {"choices":[],"usage":{"cost":0}}\n\ndata: [DONE]\n\n')),
        b"\n\n\n",
    ],
)
def test_filter_passes_everything_else_through(block: bytes) -> None:
    body = event(chunk("a")) + block + event(b"[DONE]")
    assert filtered([body]) == body
    assert filtered(bytewise(body)) == body


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_filter_any_line_ending_any_two_way_split(nl: bytes) -> None:
    body = event(chunk("日本"), nl) + event(usage_chunk(), nl) + event(b"[DONE]", nl)
    expected = event(chunk("日本"), nl) + event(b"[DONE]", nl)
    for cut in range(len(body) + 1):
        assert filtered([body[:cut], body[cut:]]) == expected, cut


def test_filter_mixed_line_endings() -> None:
    body = (
        b"data: " + chunk("a") + b"\r\n\n"
        + b"data: " + usage_chunk() + b"\r\r\n"
        + b"data: " + usage_chunk() + b"\n\r"
        + b": c\r\n\r\n"
    )  # fmt: skip
    expected = b"data: " + chunk("a") + b"\r\n\n: c\r\n\r\n"
    assert filtered([body]) == expected
    assert filtered(bytewise(body)) == expected


def test_filter_cr_of_dropped_block_then_lf_in_next_feed_is_dropped_too() -> None:
    block = b"data: " + usage_chunk() + b"\r\n\r"
    chunk_filter = UsageChunkFilter()
    assert chunk_filter.feed(block) == b""
    assert chunk_filter.feed(b"\ndata: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert chunk_filter.dropped_events == 1


def test_filter_cr_of_released_block_then_lf_in_next_feed_passes() -> None:
    chunk_filter = UsageChunkFilter()
    assert chunk_filter.feed(b"data: [DONE]\r\n\r") == b"data: [DONE]\r\n\r"
    assert chunk_filter.feed(b"\n") == b"\n"
    assert chunk_filter.flush() == b""


def test_filter_releases_complete_blocks_at_once_and_holds_only_the_incomplete_one() -> None:
    chunk_filter = UsageChunkFilter()
    whole = event(chunk("a"))
    assert chunk_filter.feed(whole) is whole  # the fast path: no copy at all
    assert chunk_filter.feed(event(chunk("a"), b"\r\n")) == event(chunk("a"), b"\r\n")
    assert chunk_filter.feed(whole + b"data: " + usage_chunk()[:10]) == whole
    assert chunk_filter.feed(usage_chunk()[10:] + b"\n") == b""
    assert chunk_filter.feed(b"\n" + whole + b"data: [DO") == whole
    assert chunk_filter.feed(b"NE]\n\n") == b"data: [DONE]\n\n"
    assert chunk_filter.dropped_events == 1


def test_filter_oversized_block_is_released_and_streamed() -> None:
    block = b": " + b"p" * 400 + b"\ndata: " + usage_chunk() + b"\n\n"
    chunk_filter = UsageChunkFilter(max_event_bytes=300)
    assert chunk_filter.feed(block[:250]) == b""
    assert chunk_filter.feed(block[250:350]) == block[:350]
    assert chunk_filter.feed(block[350:]) == block[350:]
    assert chunk_filter.feed(event(usage_chunk(), b"\r")) == b""  # the next block is normal
    assert chunk_filter.flush() == b""
    assert filtered([block], max_event_bytes=300) == block
    assert filtered(bytewise(block), max_event_bytes=300) == block
    # The size that counts is the block's before its blank line: here all but the last "\n".
    assert filtered([block], max_event_bytes=len(block) - 1) == b""
    assert filtered([block], max_event_bytes=len(block) - 2) == block


def test_filter_flush_returns_the_incomplete_block_unchanged() -> None:
    partial = b"data: " + usage_chunk() + b"\r\n"
    chunk_filter = UsageChunkFilter()
    assert chunk_filter.feed(event(chunk("a")) + partial) == event(chunk("a"))
    assert chunk_filter.flush() == partial


def test_filter_feed_after_flush_raises() -> None:
    chunk_filter = UsageChunkFilter()
    chunk_filter.flush()
    with pytest.raises(ValueError, match="after flush"):
        chunk_filter.feed(b"data: [DONE]\n\n")


def test_filter_feed_empty_returns_empty_and_rejects_non_positive_limit() -> None:
    assert UsageChunkFilter().feed(b"") == b""
    with pytest.raises(ValueError, match="max_event_bytes"):
        UsageChunkFilter(max_event_bytes=0)
    assert "dropped_events=0" in repr(UsageChunkFilter())


# --------------------------------------------------------------------------- sse_error_event


def test_sse_error_event_shape() -> None:
    raw = sse_error_event("Upstream stream broke", code="upstream_error", type_="api_error")
    assert raw.startswith(b"data: ")
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 2
    assert msgspec.json.decode(raw[6:-2]) == {
        "error": {
            "message": "Upstream stream broke",
            "type": "api_error",
            "param": None,
            "code": "upstream_error",
        }
    }


def test_sse_error_event_message_cannot_inject_lines() -> None:
    evil = "x\r\n\r\ndata: [DONE]\n\n\r"
    raw = sse_error_event(evil, code="c", type_="t")
    assert b"\r" not in raw
    assert raw.count(b"\n") == 2
    tap = tap_of([raw])
    assert (tap.saw_done, tap.has_error, tap.events) == (False, True, 1)


def test_sse_error_event_makes_the_openai_sdk_raise() -> None:
    body = (
        event(chunk("partial answer"))
        + b"\n\n"  # what the relay writes first, to end any event the upstream left open
        + sse_error_event("Upstream stream broke", code="upstream_error", type_="api_error")
    )

    def serve(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    with httpx2.Client(transport=httpx2.MockTransport(serve)) as http_client:
        client = openai.OpenAI(
            api_key="k", base_url="http://proxy.test/v1", http_client=http_client
        )
        stream = client.chat.completions.create(
            model="claude-opus-4-8", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        received: list[str | None] = []

        def consume() -> None:
            for item in stream:
                received.extend(choice.delta.content for choice in item.choices)

        with pytest.raises(openai.APIError, match="Upstream stream broke") as caught:
            consume()
    assert received == ["partial answer"]
    assert caught.value.body == {
        "message": "Upstream stream broke",
        "type": "api_error",
        "param": None,
        "code": "upstream_error",
    }

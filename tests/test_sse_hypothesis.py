"""Hypothesis: the usage tap and the usage-chunk filter do not depend on how a stream is split."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Final

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipia_proxy.sse import UsageChunkFilter, UsageTap
from clipia_proxy.wire import Usage, usage_from_object

FIXTURES: Final = Path(__file__).parent / "fixtures" / "sse"
FIXTURE_NAMES: Final = sorted(path.name for path in FIXTURES.glob("*.sse"))
BODIES: Final = {name: (FIXTURES / name).read_bytes() for name in FIXTURE_NAMES}
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")

# Cut indices are drawn unbounded and reduced modulo the body length, so one strategy fits all.
CUTS: Final = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40)


def split(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({cut % (len(body) + 1) for cut in cuts})
    bounds = [0, *points, len(body)]
    return [body[start:end] for start, end in itertools.pairwise(bounds)]


def tap_findings(pieces: Iterable[bytes], *, max_line_bytes: int = 1 << 20) -> tuple[object, ...]:
    tap = UsageTap(max_line_bytes=max_line_bytes)
    for piece in pieces:
        tap.feed(piece)
    tap.close()
    return (
        tap.upstream_id,
        tap.model,
        tap.usage,
        tap.finish_reason,
        tap.saw_done,
        tap.bad_json,
        tap.events,
        tap.content_chunks,
        tap.has_error,
        tap.error_event,
        tap.oversized_lines,
        tap.truncated,
    )


def filtered(pieces: Iterable[bytes], *, max_event_bytes: int = 1 << 20) -> bytes:
    chunk_filter = UsageChunkFilter(max_event_bytes=max_event_bytes)
    out = [chunk_filter.feed(piece) for piece in pieces]
    out.append(chunk_filter.flush())
    return b"".join(out)


def reference_filter(body: bytes) -> tuple[bytes, int]:
    """Drop usage-only blocks from a whole body, the slow obvious way; return (output, dropped)."""
    out: list[bytes] = []
    dropped = 0
    block_start = line_start = 0
    for match in _LINE_END.finditer(body):
        if match.start() == line_start:
            block = body[block_start : match.end()]
            data = [
                line[6:] if line.startswith(b"data: ") else line[5:]
                for line in block.splitlines()
                if line.startswith(b"data:")
            ]
            try:
                obj = msgspec.json.decode(b"\n".join(data)) if data else None
            except msgspec.DecodeError:
                obj = None
            if isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage") is not None:
                dropped += 1
            else:
                out.append(block)
            block_start = match.end()
        line_start = match.end()
    out.append(body[block_start:])
    return b"".join(out), dropped


# --------------------------------------------------------------------------- fixtures

WHOLE: Final = {name: tap_findings([body]) for name, body in BODIES.items()}
EXPECTED_FILTERED: Final = {name: reference_filter(body)[0] for name, body in BODIES.items()}


def _index(name: str, needle: bytes, offset: int) -> list[int]:
    return [BODIES[name].index(needle) + offset]


@given(name=st.sampled_from(FIXTURE_NAMES), cuts=CUTS)
@example(name="crlf_with_usage.sse", cuts=_index("crlf_with_usage.sse", b"\r\n", 1))
@example(name="crlf_with_usage.sse", cuts=_index("crlf_with_usage.sse", b"\r\n\r\n", 3))
@example(name="crlf_with_usage.sse", cuts=_index("crlf_with_usage.sse", "日".encode(), 1))
@example(name="lf_with_usage.sse", cuts=_index("lf_with_usage.sse", "🚀".encode(), 2))
@example(name="lf_with_usage.sse", cuts=_index("lf_with_usage.sse", b"data:", 3))
@example(name="cr_with_usage.sse", cuts=_index("cr_with_usage.sse", b"\r\r", 1))
@example(name="comments_event_id_multiline.sse", cuts=list(range(0, 2000, 1)))
@example(name="imitation_in_content.sse", cuts=list(range(0, 2000, 1)))
@settings(max_examples=150, deadline=None)
def test_fixture_any_split(name: str, cuts: list[int]) -> None:
    pieces = split(BODIES[name], cuts)
    assert tap_findings(pieces) == WHOLE[name]
    assert filtered(pieces) == EXPECTED_FILTERED[name]


def test_fixture_reference_drops_exactly_the_usage_chunk() -> None:
    for name, body in BODIES.items():
        _, dropped = reference_filter(body)
        assert dropped == (0 if name == "lf_no_usage.sse" else 1), name


# --------------------------------------------------------------------------- generated streams

LINE_ENDINGS: Final = (b"\n", b"\r\n", b"\r")


@dataclass
class Stream:
    """A generated stream body with what the tap and the filter must make of it."""

    body: bytes = b""
    filtered: bytes = b""
    blocks: list[tuple[bytes, bytes, bool]] = field(default_factory=list)
    """(block bytes, its line ending, is a usage-only chunk)."""
    upstream_id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    saw_done: bool = False
    bad_json: int = 0
    events: int = 0
    content_chunks: int = 0
    has_error: bool = False
    error_event: bool = False

    def findings(self) -> tuple[object, ...]:
        return (
            self.upstream_id,
            self.model,
            self.usage,
            self.finish_reason,
            self.saw_done,
            self.bad_json,
            self.events,
            self.content_chunks,
            self.has_error,
            self.error_event,
            0,
            False,
        )

    def __repr__(self) -> str:
        return f"Stream(body={self.body!r})"


@dataclass(frozen=True)
class Block:
    """One event block to generate: prefix lines, then an event's data (or none)."""

    kind: str
    """chunk | usage_only | done | garbage | error | no_data | blank"""
    nl: bytes
    prefix: tuple[bytes, ...] = ()
    obj: dict[str, object] | None = None
    garbage: bytes = b""
    multiline: bool = False
    spaced: bool = True


def _data_lines(block: Block) -> list[bytes]:
    if block.kind == "done":
        payloads = [b"[DONE]"]
    elif block.kind == "garbage":
        payloads = [block.garbage]
    elif block.obj is not None:
        encoded = msgspec.json.encode(block.obj)
        if block.multiline and b',"choices":' in encoded:
            head, tail = encoded.split(b',"choices":', 1)
            payloads = [head + b",", b'"choices":' + tail]  # joined with "\n": JSON whitespace
        else:
            payloads = [encoded]
    else:
        payloads = []
    sep = b"data: " if block.spaced else b"data:"
    return [sep + payload for payload in payloads]


def build(blocks: Sequence[Block]) -> Stream:
    """Return the stream made of ``blocks`` and the findings a correct reader makes of it."""
    stream = Stream()
    parts: list[bytes] = []
    kept: list[bytes] = []
    for block in blocks:
        lines = [] if block.kind == "blank" else [*block.prefix, *_data_lines(block)]
        raw = b"".join(line + block.nl for line in lines) + block.nl
        is_usage_only = block.kind == "usage_only"
        stream.blocks.append((raw, block.nl, is_usage_only))
        parts.append(raw)
        if not is_usage_only:
            kept.append(raw)
        event_names = [line for line in block.prefix if line.startswith(b"event:")]
        if event_names and event_names[-1] == b"event: error":  # the last event: line wins
            stream.error_event = True
        if block.kind in {"blank", "no_data"}:
            continue
        stream.events += 1
        if block.kind == "done":
            stream.saw_done = True
        elif block.kind == "garbage":
            stream.bad_json += 1
        elif block.obj is not None:
            _expect_object(stream, block.obj)
    stream.body = b"".join(parts)
    stream.filtered = b"".join(kept)
    return stream


def _expect_object(stream: Stream, obj: dict[str, object]) -> None:
    if stream.upstream_id is None and isinstance(obj.get("id"), str):
        stream.upstream_id = str(obj["id"])
    if isinstance(obj.get("model"), str):
        stream.model = str(obj["model"])
    usage = usage_from_object(obj)
    if usage is not None:
        stream.usage = usage
    if obj.get("error") is not None:
        stream.has_error = True
    choices = obj.get("choices")
    has_content = False
    for choice in choices if isinstance(choices, list) else []:
        assert isinstance(choice, dict)
        finish_reason = choice.get("finish_reason")
        if isinstance(finish_reason, str):
            stream.finish_reason = finish_reason
        delta = choice["delta"]
        assert isinstance(delta, dict)
        has_content = has_content or bool(delta.get("content"))
    stream.content_chunks += has_content


IDS: Final = st.from_regex(r"\Achatcmpl-[0-9a-f]{12}\Z")
MODELS: Final = st.sampled_from(["claude-opus-4-8", "gpt-4.1-mini", "modèle-ü-日本"])
TEXT: Final = st.text(max_size=30)
ONE_LINE_TEXT: Final = st.text(
    st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=20
)
COSTS: Final = st.decimals(min_value=0, max_value=10, places=4, allow_nan=False)
USAGES: Final = st.builds(
    lambda p, c, cost: {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        **({} if cost is None else {"cost": cost}),
    },
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.none() | COSTS,
)
PREFIX_LINES: Final = st.lists(
    st.one_of(
        ONE_LINE_TEXT.map(lambda text: b":" + text.encode()),
        st.sampled_from([b"event: message", b"event: error", b"id: 7", b"retry: 3000", b"id"]),
    ),
    max_size=3,
).map(tuple)


@st.composite
def chunk_objects(draw: st.DrawFn, *, usage_only: bool = False) -> dict[str, object]:
    obj: dict[str, object] = {
        "id": draw(IDS),
        "object": "chat.completion.chunk",
        "created": 1782300000,
        "model": draw(MODELS),
    }
    if usage_only:
        obj["choices"] = []
        obj["usage"] = draw(USAGES)
        return obj
    obj["choices"] = [
        {
            "index": 0,
            "delta": {"content": draw(TEXT)},
            "finish_reason": draw(st.sampled_from([None, None, "stop", "length", "tool_calls"])),
        }
    ]
    obj["usage"] = draw(st.none() | USAGES)
    return obj


@st.composite
def blocks(draw: st.DrawFn, nl: bytes) -> Block:
    kind = draw(
        st.sampled_from(
            ["chunk"] * 3 + ["usage_only", "done", "garbage", "error", "no_data", "blank"]
        )
    )
    prefix = () if kind == "blank" else draw(PREFIX_LINES)
    obj: dict[str, object] | None = None
    garbage = b""
    if kind == "chunk":
        obj = draw(chunk_objects())
    elif kind == "usage_only":
        obj = draw(chunk_objects(usage_only=True))
    elif kind == "error":
        obj = {"error": {"message": draw(TEXT), "type": "api_error", "param": None, "code": "x"}}
    elif kind == "garbage":
        garbage = (
            draw(st.sampled_from([b"not json: ", b'{"usage":{"cost":1}}}', b"\xff"]))
            + draw(ONE_LINE_TEXT).encode()
        )
    elif kind == "no_data" and not prefix:
        prefix = (b"event: message",)
    return Block(
        kind=kind,
        nl=nl,
        prefix=prefix,
        obj=obj,
        garbage=garbage,
        multiline=draw(st.booleans()),
        spaced=draw(st.booleans()),
    )


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    style = draw(st.sampled_from([*LINE_ENDINGS, None]))  # None: each block picks its own
    drawn: list[Block] = []
    for _ in range(draw(st.integers(0, 8))):
        nl = style if style is not None else draw(st.sampled_from(LINE_ENDINGS))
        block = draw(blocks(nl))
        if block.kind == "blank" and drawn:
            # A stray blank line after a "\r"-ended block must not use "\n": "\r" + "\n" would
            # be one CRLF line ending, not two (the reader is right; the model would be wrong).
            block = Block(kind="blank", nl=drawn[-1].nl)
        drawn.append(block)
    return build(drawn)


_MULTIBYTE = Block(
    kind="chunk",
    nl=b"\r\n",
    obj={"id": "chatcmpl-0123456789ab", "model": "m", "choices": [{"delta": {"content": "€"}}]},
)
_USAGE_ONLY = Block(
    kind="usage_only",
    nl=b"\r\n",
    prefix=(b": usage", b"id: 4"),
    obj={"id": "chatcmpl-0123456789ab", "choices": [], "usage": {"cost": Decimal("0.0504")}},
    multiline=True,
)
_DONE = Block(kind="done", nl=b"\r\n")
_EXAMPLE = build([_MULTIBYTE, _USAGE_ONLY, _DONE])


@given(stream=streams(), cuts=CUTS)
@example(stream=_EXAMPLE, cuts=[_EXAMPLE.body.index(b"\r\n") + 1])  # between CR and LF
@example(stream=_EXAMPLE, cuts=[_EXAMPLE.body.index("€".encode()) + 1])  # inside a character
@example(stream=_EXAMPLE, cuts=[_EXAMPLE.body.index(b"data:") + 2])  # inside "data:"
@example(stream=_EXAMPLE, cuts=list(range(len(_EXAMPLE.body))))  # one byte at a time
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_stream_any_split(stream: Stream, cuts: list[int]) -> None:
    pieces = split(stream.body, cuts)
    assert tap_findings(pieces) == stream.findings()
    assert filtered(pieces) == stream.filtered
    assert reference_filter(stream.body)[0] == stream.filtered


@given(stream=streams(), cuts=CUTS, max_event_bytes=st.integers(1, 400))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_stream_oversized_events_pass_through(
    stream: Stream, cuts: list[int], max_event_bytes: int
) -> None:
    # A usage-only block is dropped only when its bytes before the blank line fit the limit.
    expected = b"".join(
        raw
        for raw, nl, is_usage_only in stream.blocks
        if not (is_usage_only and len(raw) - len(nl) <= max_event_bytes)
    )
    assert filtered(split(stream.body, cuts), max_event_bytes=max_event_bytes) == expected


@given(stream=streams(), cuts=CUTS, max_line_bytes=st.integers(1, 300))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_stream_oversized_lines_read_the_same_in_any_split(
    stream: Stream, cuts: list[int], max_line_bytes: int
) -> None:
    whole = tap_findings([stream.body], max_line_bytes=max_line_bytes)
    assert tap_findings(split(stream.body, cuts), max_line_bytes=max_line_bytes) == whole
    longest = max((len(line) for line in _LINE_END.split(stream.body)), default=0)
    assert (whole[10] == 0) == (longest <= max_line_bytes)


@given(stream=streams(), cut=st.integers(0, 1 << 20))
@settings(max_examples=100, deadline=None)
def test_generated_stream_cut_short_flushes_the_rest_unchanged(stream: Stream, cut: int) -> None:
    # A stream that stops anywhere: what the client got plus the flush is the prefix, filtered.
    prefix = stream.body[: cut % (len(stream.body) + 1)]
    assert filtered(split(prefix, [cut // 7])) == reference_filter(prefix)[0]

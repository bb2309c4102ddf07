r"""Pure Server-Sent Events helpers for the streaming relay: the usage tap, our usage-chunk filter, error events.

This module owns how the proxy *reads* an upstream ``text/event-stream``: :class:`UsageTap`
parses a copy of the bytes to learn the stream's usage, model, upstream id and how it ended;
:class:`UsageChunkFilter` removes the usage-only chunk that exists only because the proxy
injected ``stream_options.include_usage``; :func:`sse_error_event` builds the terminal error
event the relay writes when the upstream breaks after the headers were sent.

It never alters forwarded bytes, with one exception: :class:`UsageChunkFilter` drops the
proxy's own usage-only event blocks, whole, at event boundaries. Everything else reaches the
client byte for byte and in order, whatever the line-ending style or the chunking. It performs
no I/O and imports neither aiohttp nor asyncio, so it can be tested exhaustively.

Field parsing follows the WHATWG SSE specification ("event stream interpretation"): lines end
in ``\r\n``, ``\n`` or ``\r``; a line starting with ``:`` is a comment; ``field: value``
loses one leading space; ``data`` lines of one event are joined with ``\n``; an event is
dispatched only at a blank line.

How the ``openai`` Python SDK (checked against ``openai`` 3.57.0, ``openai/_streaming.py``,
``Stream.__stream__``) reacts to an error in a stream: it splits events the same way
(``SSEDecoder``), stops at the first event whose data *starts with* ``[DONE]``, and otherwise
JSON-decodes the data; in the default ``"legacy"`` stream mode, which chat completions use, a
decoded mapping whose ``error`` value is truthy raises ``openai.APIError`` with
``error["message"]`` as the message and ``error`` as ``body``. The SSE ``event:`` name is *not*
what triggers it (``event: error`` is only special for Assistants ``thread.*`` streams), so
:func:`sse_error_event` writes a plain ``data:`` event with no ``event:`` line, whose
``error`` is a non-empty object; ``tests/test_sse.py`` checks that the real SDK raises on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

from clipia_proxy.wire import Usage, decode_json, encode_json, usage_from_object

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "UsageChunkFilter",
    "UsageTap",
    "sse_error_event",
]

DEFAULT_MAX_LINE_BYTES: Final = 1 << 20
"""1 MiB: far above any real chunk (a chunk carries a few tokens), low enough to bound memory."""

DEFAULT_MAX_EVENT_BYTES: Final = 1 << 20
"""1 MiB: a usage-only chunk is a few hundred bytes; anything bigger is streamed, not held."""

_DONE: Final = b"[DONE]"
_LF: Final = 0x0A
_CR: Final = 0x0D
_COLON: Final = 0x3A
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
"""One SSE line terminator; the alternation order makes ``\\r\\n`` win over a lone ``\\r``."""
_EMPTY_CHOICES: Final = re.compile(rb'"choices"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*\]')
"""``"choices": []`` as JSON may write it (whitespace is space, tab, CR, LF), outside a string."""


def _decode_event_data(payload: bytes) -> tuple[bool, object]:
    """Return ``(True, value)`` for decodable JSON, ``(False, None)`` otherwise; never raise."""
    try:
        return True, decode_json(payload)
    # msgspec.DecodeError is a ValueError; msgspec raises RecursionError past its nesting limit.
    except (ValueError, RecursionError):
        return False, None


def _is_usage_only(obj: object) -> bool:
    """Return whether a decoded chunk is a usage-only chunk: ``choices == []`` and a usage."""
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices")
    return isinstance(choices, list) and not choices and obj.get("usage") is not None


class UsageTap:
    r"""Incremental SSE parser over a copy of a stream's bytes; reads usage, never raises on content.

    Specification:

    - ``feed`` may be called any number of times; every split of the same bytes (inside
      ``data:``, between ``\r`` and ``\n``, inside a multi-byte UTF-8 character) gives the
      same result.
    - Lines may end in ``\n``, ``\r\n`` or ``\r``; a ``\r`` ending one chunk and a ``\n``
      starting the next are one line ending.
    - A line starting with ``:`` is a comment and is ignored.
    - ``data:`` loses one optional leading space; the ``data`` lines of one event are joined
      with ``\n``; a ``data`` line without a colon contributes an empty line.
    - ``id:``, ``retry:`` and unknown fields are ignored; ``event: error`` sets ``error_event``.
    - An event is read only when its blank line arrives; an event without ``data`` is skipped.
    - Data starting with ``[DONE]`` (the openai SDK's test) sets ``saw_done``.
    - Other data is decoded as JSON; data that does not decode increments ``bad_json``.
    - From a decoded object: the first string ``id`` is ``upstream_id``, the latest string
      ``model`` is ``model``, the latest non-null ``usage`` is ``usage``, the latest string
      ``finish_reason`` of its choices is ``finish_reason``, a non-null ``error`` sets
      ``has_error``, and a choice delta with non-empty ``content`` or ``tool_calls`` counts a
      content chunk.
    - Text inside a JSON string (an imitation of ``usage`` or of ``data: [DONE]``) is content,
      never framing.
    - A line longer than ``max_line_bytes`` is discarded without being buffered whole, counted
      in ``oversized_lines``, and the event it belongs to is skipped.
    - ``close`` ends the stream: a final line without its line ending, or an event without its
      blank line, is not read, and sets ``truncated``.
    - ``feed`` after ``close`` raises ``ValueError``; ``close`` twice is harmless.
    """

    __slots__ = (
        "_closed",
        "_cr_pending",
        "_data",
        "_discarding",
        "_event_name",
        "_max_line_bytes",
        "_partial",
        "_skip_event",
        "bad_json",
        "content_chars",
        "content_chunks",
        "error_event",
        "events",
        "finish_reason",
        "has_error",
        "model",
        "oversized_lines",
        "saw_done",
        "truncated",
        "upstream_id",
        "usage",
    )

    upstream_id: str | None
    """The first string ``id`` of a chunk (``chatcmpl-…``), the key for ``/v1/generation``."""
    model: str | None
    """The latest string ``model`` of a chunk: the model the upstream says it streamed."""
    usage: Usage | None
    """The latest non-null ``usage`` of a chunk; ``usage.cost`` is an exact ``Decimal``."""
    finish_reason: str | None
    """The latest non-null ``finish_reason`` among the chunks' choices."""
    saw_done: bool
    """Whether a complete ``data: [DONE]`` event arrived: the upstream ended the stream cleanly."""
    has_error: bool
    """Whether a chunk carried a non-null ``error`` (the openai SDK raises on it)."""
    error_event: bool
    """Whether an event block was named ``error`` (``event: error``)."""
    events: int
    """Events read: complete events with ``data``, including ``[DONE]`` and undecodable ones."""
    content_chunks: int
    """Chunks with at least one choice whose delta has non-empty ``content`` or ``tool_calls``."""
    content_chars: int
    """Characters of ``content`` in all choice deltas."""
    bad_json: int
    """Events whose data was neither ``[DONE]`` nor decodable JSON."""
    oversized_lines: int
    """Lines longer than ``max_line_bytes``, discarded (and their events skipped)."""
    truncated: bool
    """Set by ``close``: the stream ended inside a line or inside an event (no blank line)."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        """Start a tap; lines longer than ``max_line_bytes`` (without line ending) are discarded."""
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max_line_bytes = max_line_bytes
        self._partial = bytearray()
        """The current line's bytes so far, without its line ending (≤ ``max_line_bytes``)."""
        self._cr_pending = False
        """The last byte fed was a ``\\r`` line ending: a ``\\n`` starting the next feed is part of it."""
        self._discarding = False
        """The current line is oversized: its bytes are dropped until its line ending."""
        self._data: list[bytes] = []
        self._event_name: bytes | None = None
        self._skip_event = False
        self._closed = False
        self.upstream_id = None
        self.model = None
        self.usage = None
        self.finish_reason = None
        self.saw_done = False
        self.has_error = False
        self.error_event = False
        self.events = 0
        self.content_chunks = 0
        self.content_chars = 0
        self.bad_json = 0
        self.oversized_lines = 0
        self.truncated = False

    @property
    def output_tokens_seen(self) -> int:
        """Return a lower bound of the completion tokens streamed so far.

        Every content chunk holds at least one token, and tokenizers average well under 8
        characters a token over any real text: an upstream that honours ``max_tokens`` never
        reaches it by this count.
        """
        return max(self.content_chunks, self.content_chars // 8)

    def __repr__(self) -> str:
        """Return the tap's findings (no stream content)."""
        return (
            f"UsageTap(upstream_id={self.upstream_id!r}, model={self.model!r}, "
            f"usage={self.usage!r}, finish_reason={self.finish_reason!r}, "
            f"saw_done={self.saw_done}, events={self.events}, bad_json={self.bad_json}, "
            f"has_error={self.has_error}, truncated={self.truncated})"
        )

    def feed(self, data: bytes) -> None:
        """Read the next bytes of the stream, in any split."""
        if self._closed:
            raise ValueError("UsageTap.feed() after close()")
        if not data:
            return
        if self._cr_pending:
            self._cr_pending = False
            if data[0] == _LF:
                data = data[1:]
                if not data:
                    return
        if data.find(b"\r") != -1:  # not ``in``: see redact's docstring
            self._cr_pending = data[-1] == _CR
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self._max_line_bytes
        if lines:
            first = lines[0]
            if self._discarding:
                self._discarding = False  # that line ends here; it was counted when it began
                del lines[0]
            elif self._partial:
                self._partial += first
                lines[0] = bytes(self._partial)
                self._partial.clear()
            for line in lines:
                if len(line) > limit:
                    self.oversized_lines += 1
                    self._skip_event = True
                else:
                    self._read_line(line)
        if self._discarding or not tail:
            return
        if len(self._partial) + len(tail) > limit:
            # Count the line once, now, and stop buffering it: memory stays ≤ max_line_bytes.
            self.oversized_lines += 1
            self._skip_event = True
            self._discarding = True
            self._partial.clear()
        else:
            self._partial += tail

    def close(self) -> None:
        """End the stream; an unterminated last line or event is recorded in ``truncated``."""
        if self._closed:
            return
        self._closed = True
        if self._partial or self._discarding or self._data:
            self.truncated = True
        self._partial.clear()
        self._data.clear()

    def _read_line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value[:1] == b" " else value)
            return
        if line[0] == _COLON:
            return
        name, _, value = line.partition(b":")
        if name == b"data":  # a bare "data" line: the spec's field with an empty value
            self._data.append(b"")
        elif name == b"event":
            self._event_name = value[1:] if value[:1] == b" " else value

    def _dispatch(self) -> None:
        data = self._data
        if self._event_name == b"error":
            self.error_event = True
        self._event_name = None
        if self._skip_event:
            self._skip_event = False
            data.clear()
            return
        if not data:
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        data.clear()
        self.events += 1
        if payload.startswith(_DONE):
            self.saw_done = True
            return
        ok, obj = _decode_event_data(payload)
        if not ok:
            self.bad_json += 1
            return
        if isinstance(obj, dict):
            self._read_chunk(obj)

    def _read_chunk(self, chunk: dict[object, object]) -> None:
        if self.upstream_id is None:
            upstream_id = chunk.get("id")
            if isinstance(upstream_id, str):
                self.upstream_id = upstream_id
        model = chunk.get("model")
        if isinstance(model, str):
            self.model = model
        if chunk.get("usage") is not None:
            usage = usage_from_object(chunk)
            if usage is not None:
                self.usage = usage
        if chunk.get("error") is not None:
            self.has_error = True
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        has_content = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str):
                self.finish_reason = finish_reason
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                tool_calls = delta.get("tool_calls")
                if isinstance(content, str) and content:
                    has_content = True
                    self.content_chars += len(content)
                elif isinstance(tool_calls, list) and tool_calls:
                    has_content = True
        if has_content:
            self.content_chunks += 1


# What the byte after a released or held trailing "\r" means (see UsageChunkFilter._cr_state).
_CR_NONE: Final = 0
_CR_HELD: Final = 1
_CR_RELEASED: Final = 2
_CR_DROPPED: Final = 3


class UsageChunkFilter:
    r"""Remove the usage-only events the proxy caused from a stream; pass every other byte through.

    Use it only when the proxy injected ``stream_options.include_usage`` (the client did not
    ask for usage). Specification:

    - An event block is every line up to and including the blank line that ends it, comments
      and ``event:``/``id:``/``retry:`` lines included.
    - A block whose ``data`` decodes to an object with ``"choices": []`` and a non-null
      ``usage`` is a usage-only chunk, and is removed whole, blank line included.
    - Every other byte passes through unchanged and in order: a chunk with content, a chunk
      that has usage *and* choices, ``[DONE]``, comments, undecodable data, text that imitates
      usage inside a JSON string.
    - Lines may end in ``\n``, ``\r\n`` or ``\r``, mixed, and a ``\r``/``\n`` pair may be
      split across feeds; the output does not depend on how the input was split.
    - A complete block is released by the ``feed`` that brings its blank line; only the
      current incomplete block is held back.
    - A block larger than ``max_event_bytes`` (before its blank line) is never a candidate: it
      is released as soon as it passes the limit, then streamed through to its end.
    - ``flush`` returns the held-back incomplete block unchanged (a stream cut mid-event).
    - ``feed`` after ``flush`` raises ``ValueError``.

    Hence ``b"".join(outputs)`` equals the input without the usage-only blocks, and equals
    the input when there are none.
    """

    __slots__ = (
        "_cr_state",
        "_flushed",
        "_held",
        "_line_start",
        "_max_event_bytes",
        "_streaming_block",
        "dropped_events",
    )

    dropped_events: int
    """Usage-only event blocks removed so far (normally 0, then 1)."""

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        """Start a filter; blocks over ``max_event_bytes`` are streamed through, never dropped."""
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes}")
        self._max_event_bytes = max_event_bytes
        self._held = bytearray()
        """Bytes of the current incomplete block (its start is always index 0)."""
        self._line_start = 0
        """Index in ``_held`` where the current line starts; -1: the line has bytes already released."""
        self._cr_state = _CR_NONE
        """The last byte seen was a ``\\r`` line ending that was held, released or dropped."""
        self._streaming_block = False
        """The current block passed ``max_event_bytes``: its bytes are released as they come."""
        self._flushed = False
        self.dropped_events = 0

    def __repr__(self) -> str:
        """Return the filter's state (no stream content)."""
        return (
            f"UsageChunkFilter(held={len(self._held)}, dropped_events={self.dropped_events}, "
            f"flushed={self._flushed})"
        )

    def feed(self, data: bytes) -> bytes:
        """Take the next upstream bytes; return the bytes to send to the client now."""
        if self._flushed:
            raise ValueError("UsageChunkFilter.feed() after flush()")
        if not data:
            return b""
        prefix = b""
        if self._cr_state != _CR_NONE:
            cr_state = self._cr_state
            self._cr_state = _CR_NONE
            if data[0] == _LF:
                # The "\n" completes a "\r\n" whose "\r" was already handled: it shares its fate.
                if cr_state == _CR_HELD:
                    self._held.append(_LF)
                    self._line_start = len(self._held)
                elif cr_state == _CR_RELEASED:
                    prefix = b"\n"
                data = data[1:]
                if not data:
                    return prefix
        at_boundary = not self._held and not self._streaming_block
        if at_boundary and data.endswith(b"\n\n") and data.find(b"\r") == -1:
            # Whole events with "\n" line ends only (what upstreams write): block by block.
            return prefix + self._whole_blocks(data)
        if at_boundary and data.endswith(b"\r\n\r\n") and not _may_be_usage_only(data):
            # Whole events (the data starts at a block boundary and ends in a blank line),
            # none of which can be a usage-only chunk.
            return prefix + data if prefix else data
        return prefix + self._scan(data)

    def flush(self) -> bytes:
        """End the stream; return the held-back incomplete block, unchanged."""
        self._flushed = True
        rest = bytes(self._held)
        self._held.clear()
        return rest

    def _whole_blocks(self, data: bytes) -> bytes:
        r"""``_scan`` for whole blocks whose lines all end in ``\n``: a block ends at its ``\n\n``.

        A line is empty only at a block's end, so the block around a position runs from the
        ``\n\n`` before it to the one after it. When no escape could spell a key and no block
        has a second ``data`` line, only the blocks holding ``"choices": []`` can be usage-only
        chunks: they are found with one search over the read, not one step per line.
        """
        if (
            # the one-byte search first: far faster (``find``, not ``in``: see redact)
            (data.find(b"\\") != -1 and data.find(b"\\u00") != -1)
            or data.startswith(b"\n")
            # a "data" line after a line that is not blank: a block's second line
            or data.count(b"\ndata") != data.count(b"\n\ndata")
        ):
            candidates = _blocks(data)  # rare: every block is looked at
        else:
            candidates = (_block_around(data, found) for found in _EMPTY_CHOICES.finditer(data))
        limit = self._max_event_bytes
        kept: list[bytes] = []
        emit_from = 0
        for block_start, block_end in candidates:
            if (
                block_start >= emit_from  # not a second match in a block already dropped
                and block_end - 1 - block_start <= limit
                and _may_be_usage_only(data, block_start, block_end)
                and _block_is_usage_only(data[block_start:block_end])
            ):
                kept.append(data[emit_from:block_start])
                emit_from = block_end
                self.dropped_events += 1
        if not emit_from:
            return data
        kept.append(data[emit_from:])
        return b"".join(kept)

    def _scan(self, data: bytes) -> bytes:
        held = self._held
        start = len(held)
        held += data
        line_start = self._line_start
        block_start = 0
        emit_from = 0
        out: list[bytes] = []
        limit = self._max_event_bytes
        last_end = start
        dropped = False
        for match in _LINE_END.finditer(held, start):
            end = match.end()
            last_end = end
            if match.start() != line_start:
                line_start = end
                continue
            # A blank line: the block [block_start, end) is complete.
            if (
                not self._streaming_block
                and match.start() - block_start <= limit
                and _may_be_usage_only(held, block_start, end)
                and _block_is_usage_only(held[block_start:end])
            ):
                if block_start > emit_from:
                    out.append(bytes(held[emit_from:block_start]))
                emit_from = end
                self.dropped_events += 1
                dropped = True
            else:
                dropped = False
            self._streaming_block = False
            block_start = line_start = end
        if last_end == len(held) and held[-1] == _CR:
            if block_start == len(held):
                self._cr_state = _CR_DROPPED if dropped else _CR_RELEASED
            elif self._streaming_block or len(held) - block_start > limit:
                self._cr_state = _CR_RELEASED
            else:
                self._cr_state = _CR_HELD
        if self._streaming_block or len(held) - block_start > limit:
            # An oversized block is never a candidate: release it now, remember only whether
            # its current line is empty so far (the next blank line ends it).
            self._streaming_block = True
            out.append(bytes(held[emit_from:]))
            self._line_start = 0 if line_start == len(held) else -1
            held.clear()
        else:
            if block_start > emit_from:
                out.append(bytes(held[emit_from:block_start]))
            del held[:block_start]
            self._line_start = line_start - block_start
        return out[0] if len(out) == 1 else b"".join(out)


def _blocks(data: bytes) -> Iterator[tuple[int, int]]:
    r"""(start, end) of each block of whole blocks with ``\n`` line ends."""
    pos = 0
    while pos < len(data):
        end = pos + 1 if data[pos] == _LF else data.index(b"\n\n", pos) + 2
        yield pos, end
        pos = end


def _block_around(data: bytes, found: re.Match[bytes]) -> tuple[int, int]:
    r"""(start, end) of the block holding ``found``.

    ``data`` is whole blocks with ``\n`` line ends that does not begin with an empty line.
    """
    before = data.rfind(b"\n\n", 0, found.start())
    return (0 if before < 0 else before + 2), data.index(b"\n\n", found.end()) + 2


def _may_be_usage_only(data: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    r"""Return whether the bytes may hold a usage-only chunk; ``False`` is certain, ``True`` is not.

    A usage-only chunk spells ``usage`` and ``"choices": []``. OpenAI-style upstreams send
    ``"usage": null`` in every chunk, so the empty ``choices`` is what rules most chunks out,
    unless the data spans several ``data`` lines (then ``[`` and ``]`` may sit on different
    lines, with comments between them). JSON may escape any letter of a key
    (``"\u0075sage"``); the letters of ``choices`` and ``usage`` are U+0061..U+0075, so such
    a key contains ``\u006`` or ``\u007``.
    """
    stop = len(data) if end is None else end
    if data.find(b"\\u00", start, stop) >= 0 and (
        data.find(b"\\u006", start, stop) >= 0 or data.find(b"\\u007", start, stop) >= 0
    ):
        return True
    if data.find(b"usage", start, stop) < 0:
        return False
    return (
        _EMPTY_CHOICES.search(data, start, stop) is not None or data.count(b"data", start, stop) > 1
    )


def _block_is_usage_only(block: bytes | bytearray) -> bool:
    """Return whether one complete event block is a usage-only chunk."""
    data: list[bytes] = []
    for line in bytes(block).splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
        elif line == b"data":
            data.append(b"")
    if not data:
        return False
    ok, obj = _decode_event_data(data[0] if len(data) == 1 else b"\n".join(data))
    return ok and _is_usage_only(obj)


def sse_error_event(message: str, *, code: str, type_: str) -> bytes:
    """Return one SSE event carrying an OpenAI error object, which makes the openai SDK raise.

    ``message`` is JSON-encoded, so it cannot add lines or events to the stream.
    """
    error = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + encode_json(error) + b"\n\n"

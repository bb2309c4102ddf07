"""The stream relay's decisions: a state machine fed events, returning what to do next.

:class:`Relay` holds no socket and awaits nothing (mitmproxy's sans-io layers): the I/O loop in
:mod:`clipia_proxy.streaming` reads the upstream, feeds each event here, and carries out the
:class:`Step` it gets back. Every outcome of a stream is decided in this module:

- an upstream chunk is tapped (usage, model, upstream id), scanned for the gateway's own key
  (an end that could start it is held back until the next chunk), checked against the output the request reserved, and filtered (the usage-only event the
  gateway asked for is dropped); what the client should receive is returned;
- the upstream ends: ``completed`` when ``[DONE]`` was seen, else ``upstream_error``;
- the upstream read fails (reset) → ``upstream_error``; it stalls past the idle timeout →
  ``timeout``; either one while shutdown cuts the stream → ``timeout`` (``draining``);
- the client leaves → ``client_disconnect``; the upstream is closed at once when the upstream id
  is known and ``on_disconnect`` is ``cancel``, else read on until the drain deadline;
- a chunk past the reserved output → relayed, then the upstream closed (``upstream_error``,
  SSE error ``output_limit_exceeded``); a chunk quoting the key → withheld, closed
  (``upstream_error``, SSE error ``upstream_invalid_response``).

The end of the stream (:meth:`Relay.finish`) is either the bytes the filter still held, or an
SSE error event naming why the stream was cut — never a forged ``[DONE]``.
"""

from __future__ import annotations

from enum import Enum
from typing import Final, Protocol

from .quotas.model import Outcome
from .record import RequestInfo
from .sse import UsageChunkFilter, UsageTap, sse_error_event

__all__ = ["CLOSE", "END", "READ", "Relay", "Step", "StreamResult"]

_STREAM_TERMINATOR: Final = b"\n\n"
"""Written before our error event: ends any partial upstream event (blank lines are no-ops)."""


class Step(Enum):
    """What the I/O loop does after an event."""

    READ = "read"
    """Read the next upstream chunk (before :attr:`Relay.drain_deadline`, when one is set)."""
    CLOSE = "close"
    """Close the upstream connection and stop reading."""
    END = "end"
    """Stop reading: the upstream body ended or broke."""


READ: Final = Step.READ
CLOSE: Final = Step.CLOSE
END: Final = Step.END
"""The steps as module names: looking up an Enum member costs about 0.15 µs on Python 3.11,
and the relay does it on every chunk."""


class KeyScan(Protocol):
    """Looks for the gateway's Clipia key across a stream's chunks (``redact.StreamScan``)."""

    def feed(self, chunk: bytes) -> bytes | None:
        """Return the bytes to relay now (an end that could start the key is held), or None."""
        ...

    def flush(self) -> bytes:
        """Return the bytes still held back (the stream ended without quoting the key)."""
        ...


class StreamResult:
    """What the relay learnt besides the outcome: the tap, why it cut, the times.

    The outcome itself is the request's: the relay sets it on the request's record.
    """

    __slots__ = (
        "cut_at_bound",
        "cut_for_secret",
        "cut_for_shutdown",
        "first_byte_at",
        "tap",
        "upstream_done_at",
    )

    def __init__(self, tap: UsageTap) -> None:
        self.tap: Final = tap
        self.cut_for_shutdown = False
        """Set when shutdown's grace period ran out while this stream was open."""
        self.cut_at_bound = False
        """Set when the upstream wrote more than the output bound reserved for the request."""
        self.cut_for_secret = False
        """Set when a chunk quoted the gateway's Clipia key: it was not relayed, the stream cut."""
        self.first_byte_at: float | None = None
        self.upstream_done_at: float | None = None
        """perf_counter when the upstream body ended (or broke)."""


class Relay:
    """One stream's outcome state machine: events in, :class:`Step` (and bytes to relay) out.

    The outcome is written on ``record`` (the request's; ``completed`` when the stream starts).
    ``output_limit`` is the completion tokens the request reserved (all choices), or ``None``;
    ``cancel_on_disconnect`` is ``on_disconnect == "cancel"``; ``drain_timeout`` bounds the
    reads after the client left. Times are the caller's monotonic clock.
    """

    __slots__ = (
        "_cancel",
        "_char_limit",
        "_drain_timeout",
        "_filter",
        "_output_limit",
        "_scan",
        "client_alive",
        "drain_deadline",
        "record",
        "result",
        "tap",
    )

    def __init__(
        self,
        result: StreamResult,
        record: RequestInfo,
        *,
        drop_usage_chunk: bool,
        cancel_on_disconnect: bool,
        drain_timeout: float,
        output_limit: int | None = None,
        scan: KeyScan | None = None,
    ) -> None:
        self.result: Final = result
        self.record: Final = record
        self.tap: Final = result.tap
        self._filter = UsageChunkFilter() if drop_usage_chunk else None
        self._cancel = cancel_on_disconnect
        self._drain_timeout = drain_timeout
        self._output_limit = output_limit
        self._char_limit = 8 * (output_limit + 1) if output_limit is not None else 0
        """``tap.output_tokens_seen > output_limit`` without the property call per chunk."""
        self._scan = scan
        self.client_alive = True
        self.drain_deadline: float | None = None
        """Set when the client left and the upstream is read on: no read past it."""

    def received(self, chunk: bytes) -> tuple[bytes, Step]:
        """Feed one (non-empty) upstream chunk; return the bytes for the client and the step.

        The bytes are written before the step is carried out (a chunk past the bound is still
        relayed: it was already generated); they are empty when nothing goes to the client.
        """
        result, tap = self.result, self.tap
        tap.feed(chunk)
        limit = self._output_limit
        if (
            limit is not None
            and (tap.content_chunks > limit or tap.content_chars >= self._char_limit)
            and not tap.saw_done
        ):
            result.cut_at_bound = True
        scan = self._scan
        released = scan.feed(chunk) if scan is not None else chunk
        if released is None:
            result.cut_for_secret = True
            self.record.outcome = Outcome.UPSTREAM_ERROR
            return b"", CLOSE
        if not self.client_alive:
            if result.cut_at_bound or (self._cancel and tap.upstream_id is not None):
                return b"", CLOSE
            return b"", READ
        chunk_filter = self._filter
        out = chunk_filter.feed(released) if chunk_filter is not None else released
        if result.cut_at_bound:
            self.record.outcome = Outcome.UPSTREAM_ERROR
            return out, CLOSE
        return out, READ

    def client_left(self, now: float) -> Step:
        """The client went away (a failed write); ``now`` starts the drain deadline."""
        self.client_alive = False
        self.record.outcome = Outcome.CLIENT_DISCONNECT
        if self.result.cut_at_bound or (self._cancel and self.tap.upstream_id is not None):
            return CLOSE
        # drain: read on for the usage; cancel: only until the upstream id is known.
        self.drain_deadline = now + self._drain_timeout
        return READ

    def timed_out(self) -> Step:
        """No upstream byte within the idle timeout (or the drain deadline passed)."""
        if self.client_alive:
            self.record.outcome = Outcome.TIMEOUT
        return CLOSE

    def read_failed(self) -> Step:
        """The upstream read failed: a reset, or shutdown closed the connection."""
        if self.client_alive:
            self.record.outcome = (
                Outcome.TIMEOUT if self.result.cut_for_shutdown else Outcome.UPSTREAM_ERROR
            )
        return END

    def ended(self) -> Step:
        """The upstream body ended cleanly (complete only if ``[DONE]`` was seen)."""
        if self.client_alive:
            if self.result.cut_for_shutdown:
                self.record.outcome = Outcome.TIMEOUT
            elif not self.tap.saw_done:
                self.record.outcome = Outcome.UPSTREAM_ERROR
        return END

    def finish(self) -> bytes | None:
        """Close the tap; return the client's last bytes before EOF (``None``: client gone).

        A completed stream gets what the key scan and the filter still held; any other outcome
        gets our SSE error event. Held-back bytes of a cut stream are an incomplete event: dropping them is
        safer than relaying a fragment that would merge with the error event.
        """
        self.tap.close()
        if not self.client_alive:
            return None
        outcome = self.record.outcome
        held = self._scan.flush() if self._scan is not None else b""
        if outcome is Outcome.COMPLETED:
            if self._filter is not None:
                return self._filter.feed(held) + self._filter.flush()
            return held
        message, code = _cut_reason(self.result, outcome)
        return _STREAM_TERMINATOR + sse_error_event(message, code=code, type_="api_error")

    def finish_failed(self) -> None:
        """The client left while the stream's last bytes were written."""
        self.client_alive = False
        self.record.outcome = Outcome.CLIENT_DISCONNECT


def _cut_reason(result: StreamResult, outcome: Outcome | None) -> tuple[str, str]:
    """Return the error event's message and code for a stream that did not complete."""
    if result.cut_for_secret:
        return (
            "The upstream stream quoted the gateway's own credentials; the rest was withheld.",
            "upstream_invalid_response",
        )
    if result.cut_at_bound:
        return (
            "The upstream wrote more than the output this request reserved (its max_tokens); "
            "the stream was cut.",
            "output_limit_exceeded",
        )
    if result.cut_for_shutdown:
        return "The gateway is shutting down and its grace period ran out.", "draining"
    if outcome is Outcome.UPSTREAM_ERROR:
        return "The upstream stream was interrupted.", "upstream_unavailable"
    return "The upstream stream stalled and was cut.", "upstream_timeout"

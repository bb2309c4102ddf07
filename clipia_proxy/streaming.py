"""The SSE relay: upstream chunks go to the client as they arrive, byte for byte.

The relay never alters forwarded bytes, with one exception: when the gateway itself asked the
upstream for ``stream_options.include_usage``, the usage-only event that request caused is
removed whole (:class:`~clipia_proxy.sse.UsageChunkFilter`). A :class:`~clipia_proxy.sse.UsageTap`
reads a copy of every byte to learn the usage, the model and the upstream id.

How a stream ends, and the ``outcome`` recorded for it:

- the upstream finishes (``[DONE]`` seen, clean end) → ``completed``;
- the upstream breaks (reset, or a clean end without ``[DONE]``) → ``upstream_error``; the
  client receives an SSE error event, then the end of the body — never a forged ``[DONE]``;
- the upstream goes quiet for ``idle_timeout_seconds`` → ``timeout``, the same error event;
- the client goes away → ``client_disconnect``, and ``on_client_gone`` is called at once (the
  handler frees the team's concurrency slot); with ``on_disconnect="cancel"`` (the default) the
  upstream connection is closed as soon as the upstream id is known (at once if it is; else
  after the first chunk, within ``drain_timeout_seconds``), so the cost is asked of
  ``/v1/generation`` and no more tokens are generated for nobody; with ``"drain"`` the upstream
  is read on (its bytes still tapped) for at most ``drain_timeout_seconds`` so the real usage
  arrives in the stream.

``on_upstream_id`` is called once, in the event-loop turn whose chunk revealed the upstream id,
so the ledger can make it durable before anything else happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import web

from .quotas.model import Outcome
from .redact import StreamScan
from .sse import UsageChunkFilter, UsageTap, sse_error_event
from .upstream import UpstreamResponse

__all__ = ["OpenStreams", "Outcome", "StreamResult", "relay_stream"]

_LOGGER: Final = logging.getLogger(__name__)
_STREAM_TERMINATOR: Final = b"\n\n"
"""Written before our error event: ends any partial upstream event (blank lines are no-ops)."""


class StreamResult:
    """What the relay learnt: the tap, the outcome and the time to first byte."""

    __slots__ = (
        "cut_at_bound",
        "cut_for_secret",
        "cut_for_shutdown",
        "first_byte_at",
        "outcome",
        "tap",
        "upstream_done_at",
    )

    def __init__(self, tap: UsageTap) -> None:
        self.tap: Final = tap
        self.outcome = Outcome.COMPLETED
        self.cut_for_shutdown = False
        """Set when shutdown's grace period ran out while this stream was open."""
        self.cut_at_bound = False
        """Set when the upstream wrote more than the output bound reserved for the request."""
        self.cut_for_secret = False
        """Set when a chunk quoted the gateway's Clipia key: it was not relayed, the stream cut."""
        self.first_byte_at: float | None = None
        self.upstream_done_at: float | None = None
        """perf_counter when the upstream body ended (or broke)."""


class OpenStreams:
    """The streams being relayed, so shutdown can end them cleanly at its deadline."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[UpstreamResponse, StreamResult]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, upstream: UpstreamResponse, result: StreamResult) -> int:
        """Register a stream; return the token for ``discard``."""
        token = id(result)
        self._open[token] = (upstream, result)
        return token

    def discard(self, token: int) -> None:
        """Forget a finished stream."""
        self._open.pop(token, None)

    def cut_all(self) -> int:
        """End every open stream: its relay writes an error event and returns; return how many.

        Closing the upstream response makes the relay's pending read fail, so the handler still
        finishes normally (error event, end of body, settlement) instead of being cancelled.
        """
        for upstream, result in list(self._open.values()):
            result.cut_for_shutdown = True
            upstream.close()
        return len(self._open)


async def relay_stream(
    request: web.Request,
    upstream: UpstreamResponse,
    *,
    headers: dict[str, str],
    drop_usage_chunk: bool,
    on_disconnect: str,
    drain_timeout: float,
    renew: Callable[[], None] | None = None,
    renew_every: float = 60.0,
    result: StreamResult | None = None,
    output_limit: int | None = None,
    on_upstream_id: Callable[[str], None] | None = None,
    on_client_gone: Callable[[], None] | None = None,
    scan: StreamScan | None = None,
) -> tuple[web.StreamResponse, StreamResult]:
    """Relay an upstream SSE body to the client; return the response and what was learnt.

    ``headers`` are the response headers to send (the caller built them from an allow-list).
    ``renew`` is called at most every ``renew_every`` seconds while bytes flow (it extends the
    request's reservation lease). Never raises for upstream or client failures: they become
    the result's ``outcome``. Pass ``result`` to read what was learnt even if this coroutine
    is cancelled half-way (shutdown). ``output_limit`` (completion tokens, all choices) is
    what the request reserved: an upstream counted past it (ignoring ``max_tokens``) is cut,
    outcome ``upstream_error``, with an SSE error event ``output_limit_exceeded``. ``scan``
    looks for the gateway's Clipia key in every chunk (the end of a read that could begin it
    waits for the next read): nothing of a quoted key is relayed and the stream is cut (outcome ``upstream_error``, SSE error ``upstream_invalid_response``).
    """
    response = web.StreamResponse(status=200, headers=headers)
    if result is None:
        result = StreamResult(UsageTap())
    tap = result.tap
    chunk_filter = UsageChunkFilter() if drop_usage_chunk else None
    content = upstream.content
    loop = asyncio.get_running_loop()
    client_alive = True
    drain_deadline: float | None = None
    next_renewal = loop.time() + renew_every
    cancel = on_disconnect != "drain"
    char_limit = 8 * (output_limit + 1) if output_limit is not None else 0

    def client_gone() -> bool:
        """Note the client left; return True when the upstream can be closed at once."""
        nonlocal client_alive, drain_deadline
        client_alive = False
        result.outcome = Outcome.CLIENT_DISCONNECT
        if on_client_gone is not None:
            on_client_gone()
        if cancel and tap.upstream_id is not None:
            upstream.close()
            return True
        # drain: read on for the usage; cancel: only until the upstream id is known.
        drain_deadline = loop.time() + drain_timeout
        return False

    try:
        await response.prepare(request)
    except ConnectionError:
        if client_gone():
            return response, result
    while True:
        try:
            if drain_deadline is None:
                chunk = await content.readany()
            else:
                async with asyncio.timeout_at(drain_deadline):
                    chunk = await content.readany()
        except TimeoutError:
            # aiohttp's sock_read (idle) timeout, or our drain deadline.
            if client_alive:
                result.outcome = Outcome.TIMEOUT
            upstream.close()
            break
        except aiohttp.ClientError:
            if client_alive:
                result.outcome = (
                    Outcome.TIMEOUT if result.cut_for_shutdown else Outcome.UPSTREAM_ERROR
                )
            break
        if not chunk:
            if result.cut_for_shutdown and client_alive:
                result.outcome = Outcome.TIMEOUT
            elif not tap.saw_done and client_alive:
                result.outcome = Outcome.UPSTREAM_ERROR
            break
        if result.first_byte_at is None:
            result.first_byte_at = time.perf_counter()
        tap.feed(chunk)
        if on_upstream_id is not None and tap.upstream_id is not None:
            on_upstream_id(tap.upstream_id)
            on_upstream_id = None
        if (
            output_limit is not None
            and (tap.content_chunks > output_limit or tap.content_chars >= char_limit)
            and not tap.saw_done
        ):  # tap.output_tokens_seen > output_limit, without the call per chunk
            # Past the bound reserved: relay this read (already written upstream), then cut.
            result.cut_at_bound = True
            upstream.close()
        if renew is not None and loop.time() >= next_renewal:
            next_renewal = loop.time() + renew_every
            renew()
        released = scan.feed(chunk) if scan is not None else chunk
        if released is None:
            result.cut_for_secret = True
            result.outcome = Outcome.UPSTREAM_ERROR
            upstream.close()
            break
        if not client_alive:
            if result.cut_at_bound:
                break
            if cancel and tap.upstream_id is not None:
                upstream.close()
                break
            continue
        out = chunk_filter.feed(released) if chunk_filter is not None else released
        try:
            if out:
                await response.write(out)
        except ConnectionError:
            if client_gone() or result.cut_at_bound:
                break
        if result.cut_at_bound:
            result.outcome = Outcome.UPSTREAM_ERROR
            break
    tap.close()
    result.upstream_done_at = time.perf_counter()
    if client_alive:
        await _finish(response, result, chunk_filter, scan.flush() if scan is not None else b"")
    return response, result


async def _finish(
    response: web.StreamResponse,
    result: StreamResult,
    chunk_filter: UsageChunkFilter | None,
    held: bytes = b"",
) -> None:
    """End the client's stream: flush held bytes, or an error event on failure; then EOF.

    ``held`` is what the key scan still held back (relayed only if the stream completed).
    """
    try:
        if result.outcome is Outcome.COMPLETED:
            if chunk_filter is not None:
                rest = chunk_filter.feed(held) + chunk_filter.flush()
                if rest:
                    await response.write(rest)
            elif held:
                await response.write(held)
        else:
            # Held-back bytes are an incomplete event: dropping them is safer than relaying a
            # fragment that would merge with the error event.
            if result.cut_for_secret:
                message = (
                    "The upstream stream quoted the gateway's own credentials; the rest was "
                    "withheld."
                )
                code = "upstream_invalid_response"
            elif result.cut_at_bound:
                message = (
                    "The upstream wrote more than the output this request reserved "
                    "(its max_tokens); the stream was cut."
                )
                code = "output_limit_exceeded"
            elif result.cut_for_shutdown:
                message = "The gateway is shutting down and its grace period ran out."
                code = "draining"
            elif result.outcome is Outcome.UPSTREAM_ERROR:
                message, code = "The upstream stream was interrupted.", "upstream_unavailable"
            else:
                message, code = "The upstream stream stalled and was cut.", "upstream_timeout"
            await response.write(
                _STREAM_TERMINATOR + sse_error_event(message, code=code, type_="api_error")
            )
        await response.write_eof()
    except ConnectionError:
        result.outcome = Outcome.CLIENT_DISCONNECT

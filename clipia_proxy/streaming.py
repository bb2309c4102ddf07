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

Those decisions live in :class:`~clipia_proxy.relay.Relay`, a state machine with no I/O; this
module is the loop that reads, writes and carries out its steps.

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
from .record import RequestInfo
from .redact import StreamScan
from .relay import CLOSE, READ, Relay, Step, StreamResult
from .sse import UsageTap
from .upstream import UpstreamResponse

__all__ = ["OpenStreams", "Outcome", "StreamResult", "relay_stream"]

_LOGGER: Final = logging.getLogger(__name__)


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
    record: RequestInfo,
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

    The I/O loop around :class:`~clipia_proxy.relay.Relay`, which decides every outcome.
    ``headers`` are the response headers to send (the caller built them from an allow-list).
    ``renew`` is called at most every ``renew_every`` seconds while bytes flow (it extends the
    request's reservation lease). Never raises for upstream or client failures: they become
    the ``outcome`` of ``record`` (the request's record). Pass ``result`` to read what was learnt even if this coroutine
    is cancelled half-way (shutdown). ``output_limit`` (completion tokens, all choices) is
    what the request reserved: an upstream counted past it (ignoring ``max_tokens``) is cut,
    outcome ``upstream_error``, with an SSE error event ``output_limit_exceeded``. ``scan``
    looks for the gateway's Clipia key in every chunk (the end of a read that could begin it
    waits for the next read): nothing of a quoted key is relayed and the stream is cut (outcome
    ``upstream_error``, SSE error ``upstream_invalid_response``).
    """
    response = web.StreamResponse(status=200, headers=headers)
    if result is None:
        result = StreamResult(UsageTap())
    relay = Relay(
        result,
        record,
        drop_usage_chunk=drop_usage_chunk,
        cancel_on_disconnect=on_disconnect != "drain",
        drain_timeout=drain_timeout,
        output_limit=output_limit,
        scan=scan,
    )
    tap, content = result.tap, upstream.content
    loop = asyncio.get_running_loop()
    next_renewal = loop.time() + renew_every

    def client_left() -> Step:
        step = relay.client_left(loop.time())
        if on_client_gone is not None:
            on_client_gone()  # the handler frees the team's concurrency slot at once
        return step

    received = relay.received  # the bound method, once (it runs for every chunk)
    step = READ
    try:
        await response.prepare(request)
    except ConnectionError:
        step = client_left()
    while step is READ:
        try:
            if relay.drain_deadline is None:
                chunk = await content.readany()
            else:
                async with asyncio.timeout_at(relay.drain_deadline):
                    chunk = await content.readany()
        except TimeoutError:  # aiohttp's sock_read (idle) timeout, or the drain deadline
            step = relay.timed_out()
            break
        except aiohttp.ClientError:
            step = relay.read_failed()
            break
        if not chunk:
            step = relay.ended()
            break
        if result.first_byte_at is None:
            result.first_byte_at = time.perf_counter()
        out, step = received(chunk)
        if on_upstream_id is not None and tap.upstream_id is not None:
            on_upstream_id(tap.upstream_id)  # this turn: the ledger makes it durable first
            on_upstream_id = None
        if step is CLOSE:
            upstream.close()  # before the (maybe slow) write of the chunk past the bound
        if renew is not None and loop.time() >= next_renewal:
            next_renewal = loop.time() + renew_every
            renew()
        if out:
            try:
                await response.write(out)
            except ConnectionError:
                step = client_left()
    if step is CLOSE:
        upstream.close()
    result.upstream_done_at = time.perf_counter()
    await _finish(response, relay)
    return response, result


async def _finish(response: web.StreamResponse, relay: Relay) -> None:
    """End the client's stream: the relay's last bytes (held bytes or an error event), EOF."""
    last = relay.finish()
    if last is None:  # the client is gone
        return
    try:
        if last:
            await response.write(last)
        await response.write_eof()
    except ConnectionError:
        relay.finish_failed()

"""The HTTP connection layer of both ports: deadlines, size caps, a connection cap, quiet logs.

aiohttp bounds each header line and the number of header lines, but not the request head as a
whole nor how long a client may take to send it; it answers malformed requests itself (plain
text that echoes the offending bytes) and logs a traceback for each. This module puts aiohttp's
public ``web.Server`` / ``web.RequestHandler`` behind subclasses that:

- close a connection whose request head is not complete ``header_timeout`` after the
  connection opened, or after the first byte that followed the previous answer (idle
  kept-alive connections are closed by aiohttp after ``keepalive_timeout``);
- answer 431 and close once a request head passes ``max_header_bytes`` in all (the bytes are
  never buffered past that);
- answer 503 ``overloaded`` and close a new connection while the port already holds
  ``max_connections`` (so file descriptors stay for the other port and the upstream);
- answer aiohttp's parser errors with the OpenAI envelope and an ``X-Request-Id``, never
  echoing the request's bytes, and close the connection;
- close a connection after answering a request whose body was never read (a refusal), once
  aiohttp's short lingering read has discarded what was in flight;
- log each kind of these events as one line per ``QuietLog`` interval, without a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import http
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong

from .errors import (
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    Overloaded,
    ProxyError,
    UnsupportedMediaType,
)
from .ids import new_request_id

__all__ = [
    "ConnectionLimits",
    "GatewayProtocol",
    "GatewayServer",
    "QuietLog",
    "install_accept_error_handler",
    "raw_error_response",
]

_LOGGER: Final = logging.getLogger(__name__)
_HEAD_END: Final = b"\r\n\r\n"
_LINGER_SECONDS: Final = 1.0
"""After a 431 or a 503 at the cap, how long the client's bytes are read and discarded."""

# Connection states, as far as this layer follows them.
_WAITING: Final = 0
"""No request being handled: the bytes that arrive are a request head (counted, timed)."""
_HEADED: Final = 1
"""A complete head was seen; aiohttp is about to hand it to the application."""
_BUSY: Final = 2
"""A request is being handled (its body is the handler's business)."""
_DRAINING: Final = 3
"""Answered without reading the body: aiohttp discards the rest, then the connection closes."""
_REFUSED: Final = 4
"""Over the connection cap: answered 503 and closing."""


class ConnectionLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one port allows each connection and how many connections it keeps open."""

    header_timeout: float
    keepalive_timeout: float
    max_header_bytes: int
    max_connections: int
    max_lingering: int = 0
    """Connections refused at the cap that may read out their request at once (they hold a
    descriptor for up to a second); past it they are closed at once."""


class QuietLog:
    """At most one warning per ``interval`` seconds for each kind of event, with a count.

    A hostile client (or a full file descriptor table) can cause these events thousands of
    times a second; one line per kind and interval keeps the log readable and cheap.
    """

    __slots__ = ("_clock", "_interval", "_last", "_logger", "_suppressed")

    def __init__(
        self,
        logger: logging.Logger = _LOGGER,
        *,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def event(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a ``kind`` line was logged less than an interval ago."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (and %d more like it since the last such line)"
            args = (*args, suppressed)
        self._logger.warning(message, *args)


def raw_error_response(error: ProxyError, request_id: str) -> bytes:
    """Return a whole HTTP/1.1 response for ``error`` (the envelope), closing the connection."""
    body = error.body()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "X-Request-Id": request_id,
        **error.headers(),
        "Connection": "close",
    }
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return head.encode("ascii") + b"\r\n" + body


def _parser_error(status: int, exc: BaseException | None) -> ProxyError:
    """The envelope for an error aiohttp found before the application ran (never its text)."""
    if isinstance(exc, LineTooLong):
        return HeadersTooLarge("A request header line is longer than this gateway accepts.")
    if isinstance(exc, ContentEncodingError):
        return UnsupportedMediaType("Compressed request bodies are not accepted.")
    if isinstance(exc, HttpProcessingError) and "headers" in exc.message.lower():
        return HeadersTooLarge("The request has more headers than this gateway accepts.")
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return InvalidRequest("The request is not valid HTTP and was not processed.")
    return InternalError("The request could not be served.")


class GatewayServer(web.Server):
    """aiohttp's low-level server for one port, making :class:`GatewayProtocol` connections.

    ``inner`` is the server an ``AppRunner`` built for the application (its public handler
    and request factory are reused); ``kwargs`` go to each ``RequestHandler``.
    """

    def __init__(
        self,
        inner: web.Server,
        limits: ConnectionLimits,
        *,
        name: str,
        log: QuietLog,
        on_refused: Callable[[], None] | None = None,
        on_dropped: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._make_app_request = inner.request_factory
        super().__init__(
            inner.request_handler,
            request_factory=self._make_request_of,
            handler_cancellation=inner.handler_cancellation,
            keepalive_timeout=limits.keepalive_timeout,
            **kwargs,
        )
        self._handler_kwargs = {"keepalive_timeout": limits.keepalive_timeout, **kwargs}
        self.limits: Final = limits
        self.name: Final = name
        self.log: Final = log
        self.open_connections = 0
        """Connections counted against ``limits.max_connections`` (refused ones are not)."""
        self.lingering = 0
        """Refused connections reading out the client's request before closing."""
        self.on_refused: Final = on_refused
        """Called for each connection refused at the cap (the metric)."""
        self.on_dropped: Final = on_dropped
        """Called for each connection closed without a request handled (``memtrim``)."""

    def _make_request_of(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        if isinstance(protocol, GatewayProtocol):
            protocol.head_received()
        request: web.BaseRequest = self._make_app_request(message, payload, protocol, writer, task)
        return request

    def __call__(self) -> web.RequestHandler:
        """Return the protocol for a new connection (asyncio's protocol factory)."""
        return GatewayProtocol(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class GatewayProtocol(web.RequestHandler):
    """One connection: aiohttp's request handler plus this module's deadlines and caps."""

    __slots__ = (
        "_gw_counted",
        "_gw_counted_lingering",
        "_gw_head_bytes",
        "_gw_served",
        "_gw_server",
        "_gw_state",
        "_gw_tail",
        "_gw_timer",
    )

    def __init__(self, manager: GatewayServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any):
        super().__init__(manager, loop=loop, **kwargs)
        self._gw_server = manager
        self._gw_state = _WAITING
        self._gw_head_bytes = 0
        self._gw_tail = b""
        self._gw_timer: asyncio.TimerHandle | None = None
        self._gw_counted = False
        self._gw_counted_lingering = False
        self._gw_served = False

    # -- asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection, or refuse it (503) when the port is at its cap."""
        super().connection_made(transport)
        server = self._gw_server
        if server.open_connections >= server.limits.max_connections:
            self._gw_state = _REFUSED
            if server.on_refused is not None:
                server.on_refused()
            server.log.event(
                f"{server.name}-cap",
                "%s port: %d connections open (its cap): new connections get 503 and are closed",
                server.name,
                server.open_connections,
            )
            error = Overloaded(
                "The gateway has too many open connections; retry shortly.", retry_after=1
            )
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(raw_error_response(error, new_request_id()))
            if server.lingering < server.limits.max_lingering and self._gw_linger():
                # Read (and drop) the request the client already sent, so that closing does
                # not reset the connection before the 503 is read.
                server.lingering += 1
                self._gw_counted_lingering = True
                return
            self.force_close()
            return
        server.open_connections += 1
        self._gw_counted = True
        self._gw_arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Uncount the connection and stop its timer."""
        if self._gw_counted:
            self._gw_counted = False
            self._gw_server.open_connections -= 1
        if self._gw_counted_lingering:
            self._gw_counted_lingering = False
            self._gw_server.lingering -= 1
        self._gw_disarm()
        super().connection_lost(exc)
        if not self._gw_served and self._gw_server.on_dropped is not None:
            self._gw_server.on_dropped()

    def data_received(self, data: bytes) -> None:
        """Time and measure a request head while one is arriving, then hand the bytes on."""
        if self._gw_state == _WAITING:
            if not self._gw_scan(data):
                return
            if self._gw_state == _WAITING and self._gw_timer is None:
                # The head goes on past this read: its deadline runs from now. (A head whole
                # in one read, the usual case, needs no timer.)
                self._gw_arm()
        elif self._gw_state == _REFUSED:
            return
        super().data_received(data)

    # -- aiohttp hooks (public methods of web.RequestHandler)

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """Send the answer (aiohttp's own coroutine); close after it when the body was never read.

        Not a coroutine of its own: the request is over for this layer once the answer is
        handed to aiohttp, so the next request's head is counted and timed from here (the
        bytes of a pipelined one may arrive while this answer is written).
        """
        body_read = request.content.is_eof()
        if not body_read and not resp.prepared:
            resp.force_close()
        if self._gw_state == _BUSY:
            self._gw_state = _WAITING if body_read else _DRAINING
            self._gw_head_bytes = 0
            self._gw_tail = b""
        return super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer what aiohttp could not process with the envelope; never echo its bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        error = _parser_error(status, exc)
        server = self._gw_server
        if isinstance(exc, HttpProcessingError):
            server.log.event(
                f"{server.name}-malformed",
                "%s port: refused a malformed request (%s, answered %d)",
                server.name,
                type(exc).__name__,
                error.status,
            )
        elif error.status >= 500:
            _LOGGER.error("error serving a request", exc_info=exc)
        response = web.Response(
            status=error.status,
            body=error.body(),
            content_type="application/json",
            headers={**error.headers(), "X-Request-Id": new_request_id()},
        )
        response.force_close()
        return response

    # -- called by GatewayServer's request factory

    def head_received(self) -> None:
        """A request head was parsed and is about to be handled: its deadline no longer runs."""
        self._gw_state = _BUSY
        self._gw_served = True
        self._gw_disarm()

    # -- internals

    def _gw_scan(self, data: bytes) -> bool:
        """Count head bytes up to the end of the head; on overflow answer 431 and close."""
        end = data.find(_HEAD_END)
        if end >= 0:
            end += len(_HEAD_END)
        tail = self._gw_tail
        if tail:
            # The end of the head may straddle two reads.
            straddle = (tail + data[:3]).find(_HEAD_END)
            if straddle >= 0:
                end = straddle + len(_HEAD_END) - len(tail)
        limit = self._gw_server.limits.max_header_bytes
        if end >= 0:
            if self._gw_head_bytes + end > limit:
                return self._gw_overflow()
            self._gw_state = _HEADED
            self._gw_head_bytes = 0
            self._gw_tail = b""
            return True
        self._gw_head_bytes += len(data)
        if self._gw_head_bytes > limit:
            return self._gw_overflow()
        self._gw_tail = (tail + data[-3:])[-3:]
        return True

    def _gw_overflow(self) -> bool:
        server = self._gw_server
        server.log.event(
            f"{server.name}-head-size",
            "%s port: refused a request head over %d bytes",
            server.name,
            server.limits.max_header_bytes,
        )
        self._gw_state = _REFUSED
        self._gw_disarm()
        transport = self.transport
        if transport is None:
            return False
        error = HeadersTooLarge(
            f"The request head is larger than this gateway's limit of "
            f"{server.limits.max_header_bytes} bytes."
        )
        transport.write(raw_error_response(error, new_request_id()))
        if not self._gw_linger():
            self.force_close()
        return False

    def _gw_linger(self) -> bool:
        """End our side, drop what still arrives, close after a short linger; False if not TCP.

        Closing with the client's bytes unread would reset the connection, and the client
        would lose the answer just written.
        """
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            return False
        transport.write_eof()
        self._gw_timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, self.force_close)
        return True

    def _gw_arm(self) -> None:
        if self._gw_timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self._gw_timer = loop.call_later(self._gw_server.limits.header_timeout, self._gw_expire)

    def _gw_disarm(self) -> None:
        if self._gw_timer is not None:
            self._gw_timer.cancel()
            self._gw_timer = None

    def _gw_expire(self) -> None:
        self._gw_timer = None
        if self._gw_state != _WAITING:
            return
        server = self._gw_server
        server.log.event(
            f"{server.name}-header-timeout",
            "%s port: closed a connection that sent no complete request head within %gs",
            server.name,
            server.limits.header_timeout,
        )
        self.force_close()


_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def install_accept_error_handler(loop: asyncio.AbstractEventLoop, log: QuietLog) -> None:
    """Log failed accepts (out of file descriptors, memory) as one quiet line, no traceback.

    asyncio and uvloop report each failed ``accept()`` to the loop's exception handler with a
    traceback; at the file descriptor limit that is thousands of lines a second. Other
    contexts go to the handler that was installed before (or the loop's default).
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            log.event(
                "accept",
                "accepting connections failed: %s (the process is out of file descriptors "
                "or memory; raise the limit or lower server.max_connections)",
                errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

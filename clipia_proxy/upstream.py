"""UpstreamClient: the one pooled HTTP session to Clipia, its timeouts, headers and retries.

Owns everything about talking to the upstream and never anything about teams or money:

- one pool of keep-alive HTTP/1.1 connections for the application's life (aiohttp's own
  response protocol and parser on each, without ``ClientSession``'s per-request machinery:
  the gateway sends one kind of request to one host); no total timeout (it would cut long
  streams): connect, first-byte and idle (between reads) timeouts only;
- outbound headers from an allow-list built here, never copied from the client: our Clipia key,
  ``Content-Type``, ``Accept``, ``Accept-Encoding: identity`` and ``X-Request-Id``;
- redirects are never followed (a 3xx is a 502: Clipia does not redirect API calls, and
  following one could send our key elsewhere);
- retries only before any byte reached the client: connect failures, and 429/5xx answers,
  honouring ``Retry-After`` up to ``max_retry_wait_seconds``, at most ``retries`` times;
- a 401/403 from Clipia means it rejected *our* key: a 502 for the client, whose body never
  includes Clipia's (it may quote the key), and an error log line for the operator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.utils
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Protocol

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from .config import Secret, UpstreamConfig
from .errors import UpstreamTimeout, UpstreamUnavailable
from .version import __version__

__all__ = [
    "UpstreamBusy",
    "UpstreamClient",
    "UpstreamNotSent",
    "UpstreamRefused",
    "UpstreamResponse",
    "parse_retry_after",
    "read_body",
]


class UpstreamNotSent(UpstreamUnavailable):
    """Raised when Clipia could not be reached at all: it certainly received nothing."""


class UpstreamBusy(UpstreamNotSent):
    """Raised when every pooled connection stayed busy for the connect timeout: not sent."""


class UpstreamRefused(UpstreamUnavailable):
    """Raised when Clipia answered a redirect or rejected our key: nothing was billed."""

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status: Final = upstream_status


_LOGGER: Final = logging.getLogger(__name__)
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504, 529})
_BACKOFF_BASE_SECONDS: Final = 0.1
_KEY_REJECTED: Final = frozenset({401, 403})


class _HasContent(Protocol):
    @property
    def content(self) -> StreamReader: ...


async def read_body(response: _HasContent, limit: int) -> bytes:
    """Read a response body to its end, but never more than ``limit`` + 1 bytes.

    A result longer than ``limit`` means the body was larger (the rest is left unread).
    ``StreamReader.read(n)`` alone returns whatever has arrived, not the whole body.
    """
    content = response.content
    if content.is_eof():  # the whole body arrived with the headers (the common case)
        data = content.read_nowait()
        return data[: limit + 1]
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds a ``Retry-After`` value asks for (delta-seconds or HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²".isdigit() is true, but float("²") raises
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": an HTTP date is always UTC, never local time
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


_KEEPALIVE_SECONDS: Final = 15.0
"""An idle pooled connection older than this is closed rather than reused (servers close
idle keep-alive connections; reusing one they are closing fails the request)."""
_READ_BUFSIZE: Final = 2**16
_MAX_LINE: Final = 8190
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


class _ConnectFailed(Exception):
    """A new connection to Clipia could not be opened: nothing was sent."""


class _PoolBusy(Exception):
    """Every connection stayed busy (``limit`` open) for the whole wait: nothing was sent."""


class _Protocol(ResponseHandler):
    """aiohttp's response protocol with a lazy read timer.

    aiohttp restarts its socket-read timer on every chunk received (a timer cancelled and
    created per chunk: per SSE event, on a stream). Here a restart only notes the time; one
    watchdog timer wakes at the earliest possible deadline and either fires the timeout or
    sleeps again until the new deadline. Same deadlines, one timer per quiet period.

    Stopping the timeout (the answer is complete) does not cancel the watchdog either: it
    wakes, finds nothing to watch and ends, or finds the next request on the connection and
    watches it. Back-to-back requests on a kept-alive connection so share one timer instead
    of making and cancelling one each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._last_read = 0.0
        self._watching = False
        """A read is being timed (between ``start_timeout`` and the end of the answer)."""
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        now = self._loop.time()
        self._last_read = now
        self._watching = bool(timeout)
        if not timeout:
            return
        deadline = now + timeout
        if self._watch is None or self._watch_at > deadline:  # none yet, or a later one
            self._unwatch()
            self._arm(deadline)

    def _drop_timeout(self) -> None:
        super()._drop_timeout()
        self._watching = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._unwatch()
        super().connection_lost(exc)

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _on_watch(self) -> None:
        self._watch = None
        timeout = self._read_timeout
        if not self._watching or not timeout:
            return
        deadline = self._last_read + timeout
        if self._loop.time() >= deadline:
            self._on_read_timeout()
        else:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        self._watch_at = deadline
        self._watch = self._loop.call_at(deadline, self._on_watch)


class UpstreamResponse:
    """Clipia's answer, at its headers: ``status``, ``headers``, and the body in ``content``.

    ``release`` (always, once done) returns the connection to the pool when the body was read
    to its end, else closes it; ``close`` drops the connection at once and fails a pending read
    of the body (shutdown ends open streams this way).
    """

    __slots__ = ("_pool", "_protocol", "content", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        pool: _Pool,
        protocol: ResponseHandler,
    ) -> None:
        self.status: Final = status
        self.headers: Final = headers
        self.content: Final = content
        self._pool = pool
        self._protocol: ResponseHandler | None = protocol

    def release(self) -> None:
        """Give the connection back (reused only if the body was read to its end)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            self._pool.release(protocol)

    def close(self) -> None:
        """Close the connection now; a read of the body waiting on it fails."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        content = self.content
        if content.exception() is None and not content.is_eof():
            content.set_exception(aiohttp.ClientConnectionError("Connection closed"))
        self._pool.drop(protocol)


class _Pool:
    """Keep-alive connections to one host: reused last-in first-out, at most ``limit`` open.

    A request that finds every connection busy waits for one (first come, first served), for
    the connect timeout at most: an overloaded gateway refuses rather than queueing without end.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
    ) -> None:
        self._loop = loop
        self._host = host
        self._port = port
        self._tls = tls
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._idle: list[tuple[ResponseHandler, float]] = []
        self._open = 0
        """Connections open or being opened, idle ones included."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def acquire(self) -> ResponseHandler:
        """Return a connected protocol, reused or new; raise ``_ConnectFailed``, ``_PoolBusy``."""
        deadline: float | None = None
        while True:
            if self._closed:
                raise _ConnectFailed("the upstream client is closed")
            idle = self._idle
            while idle:
                protocol, since = idle.pop()
                if (
                    protocol.is_connected()
                    and not protocol.should_close
                    and self._loop.time() - since < _KEEPALIVE_SECONDS
                ):
                    return protocol
                self.drop(protocol)
            if self._open < self._limit:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            if deadline is None:
                deadline = self._loop.time() + self._connect_timeout
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled or out of time: pass the turn on
                else:
                    with contextlib.suppress(ValueError):  # a wake may have dropped it already
                        self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise _PoolBusy from None
                raise

    async def _connect(self) -> ResponseHandler:
        loop = self._loop
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(loop),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:  # refused, unreachable, DNS, TLS, timed out
            raise _ConnectFailed(exc.__class__.__name__) from exc
        return protocol

    def release(self, protocol: ResponseHandler) -> None:
        """Keep a connection whose last answer was read to its end; close any other."""
        if self._closed or protocol.should_close or not protocol.is_connected():
            self.drop(protocol)
            return
        self._idle.append((protocol, self._loop.time()))
        self._wake()

    def drop(self, protocol: ResponseHandler) -> None:
        """Close a connection and free its place."""
        protocol.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for protocol, _ in idle:
            self.drop(protocol)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it wakes, sees the pool closed, and fails


class UpstreamClient:
    """Send requests to Clipia over one pool of keep-alive connections.

    ``send`` returns the upstream response once its headers arrived (status 2xx, or an error
    about the request that the caller passes through); the caller must release it.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        api_key: Secret,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_attempt: Callable[[str], None] = lambda _code: None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._config = config
        self._tls = tls
        """For an https base URL: the TLS context (default: the system's CAs, verified)."""
        self._on_attempt = on_attempt
        """Told of every attempt: the upstream status, or ``connect_error``/``timeout``/``error``."""
        self._sleep = sleep
        base = URL(config.base_url.rstrip("/"))
        assert base.scheme in _DEFAULT_PORTS
        assert base.raw_host
        self._base = base
        self._prefix = base.raw_path.rstrip("/")
        host = base.raw_host
        host_header = f"[{host}]" if ":" in host else host
        if base.port is not None and base.port != _DEFAULT_PORTS[base.scheme]:
            host_header = f"{host_header}:{base.port}"
        # Built once; every request adds only its request line, id, Accept and length.
        self._fixed_headers: Final = (
            f"Host: {host_header}\r\n"
            f"Authorization: Bearer {api_key.reveal()}\r\n"
            "Accept-Encoding: identity\r\n"
            f"User-Agent: clipia-proxy/{__version__}\r\n"
        )
        self._key_bytes: Final = api_key.reveal().encode()
        self._pool: _Pool | None = None

    async def start(self) -> None:
        """Open the pool (connections are made on first use)."""
        base = self._base
        tls = None
        if base.scheme == "https":
            tls = self._tls or ssl.create_default_context()
        self._pool = _Pool(
            asyncio.get_running_loop(),
            host=base.raw_host or "",
            port=base.port or _DEFAULT_PORTS[base.scheme],
            tls=tls,
            limit=self._config.max_connections,
            connect_timeout=self._config.connect_timeout_seconds,
        )

    async def close(self) -> None:
        """Close the pool's connections."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def mentions_key(self, data: bytes) -> bool:
        """Return whether ``data`` contains our Clipia key (then it must never be relayed)."""
        return bool(self._key_bytes) and self._key_bytes in data

    def _head(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        request_id: str,
        accept: str,
        body: bytes | None,
    ) -> bytes:
        target = self._prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        head = (
            f"{method} {target} HTTP/1.1\r\n{self._fixed_headers}"
            f"X-Request-Id: {request_id}\r\nAccept: {accept}\r\n"
        )
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return (head + "\r\n").encode("latin-1")

    async def send(
        self,
        method: str,
        path: str,
        *,
        request_id: str,
        body: bytes | None = None,
        query: Mapping[str, str] | None = None,
        accept: str = "application/json",
    ) -> UpstreamResponse:
        """Send one request (with bounded retries) and return the response at its headers.

        Raises :class:`UpstreamUnavailable` (502) when Clipia cannot be reached, redirects, or
        rejects our key; :class:`UpstreamTimeout` (504) when no first byte arrives in time.
        A 429/5xx after the last retry is returned for the caller to pass through.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("UpstreamClient is not started")
        head = self._head(method, path, query, request_id, accept, body)
        attempts = 1 + self._config.retries
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                protocol = await pool.acquire()
            except _PoolBusy:
                # Waiting longer would only queue without end; nothing reached Clipia.
                _LOGGER.warning(
                    "all %d upstream connections stayed busy for %.1fs; request not sent",
                    self._config.max_connections,
                    self._config.connect_timeout_seconds,
                )
                raise UpstreamBusy(
                    f"All {self._config.max_connections} connections to the upstream AI gateway "
                    "are busy; the request was not sent. Retry shortly.",
                    retry_after=1,
                ) from None
            except _ConnectFailed as exc:
                self._on_attempt("connect_error")
                # Nothing reached Clipia: safe to try again.
                if last:
                    _LOGGER.warning("upstream unreachable: %s", exc)
                    raise UpstreamNotSent("The upstream AI gateway cannot be reached.") from exc
                await self._sleep(_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
                continue
            response = await self._exchange(pool, protocol, head, body)
            status = response.status
            self._on_attempt(str(status))
            if 300 <= status < 400:
                response.release()
                _LOGGER.error("upstream answered a redirect (%d); not followed", status)
                raise UpstreamRefused(
                    "The upstream AI gateway answered with a redirect.", upstream_status=status
                )
            if status in _KEY_REJECTED:
                response.release()
                _LOGGER.error(
                    "upstream rejected the gateway's Clipia key (status %d); check the key",
                    status,
                )
                raise UpstreamRefused(
                    "The upstream AI gateway refused this gateway's credentials.",
                    upstream_status=status,
                )
            if status in _RETRY_STATUSES and not last:
                wait = parse_retry_after(response.headers.get("Retry-After"))
                if wait is None:
                    wait = _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
                if wait <= self._config.max_retry_wait_seconds:
                    response.release()
                    _LOGGER.info("upstream %d, retry %d in %.2fs", status, attempt, wait)
                    await self._sleep(wait)
                    continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(
        self, pool: _Pool, protocol: ResponseHandler, head: bytes, body: bytes | None
    ) -> UpstreamResponse:
        """Write one request on ``protocol`` and wait for the answer's headers."""
        config = self._config
        # Until the headers arrive the socket read timeout is the first-byte timeout; the
        # timer starts once the request is written, so it measures Clipia's first byte.
        protocol.set_response_params(
            read_until_eof=True,
            auto_decompress=True,
            read_timeout=config.first_byte_timeout_seconds,
            read_bufsize=_READ_BUFSIZE,
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
        )
        try:
            transport = protocol.transport
            if transport is None:
                raise aiohttp.ServerDisconnectedError  # noqa: TRY301 - mapped just below
            transport.write(head + body if body is not None else head)
            protocol.start_timeout()
            while True:
                message, payload = await protocol.read()
                # 1xx interim answers (never 101: no upgrade was asked) precede the real one.
                if not 100 <= message.code < 200 or message.code == 101:
                    break
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            pool.drop(protocol)
            self._on_attempt("timeout")
            raise UpstreamTimeout(
                "The upstream AI gateway did not start answering in time."
            ) from exc
        except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:
            pool.drop(protocol)
            self._on_attempt("error")
            # The request may have reached Clipia; never retried.
            _LOGGER.warning("upstream request failed: %s", exc.__class__.__name__)
            raise UpstreamUnavailable("The upstream AI gateway closed the connection.") from exc
        except BaseException:
            pool.drop(protocol)  # cancelled mid-exchange: the connection's state is unknown
            raise
        if not payload.is_eof():
            # The idle timeout governs the body only: it must not cut the first-byte wait.
            protocol.read_timeout = config.idle_timeout_seconds
            protocol.start_timeout()
        return UpstreamResponse(message.code, message.headers, payload, pool, protocol)

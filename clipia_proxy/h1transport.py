"""H1Transport: the default upstream transport — HTTP/1.1 keep-alive over asyncio, httptools.

A :class:`~clipia_proxy.upstream.Transport` built on public APIs only: asyncio's
``loop.create_connection`` (happy eyeballs), ``loop.start_tls`` (an https upstream behind an
egress proxy's ``CONNECT`` tunnel) and ``asyncio.Protocol``, with the ``httptools`` response
parser (llhttp, the parser Node.js uses). It exists for speed: ``aiohttp.ClientSession``
builds a request object, a payload, a writer task, a response object and a timer context per
request, which cost ~0.1 ms of CPU per upstream call — a third of the core gateway's whole
cost per request. This transport writes the request head as one string and parses the answer
with callbacks; it keeps what the gateway relies on:

- a pool of keep-alive connections, at most ``max_connections`` requests in flight; one more
  waits for a free slot for the connect timeout at most, then :class:`ConnectionsBusy`;
  an idle connection older than the keep-alive time, closed by the server, or whose answer
  was not read to its end is never reused;
- the connect timeout; the first-byte timeout (from the request handed to the transport to
  the answer's headers; one timer per request, cancelled at the headers); the idle timeout
  between reads of the body (the shared lazy watchdog: one timer per quiet period);
- failures classified as the interface says: nothing sent (connect, DNS, TLS, the proxy
  refused the tunnel: :class:`NotSent`, retried), first byte late (:class:`FirstByteTimeout`),
  or the exchange broke after the request may have arrived (:class:`ExchangeFailed`, never
  retried). A GET on a kept-alive connection the server closed before answering anything is
  sent again once (as aiohttp does: it is idempotent);
- 1xx interim answers skipped; a body until the connection ends when the answer has neither
  ``Content-Length`` nor chunked encoding; bodies relayed as received (we ask for
  ``identity``, as the aiohttp transport does); back-pressure: reading pauses while 64 KiB
  wait unread;
- the egress proxy as :class:`~clipia_proxy.upstream.AiohttpTransport` has it: ``CONNECT``
  for https (credentials as ``Proxy-Authorization``), absolute-form requests for http.

Errors raised by the body are aiohttp's public exception classes (``ClientPayloadError``,
``ServerDisconnectedError``, ``SocketTimeoutError``), as the callers and the other transport
expect.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Final, cast

import aiohappyeyeballs
import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import transport as _settings
from .config import UpstreamConfig
from .transport import (
    DNS_CACHE_SECONDS,
    HAPPY_EYEBALLS_DELAY,
    ExchangeFailed,
    FirstByteTimeout,
    IdleWatch,
    NotSent,
    UpstreamRequest,
    UpstreamResponse,
    acquire_slot,
    resolve_proxy,
)

__all__ = ["H1Transport"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_HIGH_WATER: Final = 64 * 1024
"""Unread body bytes above which reading from the socket pauses (back-pressure)."""
_MAX_HEAD: Final = 64 * 1024
"""Longest answer head (status line and headers) accepted."""


class _Connection(asyncio.Protocol):
    """One connection to the upstream: writes requests, parses the answers with httptools."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.used = False
        """Whether an answer was read on this connection before (a kept-alive one)."""
        self.received = False
        """Whether any byte of the current exchange's answer arrived."""
        self.head_waiter: asyncio.Future[None] | None = None
        self.body: _Body | None = None
        self.status = 0
        self.header_list: list[tuple[bytes, bytes]] = []
        self.headers: CIMultiDict[str] = CIMultiDict()
        """The current answer's headers, once complete."""
        self.head_size = 0
        """Bytes of earlier reads while the current answer's head is incomplete."""
        self.read_size = 0
        """Bytes of the read being parsed."""
        self.keep_alive = False
        self.until_eof = False
        self.complete = False
        self.paused = False

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.head_waiter is None and self.body is None:
            self.close()  # bytes nobody asked for: the connection's state is unknown
            return
        self.received = True
        self.read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(aiohttp.ClientResponseError)
            return
        except httptools.HttpParserError as exc:
            self._fail(exc)
            return
        if self.head_waiter is not None:  # the head is still incomplete: all of it was head
            self.head_size += self.read_size
            if self.head_size > _MAX_HEAD:
                self._fail(httptools.HttpParserError("answer head too large"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        body = self.body
        if exc is None and body is not None and self.until_eof and self.head_waiter is None:
            body.feed_eof()  # the body ran until the connection ended: that is its end
            self.complete = True
            return
        self._fail(exc)

    def pause_writing(self) -> None:
        """Large request bodies are written whole: the transport buffers them."""

    def resume_writing(self) -> None:
        """See :meth:`pause_writing`."""

    # httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.header_list = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_list.append((name, value))  # the head's size is checked per read

    def on_headers_complete(self) -> None:
        # The head's size is at most the earlier reads' and this one's: counted only then.
        if self.head_size + self.read_size > _MAX_HEAD and _size(self.header_list) > _MAX_HEAD:
            raise httptools.HttpParserError("answer head too large")
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer: the real one follows
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers = headers = CIMultiDict(  # case-insensitive look-ups
            [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.header_list]
        )
        self.until_eof = (
            "content-length" not in headers
            and "transfer-encoding" not in headers
            and status not in (204, 304)
        )
        self.body = _Body(self)
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, data: bytes) -> None:
        body = self.body
        if body is not None and data:
            body.feed(data)

    def on_message_complete(self) -> None:
        if self.head_waiter is not None:
            return  # the end of an interim answer
        self.complete = True
        if self.body is not None:
            self.body.feed_eof()

    # the pool's side ---------------------------------------------------------------------

    def begin(self) -> asyncio.Future[None]:
        """Start an exchange: return the future the answer's headers will complete."""
        self.head_waiter = waiter = self.loop.create_future()
        self.body = None
        self.received = False
        self.complete = False
        self.status = 0
        self.head_size = 0
        return waiter

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def _fail(self, exc: BaseException | type[BaseException] | None) -> None:
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(_HeadFailed(exc, self.received))
        body = self.body
        if body is not None and not body.eof:
            body.fail(
                aiohttp.ClientPayloadError("Response payload is not completed")
                if exc is None or isinstance(exc, httptools.HttpParserError | OSError)
                else aiohttp.ClientConnectionError(str(exc))
            )
        self.close()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


class _HeadFailed(Exception):
    """The connection broke (or the answer was malformed) before the answer's headers."""

    def __init__(self, cause: BaseException | type[BaseException] | None, received: bool) -> None:
        super().__init__(cause.__name__ if isinstance(cause, type) else repr(cause))
        self.received = received


class _Body(IdleWatch):
    """The answer's body as it arrives: buffered, with the idle watchdog and the release."""

    __slots__ = (
        "_chunks",
        "_connection",
        "_error",
        "_pool",
        "_size",
        "_waiter",
        "eof",
    )

    def __init__(self, connection: _Connection) -> None:
        super().__init__(connection.loop)
        self._connection = connection
        self._pool: _Pool | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.eof = False

    def attach(self, pool: _Pool, idle: float) -> None:
        self._pool = pool
        self.idle = idle

    # fed by the connection ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # the Body interface ------------------------------------------------------------------

    def is_eof(self) -> bool:
        return self.eof

    def read_nowait(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            if self._error is not None and not self.eof:
                raise self._error
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._connection.resume()
        return data

    async def readany(self) -> bytes:
        data = self.read_nowait()  # raises what broke the connection, if anything did
        if data or self.eof:
            return data
        if self.done:
            raise aiohttp.ClientConnectionError("Connection closed")
        self.waiting_since()
        try:
            self._waiter = waiter = self.loop.create_future()
            await waiter
        finally:
            self.waiting = False
            self._waiter = None
        if self.timed_out:
            raise aiohttp.SocketTimeoutError("The upstream stayed silent too long")
        return self.read_nowait()

    def on_idle_timeout(self) -> None:
        self.fail(aiohttp.SocketTimeoutError("The upstream stayed silent too long"))
        self._connection.close()

    def release(self) -> None:
        if self.finish():
            connection = self._connection
            pool = self._pool
            if pool is not None:
                pool.give_back(connection, self.eof and connection.reusable())

    def close(self) -> None:
        if self.finish():
            self.fail(aiohttp.ClientConnectionError("Connection closed"))
            self._connection.close()
            if self._pool is not None:
                self._pool.give_back(self._connection, False)


class _Pool:
    """Keep-alive connections to one origin (or through one proxy), and the in-flight slots."""

    def __init__(self, transport: H1Transport) -> None:
        self.owner = transport
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(transport.config.max_connections)

    def take(self, now: float) -> _Connection | None:
        idle = self.idle
        keepalive = _settings.KEEPALIVE_SECONDS  # read late: tests shorten it
        while idle:
            connection = idle.pop()
            if not connection.lost and now - connection.idle_since < keepalive:
                return connection
            connection.close()
        return None

    def give_back(self, connection: _Connection, reusable: bool) -> None:
        self.slots.release()
        if reusable and not self.owner.closed:
            connection.used = True
            connection.idle_since = connection.loop.time()
            connection.body = None
            self.idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class _Tunnel(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT`` (until the end of its head)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.buffer = b""
        self.done: asyncio.Future[bytes] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            self.done.set_result(self.buffer[:end])
        elif len(self.buffer) > _MAX_HEAD and not self.done.done():
            self.done.set_exception(OSError("the proxy's answer to CONNECT is too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(OSError(f"the proxy closed the tunnel: {exc!r}"))


class H1Transport:
    """The default transport: HTTP/1.1 keep-alive connections parsed by httptools."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        tls: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._tls = tls
        self._environ = environ
        base = URL(config.base_url)
        self._scheme = base.scheme
        self._host = base.raw_host or ""
        self._port = base.port or _DEFAULT_PORTS.get(base.scheme, 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if base.port is not None and base.port != _DEFAULT_PORTS.get(base.scheme):
            host = f"{host}:{base.port}"
        self._host_header = host
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        self._pool: _Pool | None = None
        self._dns: dict[tuple[str, int], tuple[float, Sequence[aiohappyeyeballs.AddrInfoType]]] = {}
        """(host, port) -> (expiry, addresses): DNS asked once per ``DNS_CACHE_SECONDS``."""
        self._users = 0
        self.closed = True

    @property
    def proxy(self) -> URL | None:
        """The egress proxy in use (known once started), or None for direct connections."""
        return self._proxy

    async def start(self) -> None:
        """Settle the proxy and the TLS context (connections are made on first use).

        Clients sharing this transport each start and close it: the last close closes it.
        """
        self._users += 1
        if self._pool is not None:
            return
        self._proxy, self._proxy_headers = resolve_proxy(self.config, self._environ)
        if self._tls is None and self._scheme == "https":
            # The system's CAs (SSL_CERT_FILE / SSL_CERT_DIR honoured), read off the loop.
            self._tls = await asyncio.to_thread(ssl.create_default_context)
        self._pool = _Pool(self)
        self.closed = False

    async def close(self) -> None:
        """Close every connection (once the last user closes the transport)."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._pool is not None:
            self.closed = True
            self._pool.close()
            self._pool = None

    def _head(self, request: UpstreamRequest) -> bytes:
        url = request.url
        target = url.raw_path_qs
        if self._proxy is not None and self._scheme == "http":
            target = f"http://{self._host_header}{target}"  # absolute-form, for the proxy
        lines = [f"{request.method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        headers = request.headers
        values = "".join(headers.values())
        if "\r" in values or "\n" in values or "\x00" in values:  # would end the line early
            raise ValueError("a header value holds a line break")
        lines.append("".join([f"{name}: {value}\r\n" for name, value in headers.items()]))
        if self._proxy is not None and self._scheme == "http" and self._proxy_headers:
            lines.extend(f"{name}: {value}\r\n" for name, value in self._proxy_headers.items())
        body = request.body
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _socket(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
        """Connect a socket to ``host``: a cached DNS answer, then happy eyeballs (RFC 8305)."""
        key = (host, port)
        now = loop.time()
        expiry, infos = self._dns.get(key, (0.0, ()))
        if expiry < now:
            if _is_ip(host):  # no lookup: no trip to the executor's thread
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )
            else:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            self._dns[key] = (now + DNS_CACHE_SECONDS, infos)
        try:
            return await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
            )
        except OSError:
            self._dns.pop(key, None)  # the next attempt asks DNS again
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        connection = _Connection(loop)
        proxy = self._proxy
        tls = self._tls if self._scheme == "https" else None
        try:
            async with asyncio.timeout(self.config.connect_timeout_seconds):
                if proxy is None:
                    sock = await self._socket(loop, self._host, self._port)
                    await loop.create_connection(
                        lambda: connection,
                        sock=sock,
                        ssl=tls,
                        server_hostname=self._host if tls is not None else None,
                    )
                elif tls is None:
                    sock = await self._socket(loop, proxy.raw_host or "", proxy.port or 80)
                    await loop.create_connection(lambda: connection, sock=sock)
                else:
                    await self._tunnel(loop, connection, proxy, tls)
        except (OSError, TimeoutError) as exc:  # refused, unreachable, DNS, TLS, the proxy
            connection.close()
            raise NotSent(exc.__class__.__name__) from exc
        return connection

    async def _tunnel(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: _Connection,
        proxy: URL,
        tls: ssl.SSLContext,
    ) -> None:
        """Open a ``CONNECT`` tunnel through ``proxy`` and start TLS inside it."""
        sock = await self._socket(loop, proxy.raw_host or "", proxy.port or 80)
        raw, tunnel = await loop.create_connection(lambda: _Tunnel(loop), sock=sock)
        try:
            host = f"[{self._host}]" if ":" in self._host else self._host
            authority = f"{host}:{self._port}"
            extra = "".join(f"{n}: {v}\r\n" for n, v in (self._proxy_headers or {}).items())
            raw.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode())
            head = await tunnel.done
            _check_tunnel(head)
            secured = await loop.start_tls(raw, connection, tls, server_hostname=self._host)
        except BaseException:
            raw.close()
            raise
        if secured is None:  # pragma: no cover - only a closing transport answers None
            raise OSError("the tunnel closed during the TLS handshake")
        connection.connection_made(secured)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request`` on a pooled connection; return the answer at its headers."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the upstream transport is not started")
        slots = pool.slots
        await acquire_slot(slots, self.config.connect_timeout_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.first_byte_timeout
        try:
            connection = await self._exchange(loop, pool, request, deadline)
        except BaseException:
            slots.release()
            raise
        body = connection.body
        assert body is not None
        headers = CIMultiDictProxy(connection.headers)
        body.attach(pool, self.config.idle_timeout_seconds)
        return UpstreamResponse(connection.status, headers, body)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: _Pool,
        request: UpstreamRequest,
        deadline: float,
    ) -> _Connection:
        """Write ``request`` on a connection and wait for the answer's headers."""
        head = self._head(request)
        body = request.body
        resend = request.method == "GET"  # idempotent: once more if a kept connection died
        while True:
            connection = pool.take(loop.time())
            fresh = connection is None
            if connection is None:
                connection = await self._connect(loop)
            transport = connection.transport
            if transport is None or transport.is_closing():
                connection.close()
                if fresh:
                    raise NotSent("the connection closed before the request was written")
                continue  # closed while idle in the pool: nothing was written
            waiter = connection.begin()
            if body is None:
                transport.write(head)
            elif len(body) > _HIGH_WATER:
                transport.writelines((head, body))  # no copy of a large body
            else:
                transport.write(head + body)
            timer = loop.call_at(deadline, _time_out, waiter)
            try:
                await waiter
            except _HeadFailed as exc:
                connection.close()
                if resend and not fresh and not exc.received:
                    resend = False
                    continue
                raise ExchangeFailed(str(exc)) from exc
            except BaseException:
                connection.close()  # timed out or cancelled: the connection's state is unknown
                raise
            finally:
                timer.cancel()
            return connection


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _check_tunnel(head: bytes) -> None:
    """Raise ``OSError`` unless the proxy's answer to ``CONNECT`` is a 2xx."""
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].startswith(b"2"):
        raise OSError(f"the proxy refused the tunnel: {head[:64]!r}")


def _size(header_list: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) for name, value in header_list)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(FirstByteTimeout())

"""UpstreamClient: how the gateway talks to Clipia — headers, retries, and a pluggable transport.

Owns everything about talking to the upstream and never anything about teams or money:

- a :class:`Transport` sends one request and returns the answer at its headers. The default,
  :class:`AiohttpTransport`, is one ``aiohttp.ClientSession`` for the application's life (a
  ``TCPConnector`` pool of keep-alive connections with a DNS cache and happy eyeballs), used
  through aiohttp's public API only; an egress proxy (``upstream.proxy_url``, or
  ``HTTPS_PROXY``/``NO_PROXY`` with ``upstream.trust_env``) is reached with ``CONNECT`` for
  an https upstream. Tests may pass their own transport (:class:`MockTransport`);
- no total timeout (it would cut long streams): connect, first-byte and idle (between reads)
  timeouts only;
- outbound headers from an allow-list built here, never copied from the client: our Clipia key,
  ``Content-Type``, ``Accept``, ``Accept-Encoding: identity`` and ``X-Request-Id``;
- redirects are never followed (a 3xx is a 502: Clipia does not redirect API calls, and
  following one could send our key elsewhere);
- one retry budget: by default only what never reached Clipia is retried (a failed connect,
  a connection closed before the request was written), at most ``retries`` times. Clipia's
  429/5xx go to the client with their ``Retry-After`` for the client's own retries, unless the
  operator lists the status in ``retry_on_status``: then the gateway retries it (honouring
  ``Retry-After`` up to ``max_retry_wait_seconds``) and the answer it finally passes on says
  ``x-should-retry: false``, as does every failure after the request may have reached Clipia;
- a 401/403 from Clipia means it rejected *our* key: a 502 for the client, whose body never
  includes Clipia's (it may quote the key), and an error log line for the operator.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import io
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import transport
from .config import Secret, UpstreamConfig
from .errors import UpstreamTimeout, UpstreamUnavailable
from .h1transport import H1Transport
from .transport import (
    Body,
    ConnectionsBusy,
    ExchangeFailed,
    FirstByteTimeout,
    IdleWatch,
    NotSent,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    acquire_slot,
    env_proxy,
    resolve_proxy,
)
from .version import __version__

__all__ = [
    "AiohttpTransport",
    "Body",
    "BytesBody",
    "ConnectionsBusy",
    "ExchangeFailed",
    "FirstByteTimeout",
    "H1Transport",
    "MockTransport",
    "NotSent",
    "Transport",
    "UpstreamBroken",
    "UpstreamBusy",
    "UpstreamClient",
    "UpstreamNotSent",
    "UpstreamRefused",
    "UpstreamRequest",
    "UpstreamResponse",
    "default_transport",
    "env_proxy",
    "mock_response",
    "parse_retry_after",
    "read_body",
]

SHOULD_RETRY: Final = "x-should-retry"
"""The header the openai SDKs obey: ``false`` means "do not retry this answer"."""


class UpstreamNotSent(UpstreamUnavailable):
    """Raised when Clipia could not be reached at all: it certainly received nothing."""


class UpstreamBusy(UpstreamNotSent):
    """Raised when every pooled connection stayed busy for the connect timeout: not sent."""


class UpstreamRefused(UpstreamUnavailable):
    """Raised when Clipia answered a redirect or rejected our key: nothing was billed."""

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status: Final = upstream_status


class UpstreamBroken(UpstreamUnavailable):
    """Raised when the exchange broke after the request may have reached Clipia.

    Clipia may be generating (and billing) the answer: the client is told not to retry.
    """

    def headers(self) -> dict[str, str]:
        """Add ``x-should-retry: false`` (a retry could start a second paid generation)."""
        return {**super().headers(), SHOULD_RETRY: "false"}


# --------------------------------------------------------------------------------------------
# Reading bodies, Retry-After


class _HasContent(Protocol):
    @property
    def content(self) -> _Readable: ...


class _Readable(Protocol):
    def is_eof(self) -> bool: ...
    def read_nowait(self) -> bytes: ...
    async def readany(self) -> bytes: ...


async def read_body(response: _HasContent, limit: int) -> bytes:
    """Read a response body to its end, but never more than ``limit`` + 1 bytes.

    A result longer than ``limit`` means the body was larger (the rest is left unread).
    Works on an :class:`UpstreamResponse` and on an ``aiohttp.ClientResponse``.
    """
    content = response.content
    if content.is_eof():  # the whole body arrived with the headers (the common case)
        data = content.read_nowait()
        return data[: limit + 1]
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[: limit + 1]


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


# --------------------------------------------------------------------------------------------
# The aiohttp transport


class _AiohttpBody(IdleWatch):
    """An ``aiohttp.ClientResponse``'s body with the idle timeout and the connection's end.

    On an idle timeout the watchdog closes the response: the waiting read then raises
    ``SocketTimeoutError``.
    """

    __slots__ = ("_reader", "_response", "_slots")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        idle: float,
        slots: asyncio.Semaphore,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(loop, idle)
        self._response = response
        self._reader = response.content
        self._slots = slots

    def is_eof(self) -> bool:
        return self._reader.is_eof()

    def read_nowait(self) -> bytes:
        return self._reader.read_nowait()

    async def readany(self) -> bytes:
        reader = self._reader
        data = reader.read_nowait()  # raises what broke the connection, if anything did
        if data or reader.is_eof():
            return data
        self.waiting_since()
        try:
            return await reader.readany()
        except aiohttp.ClientConnectionError:
            if self.timed_out:
                raise aiohttp.SocketTimeoutError("The upstream stayed silent too long") from None
            raise
        finally:
            self.waiting = False

    def on_idle_timeout(self) -> None:
        self._response.close()  # fails the waiting read

    def release(self) -> None:
        if self.finish():
            self._slots.release()
            self._response.release()

    def close(self) -> None:
        if self.finish():
            self._slots.release()
            self._response.close()


class AiohttpTransport:
    """One ``aiohttp.ClientSession`` for the application's life, through its public API.

    At most ``max_connections`` requests are in flight; one more waits for a free connection
    for the connect timeout at most, then is refused (:class:`ConnectionsBusy`): an overloaded
    gateway refuses rather than queueing without end. The first-byte timeout starts when the
    request is handed to the session (connect included: the connect timeout is far shorter).
    """

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        tls: ssl.SSLContext | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._tls = tls
        """For an https base URL: the TLS context (default: the system's CAs, verified)."""
        self._environ = environ
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_connections)
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        self._users = 0

    @property
    def proxy(self) -> URL | None:
        """The egress proxy in use (known once started), or None for direct connections."""
        return self._proxy

    async def start(self) -> None:
        """Open the session (connections are made on first use) and settle the proxy.

        Clients sharing this transport each start and close it: the last close closes it.
        """
        self._users += 1
        if self._session is not None:
            return
        config = self._config
        base = URL(config.base_url)
        self._proxy, self._proxy_headers = resolve_proxy(config, self._environ)
        tls = self._tls
        if tls is None and base.scheme == "https":
            # The system's CAs (SSL_CERT_FILE / SSL_CERT_DIR honoured), read off the loop.
            tls = await asyncio.to_thread(ssl.create_default_context)
        connector = aiohttp.TCPConnector(
            limit=config.max_connections,
            use_dns_cache=True,
            ttl_dns_cache=transport.DNS_CACHE_SECONDS,
            happy_eyeballs_delay=transport.HAPPY_EYEBALLS_DELAY,
            keepalive_timeout=transport.KEEPALIVE_SECONDS,
            ssl=tls if tls is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=None,
                sock_connect=config.connect_timeout_seconds,
                sock_read=None,  # first-byte and idle timeouts are ours (send, _AiohttpBody)
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            auto_decompress=False,  # we ask for identity; bodies relayed as received
            raise_for_status=False,
            trust_env=False,  # the environment's proxy, when trusted, was resolved just above
        )

    async def close(self) -> None:
        """Close the session and its connections (once its last user closes it)."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request`` on a pooled connection; return the answer at its headers."""
        session = self._session
        if session is None:
            raise RuntimeError("the upstream transport is not started")
        slots = self._slots
        await acquire_slot(slots, self._config.connect_timeout_seconds)
        try:
            async with asyncio.timeout(request.first_byte_timeout):
                response = await session.request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    data=_payload(request.body),
                    allow_redirects=False,
                    proxy=self._proxy,
                    proxy_headers=self._proxy_headers,
                )
        except (
            aiohttp.ClientConnectorError,  # refused, unreachable, DNS, TLS, the proxy
            aiohttp.ConnectionTimeoutError,
            aiohttp.ClientHttpProxyError,  # the proxy refused the tunnel: nothing reached Clipia
            aiohttp.ClientConnectionResetError,  # closed before the request could be written
        ) as exc:
            slots.release()
            raise NotSent(exc.__class__.__name__) from exc
        except TimeoutError as exc:
            slots.release()
            raise FirstByteTimeout from exc
        except (aiohttp.ClientError, OSError) as exc:
            slots.release()
            raise ExchangeFailed(exc.__class__.__name__) from exc
        except BaseException:
            slots.release()
            raise
        body = _AiohttpBody(
            response, self._config.idle_timeout_seconds, slots, asyncio.get_running_loop()
        )
        return UpstreamResponse(response.status, response.headers, body)


# --------------------------------------------------------------------------------------------
# A transport for tests


class BytesBody:
    """A body held in memory, given whole or as chunks (for :class:`MockTransport`)."""

    __slots__ = ("_chunks", "closed", "released")

    def __init__(self, chunks: bytes | Iterable[bytes] = b"") -> None:
        self._chunks = [chunks] if isinstance(chunks, bytes) else [c for c in chunks if c]
        self.released = False
        self.closed = False

    def is_eof(self) -> bool:
        """Always true: the whole body is in memory."""
        return True

    def read_nowait(self) -> bytes:
        """Return every chunk left."""
        data = b"".join(self._chunks)
        self._chunks = []
        return data

    async def readany(self) -> bytes:
        """Return the next chunk, ``b""`` at the end; fail once closed."""
        if self.closed:
            raise aiohttp.ClientConnectionError("Connection closed")
        return self._chunks.pop(0) if self._chunks else b""

    def release(self) -> None:
        """Note the release."""
        self.released = True

    def close(self) -> None:
        """Note the close; later reads fail."""
        self.closed = True


MockHandler = Callable[[UpstreamRequest], Awaitable[UpstreamResponse]]


class MockTransport:
    """A transport that answers every request with ``handler`` (like ``httpx.MockTransport``).

    ``requests`` records what was sent. ``mock_response`` builds an answer.
    """

    def __init__(self, handler: MockHandler) -> None:
        self._handler = handler
        self.requests: list[UpstreamRequest] = []

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Record ``request`` and answer it with the handler."""
        self.requests.append(request)
        return await self._handler(request)


def mock_response(
    status: int, body: bytes | Iterable[bytes] = b"", headers: Mapping[str, str] | None = None
) -> UpstreamResponse:
    """Return an in-memory answer (for :class:`MockTransport` handlers)."""
    return UpstreamResponse(status, CIMultiDictProxy(CIMultiDict(headers or {})), BytesBody(body))


def default_transport(config: UpstreamConfig, *, tls: ssl.SSLContext | None = None) -> Transport:
    """The transport ``upstream.transport`` names: ``httptools`` (default) or ``aiohttp``."""
    if config.transport == "aiohttp":
        return AiohttpTransport(config, tls=tls)
    return H1Transport(config, tls=tls)


# --------------------------------------------------------------------------------------------
# The client: headers, retries, refusals


_LOGGER: Final = logging.getLogger(__name__)
_BACKOFF_BASE_SECONDS: Final = 0.1
_KEY_REJECTED: Final = frozenset({401, 403})


class UpstreamClient:
    """Send requests to Clipia through one transport.

    ``send`` returns the upstream response once its headers arrived (status 2xx, or an error
    about the request that the caller passes through); the caller must release it.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        api_key: Secret,
        *,
        transport: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_attempt: Callable[[str], None] = lambda _code: None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._config = config
        self._transport: Final[Transport] = (
            transport if transport is not None else default_transport(config, tls=tls)
        )
        self._on_attempt = on_attempt
        """Told of every attempt: the upstream status, or ``connect_error``/``timeout``/``error``."""
        self._sleep = sleep
        self._base: Final = config.base_url.rstrip("/")
        self._retry_statuses: Final = frozenset(config.retry_on_status)
        # Built once; every request copies it and adds only its id, Accept and Content-Type.
        self._fixed_headers: Final = {
            "Authorization": f"Bearer {api_key.reveal()}",
            "Accept-Encoding": "identity",
            "User-Agent": f"clipia-proxy/{__version__}",
        }
        self._key_bytes: Final = api_key.reveal().encode()
        self._urls: dict[str, URL] = {}
        self._started = False

    @property
    def transport(self) -> Transport:
        """The transport requests go through."""
        return self._transport

    async def start(self) -> None:
        """Start the transport (connections are made on first use)."""
        await self._transport.start()
        self._started = True

    async def close(self) -> None:
        """Close the transport's connections."""
        if self._started:
            self._started = False
            await self._transport.close()

    def mentions_key(self, data: bytes) -> bool:
        """Return whether ``data`` contains our Clipia key (then it must never be relayed)."""
        return bool(self._key_bytes) and data.find(self._key_bytes) != -1

    def _url(self, path: str, query: Mapping[str, str] | None) -> URL:
        if query:
            target = path + "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
            return URL(self._base + target, encoded=True)
        url = self._urls.get(path)
        if url is None:
            url = URL(self._base + urllib.parse.quote(path), encoded=True)
            self._urls[path] = url
        return url

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
        """Send one request (retrying only what is safe) and return the response at its headers.

        Raises :class:`UpstreamUnavailable` (502) when Clipia cannot be reached, redirects, or
        rejects our key, or the exchange broke (:class:`UpstreamBroken`); :class:`UpstreamTimeout`
        (504) when no first byte arrives in time. Other statuses are returned for the caller
        to pass through.
        """
        if not self._started:
            raise RuntimeError("UpstreamClient is not started")
        headers = {**self._fixed_headers, "X-Request-Id": request_id, "Accept": accept}
        if body is not None:
            headers["Content-Type"] = "application/json"
        config = self._config
        # A chat may think for minutes before its first byte; the catalog and generation
        # lookups (GETs) answer at once when Clipia is well: they wait the idle timeout at most.
        first_byte = config.first_byte_timeout_seconds
        if method != "POST":
            first_byte = min(first_byte, config.idle_timeout_seconds)
        request = UpstreamRequest(method, self._url(path, query), headers, body, first_byte)
        attempts = 1 + config.retries
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = await self._transport.send(request)
            except ConnectionsBusy:
                # Waiting longer would only queue without end; nothing reached Clipia.
                _LOGGER.warning(
                    "all %d upstream connections stayed busy for %.1fs; request not sent",
                    config.max_connections,
                    config.connect_timeout_seconds,
                )
                raise UpstreamBusy(
                    f"All {config.max_connections} connections to the upstream AI gateway "
                    "are busy; the request was not sent. Retry shortly.",
                    retry_after=1,
                ) from None
            except NotSent as exc:
                self._on_attempt("connect_error")
                # Nothing reached Clipia: safe to try again.
                if last:
                    _LOGGER.warning("upstream unreachable: %s", exc)
                    raise UpstreamNotSent("The upstream AI gateway cannot be reached.") from exc
                await self._sleep(_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
                continue
            except FirstByteTimeout as exc:
                self._on_attempt("timeout")
                raise UpstreamTimeout(
                    "The upstream AI gateway did not start answering in time."
                ) from exc
            except ExchangeFailed as exc:
                self._on_attempt("error")
                # The request may have reached Clipia; never retried.
                _LOGGER.warning("upstream request failed: %s", exc)
                raise UpstreamBroken("The upstream AI gateway closed the connection.") from exc
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
            if status in self._retry_statuses:
                if not last:
                    wait = parse_retry_after(response.headers.get("Retry-After"))
                    if wait is None:
                        wait = _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1)
                    if wait <= config.max_retry_wait_seconds:
                        response.release()
                        _LOGGER.info("upstream %d, retry %d in %.2fs", status, attempt, wait)
                        await self._sleep(wait)
                        continue
                # The gateway spent the retry budget for this status: the client must not.
                response.gave_up = True
            return response
        raise AssertionError("unreachable")  # pragma: no cover


_LARGE_BODY: Final = 1024 * 1024
"""Bodies above this go to aiohttp as a ``BytesIO`` (written in chunks, yielding to the loop;
raw bytes that large make aiohttp warn that they may block the loop): vision requests."""


def _payload(body: bytes | None) -> bytes | io.BytesIO | None:
    """The body as aiohttp should get it: bytes, or a ``BytesIO`` when large."""
    if body is not None and len(body) > _LARGE_BODY:
        return io.BytesIO(body)
    return body

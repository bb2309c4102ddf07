"""UpstreamClient: the one pooled HTTP session to Clipia, its timeouts, headers and retries.

Owns everything about talking to the upstream and never anything about teams or money:

- one ``ClientSession`` for the application's life; no total timeout (it would cut long
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
import datetime
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aiohttp
from yarl import URL

from . import __version__
from .config import Secret, UpstreamConfig
from .errors import UpstreamTimeout, UpstreamUnavailable

__all__ = [
    "UpstreamClient",
    "UpstreamNotSent",
    "UpstreamRefused",
    "parse_retry_after",
    "read_body",
]


class UpstreamNotSent(UpstreamUnavailable):
    """Raised when Clipia could not be reached at all: it certainly received nothing."""


class UpstreamRefused(UpstreamUnavailable):
    """Raised when Clipia answered a redirect or rejected our key: nothing was billed."""

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status: Final = upstream_status


_LOGGER: Final = logging.getLogger(__name__)
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504, 529})
_BACKOFF_BASE_SECONDS: Final = 0.1
_KEY_REJECTED: Final = frozenset({401, 403})


async def read_body(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a response body to its end, but never more than ``limit`` + 1 bytes.

    A result longer than ``limit`` means the body was larger (the rest is left unread).
    ``StreamReader.read(n)`` alone returns whatever has arrived, not the whole body.
    """
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await response.content.read(limit + 1 - size)
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


class UpstreamClient:
    """Send requests to Clipia over one pooled session.

    ``send`` returns the upstream response once its headers arrived (status 2xx, or an error
    about the request that the caller passes through); the caller must release it.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        api_key: Secret,
        *,
        connector: aiohttp.BaseConnector | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_attempt: Callable[[str], None] = lambda _code: None,
    ) -> None:
        self._config = config
        self._on_attempt = on_attempt
        """Told of every attempt: the upstream status, or ``connect_error``/``timeout``/``error``."""
        self._base = config.base_url.rstrip("/")
        self._connector = connector
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        # Built once; every request copies it and adds only its request id and Accept.
        self._headers: Final = {
            "Authorization": f"Bearer {api_key.reveal()}",
            "Accept-Encoding": "identity",
            "User-Agent": f"clipia-proxy/{__version__}",
        }
        self._key_bytes: Final = api_key.reveal().encode()
        # Until the headers arrive, the socket read timeout is the first-byte timeout (the
        # request is sent before the timer starts, so it measures the wait for Clipia's first
        # byte; no extra timer per request); ``send`` switches it to the idle timeout for the
        # body. Waiting for a free pooled connection is bounded by the client, not here.
        self._header_timeout: Final = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=config.connect_timeout_seconds,
            sock_read=config.first_byte_timeout_seconds,
        )
        self._urls: dict[str, URL] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session; only valid between ``start`` and ``close``."""
        if self._session is None:
            raise RuntimeError("UpstreamClient is not started")
        return self._session

    async def start(self) -> None:
        """Open the pooled session."""
        connector = self._connector or aiohttp.TCPConnector(
            limit=self._config.max_connections, ttl_dns_cache=300
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=self._config.connect_timeout_seconds,
            sock_read=self._config.idle_timeout_seconds,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            skip_auto_headers=("User-Agent",),
            auto_decompress=True,
            raise_for_status=False,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close the pooled session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def mentions_key(self, data: bytes) -> bool:
        """Return whether ``data`` contains our Clipia key (then it must never be relayed)."""
        return bool(self._key_bytes) and self._key_bytes in data

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = URL(self._base + path, encoded=False)
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
    ) -> aiohttp.ClientResponse:
        """Send one request (with bounded retries) and return the response at its headers.

        Raises :class:`UpstreamUnavailable` (502) when Clipia cannot be reached, redirects, or
        rejects our key; :class:`UpstreamTimeout` (504) when no first byte arrives in time.
        A 429/5xx after the last retry is returned for the caller to pass through.
        """
        headers = dict(self._headers)
        headers["X-Request-Id"] = request_id
        headers["Accept"] = accept
        if body is not None:
            headers["Content-Type"] = "application/json"
        url = self._url(path)
        attempts = 1 + self._config.retries
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                response = await self.session.request(
                    method,
                    url,
                    data=body,
                    params=query,
                    headers=headers,
                    allow_redirects=False,
                    timeout=self._header_timeout,
                )
                # The idle timeout governs the body only: it must not cut the first-byte wait.
                if response.connection is not None and response.connection.protocol is not None:
                    response.connection.protocol.read_timeout = self._config.idle_timeout_seconds
                    response.connection.protocol.start_timeout()
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                self._on_attempt("connect_error")
                # Nothing reached Clipia: safe to try again.
                if last:
                    _LOGGER.warning("upstream unreachable: %s", exc.__class__.__name__)
                    raise UpstreamNotSent("The upstream AI gateway cannot be reached.") from exc
                await self._sleep(_BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
                continue
            except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                self._on_attempt("timeout")
                raise UpstreamTimeout(
                    "The upstream AI gateway did not start answering in time."
                ) from exc
            except aiohttp.ClientError as exc:
                self._on_attempt("error")
                # The request may have reached Clipia; never retried.
                _LOGGER.warning("upstream request failed: %s", exc.__class__.__name__)
                raise UpstreamUnavailable("The upstream AI gateway closed the connection.") from exc
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

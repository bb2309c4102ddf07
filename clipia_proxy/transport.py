"""The upstream transport interface: what the gateway hands a transport and gets back.

A transport sends one request to Clipia and returns the answer at its headers; the
:class:`~clipia_proxy.upstream.UpstreamClient` above it owns headers, retries and refusals.
Two implement it: :class:`~clipia_proxy.h1transport.H1Transport` (the default: asyncio and the
httptools parser) and :class:`~clipia_proxy.upstream.AiohttpTransport` (one
``aiohttp.ClientSession``; ``upstream.transport: aiohttp``); tests inject
:class:`~clipia_proxy.upstream.MockTransport`. Also here: what both share — the idle-timeout
watchdog of a body, the egress proxy settings, the keep-alive and happy-eyeballs constants.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Mapping
from typing import Final, Protocol

from yarl import URL

from .config import UpstreamConfig

__all__ = [
    "DNS_CACHE_SECONDS",
    "HAPPY_EYEBALLS_DELAY",
    "KEEPALIVE_SECONDS",
    "Body",
    "ConnectionsBusy",
    "ExchangeFailed",
    "FirstByteTimeout",
    "IdleWatch",
    "NotSent",
    "Transport",
    "UpstreamRequest",
    "UpstreamResponse",
    "acquire_slot",
    "env_proxy",
    "resolve_proxy",
]


class NotSent(Exception):
    """A transport failure before any byte of the request left: safe to retry."""


class ConnectionsBusy(NotSent):
    """Every connection stayed busy for the connect timeout: nothing was sent."""


async def acquire_slot(slots: asyncio.Semaphore, wait_at_most: float) -> None:
    """Take one of the pool's connection slots, waiting ``wait_at_most`` seconds (else busy)."""
    if not slots.locked():
        await slots.acquire()  # free: returns at once
        return
    try:
        async with asyncio.timeout(wait_at_most):
            await slots.acquire()
    except TimeoutError:
        raise ConnectionsBusy from None


class FirstByteTimeout(Exception):
    """The request was sent but no answer started within the first-byte timeout."""


class ExchangeFailed(Exception):
    """The exchange broke after the request may have reached the server (never retried)."""


class UpstreamRequest:
    """One request for a transport: method, absolute URL, headers, body and first-byte timeout."""

    __slots__ = ("body", "first_byte_timeout", "headers", "method", "url")

    def __init__(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        first_byte_timeout: float,
    ) -> None:
        self.method: Final = method
        self.url: Final = url
        self.headers: Final = headers
        self.body: Final = body
        self.first_byte_timeout: Final = first_byte_timeout


class Body(Protocol):
    """An answer's body as the gateway reads it, and its connection's end.

    ``readany`` returns the next bytes (``b""`` at the end) and raises ``TimeoutError`` when
    the upstream stays silent for the idle timeout, ``aiohttp.ClientError`` when the
    connection breaks or is closed. ``release`` (always, once done) returns the connection
    to the pool when the body was read to its end, else closes it; ``close`` drops it at once
    and fails a pending read. Both are idempotent.
    """

    def is_eof(self) -> bool:
        """Whether the whole body has arrived (``read_nowait`` then returns the rest)."""
        ...

    def read_nowait(self) -> bytes:
        """Return the bytes already buffered (possibly none) without waiting."""
        ...

    async def readany(self) -> bytes:
        """Return the next bytes, waiting for them; ``b""`` once the body ended."""
        ...

    def release(self) -> None:
        """Done with the answer: keep the connection if the body was read to its end."""
        ...

    def close(self) -> None:
        """Close the connection now; a pending ``readany`` fails."""
        ...


class UpstreamResponse:
    """Clipia's answer, at its headers: ``status``, ``headers``, and the body in ``content``.

    ``release`` (always, once done) returns the connection to the pool when the body was read
    to its end, else closes it; ``close`` drops the connection at once and fails a pending read
    of the body (shutdown and client hang-ups end open streams this way). ``gave_up`` is set
    when the gateway retried this status itself (``retry_on_status``): the client must not.
    """

    __slots__ = ("content", "gave_up", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], content: Body) -> None:
        self.status: Final = status
        self.headers: Final = headers
        self.content: Final = content
        self.gave_up = False

    def release(self) -> None:
        """Give the connection back (reused only if the body was read to its end)."""
        self.content.release()

    def close(self) -> None:
        """Close the connection now; a read of the body waiting on it fails."""
        self.content.close()


class Transport(Protocol):
    """Sends one request and returns the answer at its headers (any status).

    Raises :class:`NotSent` (nothing left: retryable), :class:`ConnectionsBusy`,
    :class:`FirstByteTimeout` or :class:`ExchangeFailed` (the request may have arrived).
    """

    async def start(self) -> None:
        """Open what the transport needs (called once, in the running loop)."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send ``request``; return the answer once its headers arrived."""
        ...


KEEPALIVE_SECONDS: Final = 15.0
"""An idle pooled connection older than this is closed rather than reused (servers close
idle keep-alive connections; reusing one they are closing fails the request)."""
DNS_CACHE_SECONDS: Final = 300
HAPPY_EYEBALLS_DELAY: Final = 0.25
"""RFC 8305's recommended delay before trying the next address family."""


def env_proxy(url: URL, environ: Mapping[str, str] | None = None) -> URL | None:
    """Return the proxy the environment names for ``url``, or None.

    ``HTTPS_PROXY`` (``HTTP_PROXY`` for an http URL), upper or lower case, unless ``NO_PROXY``
    lists the host: ``*``, a host name (its subdomains too, with or without a leading dot),
    an IP address, each optionally with ``:port``.
    """
    env = os.environ if environ is None else environ
    lowered = {name.lower(): value for name, value in env.items() if value}
    if _bypassed(url, lowered.get("no_proxy", "")):
        return None
    chosen = lowered.get(f"{url.scheme}_proxy")
    return URL(chosen) if chosen else None


def _bypassed(url: URL, no_proxy: str) -> bool:
    host = (url.raw_host or "").lower().rstrip(".")
    for entry in no_proxy.split(","):
        pattern = entry.strip().lower()
        if not pattern:
            continue
        if pattern == "*":
            return True
        name, _, port = pattern.rpartition(":") if pattern.count(":") == 1 else (pattern, "", "")
        if port and port.isdigit() and int(port) != url.port:
            continue
        name = name.lstrip(".").rstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


class IdleWatch:
    """The idle timeout of a body being read: a lazy watchdog, not one timer per chunk.

    A read that has to wait calls :meth:`waiting_since`; one timer wakes at the earliest
    possible deadline and either calls :meth:`on_idle_timeout` (the subclass fails the
    waiting read) or sleeps again until the current wait's deadline. A steady stream so costs
    one timer per idle period; an answer that arrived whole, none.
    """

    __slots__ = ("done", "idle", "loop", "since", "timed_out", "waiting", "watch")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float = 0.0) -> None:
        self.loop = loop
        self.idle = idle
        self.since = 0.0
        self.waiting = False
        self.timed_out = False
        self.done = False
        self.watch: asyncio.TimerHandle | None = None

    def waiting_since(self) -> None:
        """A read starts waiting now (the caller clears ``waiting`` when it returns)."""
        self.since = self.loop.time()
        self.waiting = True
        if self.watch is None:
            self._arm(self.since + self.idle)

    def _arm(self, deadline: float) -> None:
        self.watch = self.loop.call_at(deadline, self._on_watch)

    def _on_watch(self) -> None:
        self.watch = None
        if self.done or not self.waiting:
            return  # the next wait arms a new watch
        deadline = self.since + self.idle
        if self.loop.time() >= deadline:
            self.timed_out = True
            self.on_idle_timeout()
        else:
            self._arm(deadline)

    def on_idle_timeout(self) -> None:
        """Fail the waiting read (the subclass closes its connection)."""
        raise NotImplementedError

    def finish(self) -> bool:
        """Stop watching for good; return False when already finished."""
        if self.done:
            return False
        self.done = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        return True


def resolve_proxy(
    config: UpstreamConfig, environ: Mapping[str, str] | None = None
) -> tuple[URL | None, dict[str, str] | None]:
    """Return the egress proxy (without credentials) and its ``Proxy-Authorization`` header.

    ``upstream.proxy_url``, else with ``upstream.trust_env`` the environment's proxy for the
    base URL (:func:`env_proxy`); credentials in the URL go to the proxy alone.
    """
    proxy = URL(config.proxy_url) if config.proxy_url else None
    if proxy is None and config.trust_env:
        proxy = env_proxy(URL(config.base_url), environ)
    if proxy is None or (proxy.user is None and proxy.password is None):
        return proxy, None
    credentials = f"{proxy.user or ''}:{proxy.password or ''}".encode()
    header = {"Proxy-Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")}
    return proxy.with_user(None), header

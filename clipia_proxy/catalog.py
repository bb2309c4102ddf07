"""The model catalog: a cached ``GET /v1/models`` with TTL, single-flight refresh and stale-on-error.

Clipia's list mixes chat models (OpenRouter-style entries with ``architecture`` and
``context_length``) with media models; only chat models are kept. Prices (``pricing.prompt`` /
``pricing.completion``, catalog price units per token) are read from their decimal text.

Freshness rules: a snapshot younger than ``ttl_seconds`` is served as is; an older one is
served while one background refresh runs; past ``max_stale_seconds`` callers wait for a
refresh, and if it fails they get 502 ``upstream_unavailable``. Concurrent callers share one
refresh (single flight). A failed refresh keeps the old snapshot, and the next one waits
1, 2, 4 … 60 seconds (callers needing a fresh catalog meanwhile get 502 at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Final

import aiohttp
import msgspec

from .config import CatalogConfig
from .errors import ProxyError, UpstreamUnavailable
from .tasks import TaskRegistry
from .upstream import UpstreamClient, read_body
from .wire import decode_json

__all__ = ["Catalog", "CatalogEntry", "CatalogSnapshot", "parse_catalog"]

_LOGGER: Final = logging.getLogger(__name__)
_MAX_CATALOG_BYTES: Final = 16 * 1024 * 1024
_RETRY_BASE_SECONDS: Final = 1.0
_RETRY_MAX_SECONDS: Final = 60.0
"""Failed fetches back off 1, 2, 4 … 60 s, so a Clipia outage is not met with a fetch storm."""


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One chat model of the catalog."""

    id: str
    raw: dict[str, object]
    """The entry exactly as Clipia listed it (served to clients as is)."""
    prompt_price: Decimal | None
    completion_price: Decimal | None


class CatalogSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The chat models at one point in time."""

    entries: dict[str, CatalogEntry]
    fetched_at: float
    """Monotonic time of the fetch."""


def _price(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str | int | Decimal):
        try:
            price = Decimal(value)
        except InvalidOperation:
            return None
        return price if price.is_finite() and price >= 0 else None
    return None


def parse_catalog(data: object, *, fetched_at: float) -> CatalogSnapshot:
    """Return the chat models of a decoded ``GET /v1/models`` body; raise ``ValueError``."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError("the catalog is not an object with a data list")  # noqa: TRY004 - bad data, not a bug
    entries: dict[str, CatalogEntry] = {}
    for item in data["data"]:
        if not isinstance(item, dict):
            continue
        model_id = item.get("id")
        if not isinstance(model_id, str) or not model_id:
            continue
        if not isinstance(item.get("architecture"), dict) or "context_length" not in item:
            continue  # a media model (image/video): not served by chat completions
        pricing = item.get("pricing")
        pricing = pricing if isinstance(pricing, dict) else {}
        entries[model_id] = CatalogEntry(
            id=model_id,
            raw=item,
            prompt_price=_price(pricing.get("prompt")),
            completion_price=_price(pricing.get("completion")),
        )
    return CatalogSnapshot(entries=entries, fetched_at=fetched_at)


class Catalog:
    """The cached catalog of one application."""

    def __init__(
        self,
        upstream: UpstreamClient,
        config: CatalogConfig,
        tasks: TaskRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstream = upstream
        self._config = config
        self._tasks = tasks
        self._clock = clock
        self._snapshot: CatalogSnapshot | None = None
        self._refreshing: asyncio.Task[CatalogSnapshot | None] | None = None
        self._model_ids: frozenset[str] = frozenset()
        self._failures = 0
        self._retry_at = 0.0
        """After a failed fetch, no new one starts before this (monotonic) time."""
        self.refresh_results: dict[str, int] = {"success": 0, "error": 0}
        """Counts of refresh outcomes (exported as metrics)."""
        self.on_change: Callable[[], None] | None = None
        """Called after a refresh installed a snapshot (metrics make its models' series)."""

    def age(self) -> float | None:
        """Return the snapshot's age in seconds, or ``None`` before the first fetch."""
        if self._snapshot is None:
            return None
        return self._clock() - self._snapshot.fetched_at

    def apply(self, config: CatalogConfig) -> None:
        """Take a reloaded config's TTLs (the cached snapshot is kept)."""
        self._config = config

    def model_ids(self) -> frozenset[str]:
        """Return the current chat model ids (empty before the first fetch)."""
        return self._model_ids

    def is_warm(self) -> bool:
        """Return whether a snapshot within ``max_stale_seconds`` is available."""
        age = self.age()
        return age is not None and age <= self._config.max_stale_seconds

    def fresh(self) -> CatalogSnapshot | None:
        """Return the snapshot if it is within its TTL (no refresh due), else ``None``."""
        snapshot = self._snapshot
        if snapshot is not None and self._clock() - snapshot.fetched_at <= self._config.ttl_seconds:
            return snapshot
        return None

    async def get(self) -> CatalogSnapshot:
        """Return a snapshot that follows the freshness rules of the module docstring."""
        fresh = self.fresh()
        if fresh is not None:
            return fresh
        snapshot = self._snapshot
        if snapshot is not None:
            age = self._clock() - snapshot.fetched_at
            if age <= self._config.max_stale_seconds:
                if self._clock() >= self._retry_at:
                    _refresh = self._start_refresh()  # the registry owns it; serve the stale copy
                return snapshot
        if self._clock() < self._retry_at and (self._refreshing is None or self._refreshing.done()):
            # A fetch failed moments ago: answer at once instead of hammering Clipia.
            raise UpstreamUnavailable("The model catalog is unavailable.")
        return await self.refresh()

    async def refresh(self) -> CatalogSnapshot:
        """Fetch now (joining a refresh already running); raise 502 when it fails."""
        task = self._start_refresh()
        await asyncio.wait({task})  # never cancels the shared refresh if this caller goes
        snapshot = task.result()
        if snapshot is None:
            raise UpstreamUnavailable("The model catalog is unavailable.")
        return snapshot

    def _start_refresh(self) -> asyncio.Task[CatalogSnapshot | None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._tasks.spawn(self._fetch(), name="catalog-refresh")
        return self._refreshing

    async def _fetch(self) -> CatalogSnapshot | None:
        """Fetch and install a snapshot; on failure log once and return ``None``."""
        try:
            response = await self._upstream.send(
                "GET", "/models", request_id=f"catalog-{uuid.uuid4().hex}"
            )
            try:
                if response.status != 200:
                    raise UpstreamUnavailable(f"catalog answered {response.status}")
                body = await read_body(response, _MAX_CATALOG_BYTES)
                if len(body) > _MAX_CATALOG_BYTES:
                    raise UpstreamUnavailable("catalog larger than the gateway accepts")
            finally:
                response.release()
            snapshot = parse_catalog(decode_json(body), fetched_at=self._clock())
        except (
            ProxyError,
            aiohttp.ClientError,
            TimeoutError,
            ValueError,
            msgspec.DecodeError,
        ) as exc:
            self.refresh_results["error"] += 1
            self._failures += 1
            self._retry_at = self._clock() + min(
                _RETRY_BASE_SECONDS * 2 ** (self._failures - 1), _RETRY_MAX_SECONDS
            )
            _LOGGER.warning(
                "catalog refresh failed (%s); serving the previous catalog if any",
                exc.__class__.__name__,
            )
            return None
        self.refresh_results["success"] += 1
        self._failures = 0
        self._retry_at = 0.0
        self._snapshot = snapshot
        self._model_ids = frozenset(snapshot.entries)
        if self.on_change is not None:
            self.on_change()
        return snapshot

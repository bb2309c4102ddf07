"""Liveness, readiness and draining, served on the admin port.

``/healthz`` answers 200 while the process runs. ``/readyz`` answers 200 only when the config
is loaded, the catalog is warm (or within ``catalog.max_stale_seconds``), the quota store
answered its last call (unless ``store.on_error`` is ``fail_open``) and the gateway is not
draining; otherwise 503 with the reasons, so Kubernetes stops routing new requests here.
The store can name its own reasons (Redis counters being rebuilt from the ledger), and
``warnings`` in the body name what does not stop readiness but can lose counters (Redis's
``maxmemory-policy`` or persistence).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

from aiohttp import web

from .wire import encode_json

__all__ = ["Health", "create_admin_app"]


class Health:
    """The gateway's health state; ``is_draining`` flips once, on shutdown."""

    def __init__(
        self,
        *,
        catalog_is_warm: Callable[[], bool],
        store_is_reachable: Callable[[], bool] = lambda: True,
        store_problems: Callable[[], list[str]] = list,
        store_warnings: Callable[[], list[str]] = list,
    ) -> None:
        self._catalog_is_warm = catalog_is_warm
        self._store_is_reachable = store_is_reachable
        self._store_problems = store_problems
        self.warnings: Final = store_warnings
        """What does not stop readiness but can lose counters (``/readyz`` detail)."""
        self._draining = asyncio.Event()
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_draining(self) -> bool:
        """Whether shutdown has begun (new requests get 503 ``draining``)."""
        return self._draining.is_set()

    @is_draining.setter
    def is_draining(self, value: bool) -> None:
        if value:
            self._draining.set()
        else:
            self._draining.clear()

    def enter(self) -> None:
        """Count a request being served (not a refusal)."""
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        """Count a served request's end."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` until no request is being served; return whether it is so."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return self._idle.is_set()

    async def pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking at once when draining starts; return ``is_draining``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._draining.wait(), seconds)
        return self.is_draining

    def problems(self) -> list[str]:
        """Return why the gateway is not ready (empty when ready)."""
        problems: list[str] = []
        if self.is_draining:
            problems.append("draining")
        if not self._catalog_is_warm():
            problems.append("catalog not loaded")
        store = self._store_problems()
        if store:
            problems += store
        elif not self._store_is_reachable():
            problems.append("quota store unavailable")
        return problems


def create_admin_app(
    health: Health, extra_routes: list[web.RouteDef] | None = None
) -> web.Application:
    """Return the admin application: ``/healthz``, ``/readyz`` (and what the caller adds)."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def readyz(_request: web.Request) -> web.Response:
        problems = health.problems()
        status = 503 if problems else 200
        body: dict[str, object] = {
            "status": "not ready" if problems else "ready",
            "problems": problems,
        }
        warnings = health.warnings()
        if warnings:
            body["warnings"] = warnings
        return web.Response(status=status, body=encode_json(body), content_type="application/json")

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    if extra_routes:
        admin.add_routes(extra_routes)
    return admin

"""Every ``web.AppKey`` and ``web.RequestKey`` of the gateway, with who sets each one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from aiohttp import web

if TYPE_CHECKING:  # the keys name these types in strings only (no import cycles at run time)
    from .attribution import Attributor  # noqa: F401
    from .auth import Principal  # noqa: F401
    from .catalog import Catalog  # noqa: F401
    from .drift import DriftChecker  # noqa: F401
    from .hangups import HangupWatch  # noqa: F401
    from .health import Health  # noqa: F401
    from .ledger import Ledger  # noqa: F401
    from .live import Live  # noqa: F401
    from .metrics import Metrics  # noqa: F401
    from .quotas.service import QuotaService  # noqa: F401
    from .record import GenerationOwners, RequestInfo  # noqa: F401
    from .redact import KeyScanner  # noqa: F401
    from .sandbox import Upstreams  # noqa: F401
    from .streaming import OpenStreams  # noqa: F401
    from .tasks import TaskRegistry  # noqa: F401
    from .upstream import UpstreamClient  # noqa: F401

__all__ = [
    "ATTRIBUTION",
    "CATALOG",
    "GENERATIONS",
    "HANGUPS",
    "HEALTH",
    "INFO",
    "KEY_SCAN",
    "LEDGER",
    "LIVE",
    "METRICS",
    "PRINCIPAL",
    "QUOTAS",
    "STREAMS",
    "TASKS",
    "UPSTREAM",
    "UPSTREAMS",
]

# Application keys: set once by app.create_app (or its cleanup contexts), read by handlers.
LIVE: Final = web.AppKey["Live"]("live")
"""The config in force with its authenticator and policies; replaced whole by a reload."""
TASKS: Final = web.AppKey["TaskRegistry"]("tasks")
UPSTREAM: Final = web.AppKey["UpstreamClient"]("upstream")
"""The client with the live Clipia key (the catalog, and every live team's requests)."""
ATTRIBUTION: Final = web.AppKey["Attributor"]("attribution")
"""Tags and end user of each request (``attribution``); follows reloads."""
UPSTREAMS: Final = web.AppKey["Upstreams"]("upstreams")
"""The live and sandbox clients, and which one each team's requests use."""
CATALOG: Final = web.AppKey["Catalog"]("catalog")
HEALTH: Final = web.AppKey["Health"]("health")
QUOTAS: Final = web.AppKey["QuotaService"]("quotas")
"""Admission and settlement; owns the store (``QUOTAS.store``)."""
METRICS: Final = web.AppKey["Metrics"]("metrics")
"""Every Prometheus metric of the app (served on the admin port)."""
LEDGER: Final = web.AppKey["Ledger"]("ledger")
"""Settlement rules and crash reconciliation."""
DRIFT: Final = web.AppKey["DriftChecker"]("drift")
"""Checks a sample of settlements against ``/v1/generation`` and corrects the ledger."""
STREAMS: Final = web.AppKey["OpenStreams"]("streams")
"""Streams being relayed; shutdown ends them cleanly when its grace period runs out."""
KEY_SCAN: Final = web.AppKey["KeyScanner"]("key_scan")
"""Finds the Clipia key (whole, partial, escaped) in upstream bytes before they are relayed."""
GENERATIONS: Final = web.AppKey["GenerationOwners"]("generations")
"""Upstream generation id -> the team that created it (bounded; the ledger replaces it)."""
HANGUPS: Final = web.AppKey["HangupWatch"]("hangups")
"""Requests waiting for Clipia's first byte; a client that leaves gives its slot back."""

# Request keys: set by the middleware in app.py, read by the handlers.
INFO: Final = web.RequestKey["RequestInfo"]("info")
"""Per-request facts for the access log; set by the middleware."""
PRINCIPAL: Final = web.RequestKey["Principal"]("principal")
"""Who is calling; set by the identity middleware before any handler runs."""

"""What the gateway knows about one request while it runs, and who created which generation.

:class:`RequestInfo` is filled in as a request goes (identity, model, usage, outcome) and read
by the metrics and the access line; :class:`GenerationOwners` remembers which team created a
Clipia generation id, for ``GET /v1/generation``. A leaf below ``handlers`` and ``keys``: both
name these types without importing each other.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from .wire import Usage

__all__ = ["GenerationOwners", "RequestInfo"]


class GenerationOwners:
    """Which team created a generation id, for the last ``size`` ids (the oldest go first).

    A plain insertion-ordered dict: O(1) per request, no bookkeeping on reads.
    """

    __slots__ = ("_owners", "_size")

    def __init__(self, size: int) -> None:
        self._owners: dict[str, tuple[str, str | None]] = {}
        self._size = size

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, upstream_id: str, team: str, request_id: str | None = None) -> None:
        """Note that ``team`` created ``upstream_id`` (with the gateway's ``request_id``)."""
        owners = self._owners
        owners[upstream_id] = (team, request_id)
        if len(owners) > self._size:
            del owners[next(iter(owners))]

    def get(self, upstream_id: str) -> str | None:
        """Return the team that created ``upstream_id``, if it is still remembered."""
        known = self._owners.get(upstream_id)
        return None if known is None else known[0]

    def request_id(self, upstream_id: str) -> str | None:
        """Return the request id (its ledger record) of ``upstream_id``, if remembered."""
        known = self._owners.get(upstream_id)
        return None if known is None else known[1]


class RequestInfo(msgspec.Struct, kw_only=True):
    """Mutable facts about one request, filled in as it goes, for the access log."""

    request_id: str
    started: float
    team: str = "unknown"
    key_id: str | None = None
    model: str | None = None
    status: int = 0
    stream: bool = False
    upstream_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: Decimal | None = None
    usage_source: str | None = None
    outcome: str | None = None
    ttft: float | None = None
    upstream_sent: float | None = None
    """perf_counter just before the upstream request: the gateway's own time ends here."""
    upstream_done: float | None = None
    """perf_counter when the upstream answer ended: the gateway's own time starts again."""

    client_request_id: str | None = None
    """The client's own ``X-Request-Id`` when it sent a valid one (echoed back)."""

    def id_headers(self) -> dict[str, str]:
        """The response's id headers: the client's ``X-Request-Id`` kept, else ours.

        Ours (the ledger's and the upstream's id) is always there: ``X-Request-Id``, or
        ``X-Clipia-Proxy-Request-Id`` when the client's own id is echoed.
        """
        if self.client_request_id is None:
            return {"X-Request-Id": self.request_id}
        return {
            "X-Request-Id": self.client_request_id,
            "X-Clipia-Proxy-Request-Id": self.request_id,
        }

    def record_usage(self, usage: Usage | None, source: str) -> None:
        """Copy the usage in (when there is one) and note where it came from."""
        if usage is None:
            return
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.cost = usage.cost
        self.usage_source = source

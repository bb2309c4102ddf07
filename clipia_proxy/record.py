"""One request's record while it runs and until it is settled, and who created which generation.

:class:`RequestInfo` is the request's one record: filled in as the request goes (identity,
model, admission, upstream status, id and usage, outcome), read by the metrics and the access
line, and settled by the ledger. :class:`GenerationOwners` remembers which team created a
Clipia generation id, for ``GET /v1/generation``. Pure (below ``handlers``, ``keys`` and
``ledger``): they all name these types without importing each other.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from .quotas.admission import Admission
from .quotas.model import Outcome, UsageSource
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
    """One request's record, from its first byte to its settlement: the only one it has.

    The middleware creates it for every request (identity, timings, status: the metrics and
    the access line read it). Admission adds what the ledger settles against (``admission``,
    the prices, the metric tags) and sets ``outcome``; from then on the handler records what
    it learns on it (the upstream status, id and usage; the outcome as the request goes), and
    the one settle entry point hands this same record to the ledger. Requests refused before
    admission keep ``admission`` and ``outcome`` ``None``.
    """

    request_id: str
    started: float
    team: str = "unknown"
    key_id: str | None = None
    model: str | None = None
    """The canonical model id (a catalog id: bounded, safe for metric labels and logs)."""
    status: int = 0
    stream: bool = False
    upstream_id: str | None = None
    usage: Usage | None = None
    """The usage the upstream reported (the answer's, or the stream's usage chunk)."""
    usage_source: UsageSource | None = None
    """Where ``usage`` came from (``response`` or ``stream``); ``None`` while there is none."""
    outcome: Outcome | None = None
    """How the request ended: ``completed`` from admission on, until something else happens."""
    ttft: float | None = None
    upstream_sent: float | None = None
    """perf_counter just before the upstream request: the gateway's own time ends here."""
    upstream_done: float | None = None
    """perf_counter when the upstream answer ended: the gateway's own time starts again."""

    client_request_id: str | None = None
    """The client's own ``X-Request-Id`` when it sent a valid one (echoed back)."""

    admission: Admission | None = None
    """What admission reserved (``None`` before admission, and for refused requests)."""
    prompt_price: Decimal | None = None
    """The catalog's prices at admission (rubles per token; ``None`` when unknown)."""
    completion_price: Decimal | None = None
    upstream_status: int | None = None
    """Clipia's answer status (``None`` when none came)."""
    slot_released: bool = False
    """The concurrency slot was freed early (the client left before the end)."""
    metric_tags: dict[str, str] | None = None
    """The request's tags that are metric labels (``attribution.tags.*.metric``)."""

    @property
    def sent(self) -> bool:
        """False only when the upstream certainly never received the request (``not_sent``)."""
        return self.outcome is not Outcome.NOT_SENT

    def require_admission(self) -> Admission:
        """Return the admission: for code that only ever sees admitted requests (the ledger)."""
        admission = self.admission
        assert admission is not None, "the request was admitted"
        return admission

    def admitted(
        self,
        admission: Admission,
        *,
        prompt_price: Decimal | None,
        completion_price: Decimal | None,
        metric_tags: dict[str, str],
    ) -> None:
        """Note the admission: the request will be settled; its outcome is ``completed`` for now."""
        self.admission = admission
        self.prompt_price = prompt_price
        self.completion_price = completion_price
        self.metric_tags = metric_tags
        self.outcome = Outcome.COMPLETED

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

    def record_usage(self, usage: Usage | None, source: UsageSource) -> None:
        """Keep the upstream's usage (when there is one) and note where it came from."""
        if usage is None:
            return
        self.usage = usage
        self.usage_source = source

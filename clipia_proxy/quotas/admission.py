"""What admission decided for one request: a pure value, carried by the request's record.

Made by :meth:`~clipia_proxy.quotas.service.QuotaService.admit`; read by the handler (the
headers), the ledger (what to settle against) and the request's record
(:class:`~clipia_proxy.record.RequestInfo`), which is why it lives in the pure core.
"""

from __future__ import annotations

import msgspec

from .estimate import Estimate
from .model import Micro, Reason

__all__ = ["Admission"]


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """An admitted request: what was reserved, and the headers to send."""

    request_id: str
    team: str
    amount: Micro
    estimate: Estimate
    reserved: bool
    """False when the store was down and ``fail_open`` let the request through unrecorded."""
    headers: dict[str, str]
    would_reject: Reason | None = None
    admitted_at: float = 0.0
    """The service clock at admission (how long the concurrency slot is held is learnt)."""
    journaled: bool = False
    """Served under ``fail_open`` with its record in the outage journal (settled there too)."""

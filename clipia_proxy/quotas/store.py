"""The ``Store`` protocol: quota state and the spend ledger behind one seam.

A reservation *is* the request's ledger record: ``reserve`` counts what the team holds and,
when the request fits its limits, writes the record ``dispatched`` — atomically,
all-or-nothing, durably before it returns — so a request is never sent without its record,
and a refused one leaves nothing. The quota service decides from the counts
(:mod:`.decision`): stores only count, reserve and apply.
``settle`` replaces the reservation with the actual cost exactly once: calling it again for
the same request id changes nothing. A reservation holds a concurrency slot and money. The
slot is a lease: past ``lease_until`` (or at ``release_slot``, when the client left) it stops
counting against concurrency. The money stays reserved until the record is settled — by the
request, or by the reconciler after a crash — so a crashed replica's spend is never counted as
neither reserved nor spent. ``note_upstream_id`` makes the upstream (generation) id durable as
soon as it is known, so a crash after it can still be settled from ``/v1/generation``. Every
method may raise :class:`StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Protocol, runtime_checkable

import msgspec

from .model import Counted, Outcome, Period, RecordState, ReserveRequest, Settlement

__all__ = [
    "CountersSnapshot",
    "LedgerRecord",
    "LedgerStore",
    "LocalStore",
    "ReportLine",
    "Store",
    "StoreUnavailable",
    "WindowSpent",
    "WindowUsage",
]


class StoreUnavailable(Exception):
    """The store could not be reached or could not apply the operation."""


class LedgerRecord(msgspec.Struct, kw_only=True):
    """One request that reached (or may have reached) the upstream. Amounts in micro-credits."""

    request_id: str
    team: str
    key_id: str | None = None
    model: str = ""
    stream: bool = False
    reserved: int = 0
    tokens_reserved: int = 0
    windows: dict[Period, str] = msgspec.field(default_factory=dict)
    """Budget window keys at admission; the settlement is charged to these."""
    created_at: float = 0.0
    lease_until: float = 0.0
    state: RecordState = RecordState.DISPATCHED
    upstream_id: str | None = None
    cost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_source: str | None = None
    outcome: Outcome | None = None
    settled_at: float | None = None
    environment: str = "live"
    """``live``, or ``test`` for a sandbox team's request (its spend is not live spend)."""
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    """Declared attribution tags (``attribution.tags``): name -> a declared value or ``other``."""
    end_user: str | None = None
    """The end user (``user`` / ``safety_identifier``), as given or as a keyed hash."""


class WindowUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Spent and reserved micro-credits of one budget window."""

    spent: int = 0
    reserved: int = 0


class Store(Protocol):
    """Quota state and ledger. Implementations: memory, sqlite, redis."""

    is_remote: bool
    """True when calls cross the network (then ``store.timeout_seconds`` bounds each call)."""

    async def start(self) -> None:
        """Open connections and load state."""

    async def close(self) -> None:
        """Flush and close."""

    async def reserve(self, request: ReserveRequest) -> Counted:
        """Count the request's scopes and, if it fits (or does not ``enforce``), apply it.

        Applying reserves the money on every budget window, a concurrency slot and a place in
        the RPM/TPM minute, and writes the record: all or nothing, in one atomic step with the
        counting. Whether it fits is :func:`~.decision.fits` over the returned counts; the
        decision itself (which limit, shadow mode, headers) is the quota service's. Idempotent
        by request id: a second call returns ``replayed=True`` and applies nothing.
        """

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """Replace the reservation by ``settlement``; return False if already settled/unknown."""

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """Extend a live reservation's lease to ``now + lease_seconds`` (long streams)."""

    async def release_slot(self, request_id: str) -> None:
        """Free the request's concurrency slot now (its client left); the money stays reserved."""

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """Replace a *settled* record's cost and tokens by ``settlement``'s (the drift check).

        The spent of its windows moves by the difference, which is returned (micro-credits);
        None when the record is unknown or not settled. The outcome is kept.
        """

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """Store the upstream (generation) id on an unsettled record; no-op once settled."""

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """Return spent and (live) reserved micro-credits of the team's windows ``keys``."""

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """Return (requests, tokens) in the team's current 60-second window."""

    async def record(self, request_id: str) -> LedgerRecord | None:
        """Return one ledger record."""

    async def owner_of(self, upstream_id: str) -> str | None:
        """Return the team whose request produced this upstream (generation) id."""

    async def dispatched(self) -> list[LedgerRecord]:
        """Return every record not yet settled."""

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """Return records created in ``[since, until)``, oldest first."""


@runtime_checkable
class LocalStore(Store, Protocol):
    """A store whose decisions live in this process (memory, sqlite): it can settle at once."""

    def settle_nowait(self, request_id: str, settlement: Settlement) -> bool:
        """Apply ``settlement`` now (budgets see it at once) and persist it in the background.

        Returns False if already settled or unknown, like ``settle``. A failed write is
        retried in the background; if it never lands, the record stays ``dispatched`` for
        the reconciler, as with ``settle``.
        """

    def release_slot_nowait(self, request_id: str) -> None:
        """``release_slot`` without waiting (in memory)."""

    def note_upstream_id_nowait(self, request_id: str, upstream_id: str) -> None:
        """``note_upstream_id`` without waiting: the write joins this event-loop turn's batch."""


class WindowSpent(msgspec.Struct, frozen=True):
    """Settled micro-credits of one team in one budget window (counters' rebuild)."""

    team: str
    window: str
    spent: int


class CountersSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What the counters are rebuilt from, read in one consistent snapshot of the ledger."""

    spent: list[WindowSpent]
    dispatched: list[LedgerRecord]
    """Open records: live reservations while their lease lasts."""
    recent: list[LedgerRecord]
    """Records of the last minute (RPM/TPM windows)."""


class TeamSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One team's counters as the ledger has them (a Redis team rebuild), in one snapshot."""

    counters: CountersSnapshot
    counter_seq: int
    """The highest reservation sequence number a record of the team carries (0: none)."""


class Inserted(StrEnum):
    """What a counted insert did (:meth:`CountersLedger.insert_counted`)."""

    INSERTED = "inserted"
    EXISTS = "exists"
    """The request id is in the ledger already (a replay): nothing written."""
    BEHIND = "behind"
    """A record of the team already carries this sequence number: the counters that issued it
    went back in time (a failover to a lagging replica); nothing written."""


class ReportLine(msgspec.Struct, frozen=True, kw_only=True):
    """One aggregated line of a report: the group's values (in ``by`` order) and its sums."""

    group: tuple[str, ...]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int
    """Micro-credits."""


class LedgerStore(Protocol):
    """The per-request record, durable before dispatch, settled exactly once."""

    async def start(self) -> None:
        """Connect and bring the schema up to date (migrations)."""

    async def close(self) -> None:
        """Close connections."""

    async def insert(self, record: LedgerRecord) -> bool:
        """Write a ``dispatched`` record, committed on return; False if its id exists."""

    async def settle(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """Settle a dispatched record once; return it (settled) or None if nothing changed."""

    async def renew(self, request_id: str, lease_until: float) -> None:
        """Record a dispatched record's extended lease (the reconciler reads it)."""

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """Store the upstream (generation) id on a dispatched record; no-op once settled."""

    async def correct(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """Replace a settled record's cost, tokens and source (the drift check).

        Return the record as it was before (None when unknown or not settled).
        """

    async def record(self, request_id: str) -> LedgerRecord | None:
        """Return one record."""

    async def owner_of(self, upstream_id: str) -> str | None:
        """Return the team whose request produced this upstream (generation) id."""

    async def dispatched(self) -> list[LedgerRecord]:
        """Return every record not yet settled (open reservations included)."""

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """Return records created in ``[since, until)``, oldest first (small ranges only)."""

    async def spent(self, *, since: float) -> list[WindowSpent]:
        """Return settled spend per team and window key (SQL aggregates).

        Day/week/month windows of records created after ``since``; ``total`` of every record.
        """

    async def snapshot(self, *, since: float, recent_since: float) -> CountersSnapshot:
        """Return what the counters are rebuilt from, in one snapshot.

        ``spent(since)``, the open records and the records created after ``recent_since``: a
        settlement is in exactly one of ``spent`` and ``dispatched``.
        """

    def report(
        self,
        *,
        since: float,
        until: float,
        by: tuple[str, ...],
        team: str | None,
        days: tuple[str, str] | None = None,
    ) -> AsyncIterator[ReportLine]:
        """Yield settled sums of ``[since, until)`` grouped by ``by`` (see GROUPINGS).

        ``days``: the same period as its first and end budget day (``YYYY-MM-DD`` in
        ``accounting.timezone``), when it is whole days there: groupings the daily rollup
        holds are then read from it instead of the records.
        """

    async def open_count(self, *, since: float, until: float, team: str | None) -> int:
        """Return how many records of ``[since, until)`` are not settled yet."""

    def export(self, *, since: float, until: float) -> AsyncIterator[LedgerRecord]:
        """Yield every record of ``[since, until)``, oldest first, without loading them all."""

    async def prune(self, *, before: float) -> int:
        """Delete records created before ``before`` (a month start); return how many."""


class CountersLedger(LedgerStore, Protocol):
    """A ledger the shared (Redis) counters are checked against and rebuilt from, per team."""

    async def insert_counted(self, record: LedgerRecord, counter_seq: int) -> Inserted:
        """Insert like ``insert``, with the counters' sequence number of its reservation.

        Refused (``BEHIND``) when a record of the team already carries that number.
        """

    async def team_snapshot(self, team: str, *, since: float, recent_since: float) -> TeamSnapshot:
        """``snapshot`` of one team, with its highest sequence number."""

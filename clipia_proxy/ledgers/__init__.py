"""The durable ledger: one record per request, apart from the hot counters.

Two roles, two stores. The *counters* (``store.backend``: memory, sqlite, redis) decide
admission: reserved and spent per team and period, RPM/TPM windows, concurrency, leases. The
*ledger* (``ledger.backend``: sqlite, postgres) keeps one record per request, durably, and is
what chargeback reads; counters are rebuilt from it, never trusted alone.

:class:`LedgerStore` is the ledger's whole interface; implementations:
:class:`~clipia_proxy.ledgers.postgres.PostgresLedger` and
:class:`~clipia_proxy.ledgers.sqlite.SqliteLedger`. Every method may raise
:class:`~clipia_proxy.quotas.store.StoreUnavailable`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from clipia_proxy.quotas.model import Settlement
from clipia_proxy.quotas.store import LedgerRecord

if TYPE_CHECKING:
    from clipia_proxy.config import Config

__all__ = [
    "GROUPINGS",
    "TAG_GROUP",
    "CountersSnapshot",
    "LedgerStore",
    "ReportLine",
    "WindowSpent",
    "open_ledger",
]

GROUPINGS: Final = ("team", "environment", "model", "key", "user", "day")
"""What ``report --by`` may group on (any combination, in this order of columns), and
``tag:NAME`` (a declared tag's value, empty without it), after them."""
TAG_GROUP: Final = re.compile(r"tag:([A-Za-z0-9][A-Za-z0-9_.-]{0,62})")
"""``--by tag:NAME``: NAME is a tag key (letters, digits, ``.``, ``_``, ``-``: safe in SQL)."""


def tag_name(grouping: str) -> str | None:
    """Return NAME for a ``tag:NAME`` grouping, else ``None``."""
    match = TAG_GROUP.fullmatch(grouping)
    return match[1] if match else None


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
        self, *, since: float, until: float, by: tuple[str, ...], team: str | None
    ) -> AsyncIterator[ReportLine]:
        """Yield settled sums of ``[since, until)`` grouped by ``by`` (see GROUPINGS)."""

    async def open_count(self, *, since: float, until: float, team: str | None) -> int:
        """Return how many records of ``[since, until)`` are not settled yet."""

    def export(self, *, since: float, until: float) -> AsyncIterator[LedgerRecord]:
        """Yield every record of ``[since, until)``, oldest first, without loading them all."""

    async def prune(self, *, before: float) -> int:
        """Delete records created before ``before`` (a month start); return how many."""


def open_ledger(config: Config) -> LedgerStore:
    """Return the ledger ``config.ledger`` names (not started)."""
    if config.ledger.backend == "postgres":
        from .postgres import PostgresLedger

        return PostgresLedger.from_config(
            config.ledger, timeout=max(config.store.timeout_seconds, 30.0)
        )
    from .sqlite import SqliteLedger

    return SqliteLedger(config.store.sqlite_path)

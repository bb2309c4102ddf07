"""Counters in this process, records in a server ledger: ``memory``/``sqlite`` over ``postgres``.

One replica: decisions are made by the in-memory engine (atomic on the event loop); each
admitted request's record is committed to the ledger before ``reserve`` returns (a failed
commit undoes the decision and raises :class:`StoreUnavailable`). ``settle`` writes the ledger
first (idempotent by request id) and applies the engine after, so a failed write can be
retried and changes nothing in the counters. At start the counters are rebuilt from the ledger
with SQL aggregates (spent per team and window), its open records (live leases) and the last
minute of records (RPM/TPM): never loaded row by row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .memory import RATE_WINDOW_SECONDS, MemoryEngine
from .model import Counted, ReserveRequest, Settlement
from .store import LedgerRecord, LedgerStore, Store, WindowUsage

__all__ = ["CALENDAR_HORIZON_SECONDS", "EngineStore"]

CALENDAR_HORIZON_SECONDS: Final = 40 * 86400
"""Day, week and month windows older than this can no longer be current: not summed."""


class EngineStore:
    """Counters in memory, the ledger behind ``ledger`` (see the module docstring)."""

    is_remote = True  # every reserve and settle waits on the ledger's server

    def __init__(self, ledger: LedgerStore, *, clock: Callable[[], float]) -> None:
        self.ledger: Final = ledger
        self._clock = clock
        self.engine: Final = MemoryEngine()

    async def start(self) -> None:
        """Migrate the ledger, then rebuild the counters from it."""
        await self.ledger.start()
        now = self._clock()
        snapshot = await self.ledger.snapshot(
            since=now - CALENDAR_HORIZON_SECONDS, recent_since=now - RATE_WINDOW_SECONDS
        )
        for row in snapshot.spent:
            self.engine.add_spent(row.team, row.window, row.spent)
        seen: set[str] = set()
        for record in snapshot.dispatched:
            seen.add(record.request_id)
            self.engine.load(record, now)
        for record in snapshot.recent:
            if record.request_id not in seen:
                self.engine.load(record, now)

    async def close(self) -> None:
        """Close the ledger."""
        await self.ledger.close()

    async def reserve(self, request: ReserveRequest) -> Counted:
        """See ``Store.reserve``: counted in memory, committed to the ledger before returning."""
        counted = self.engine.reserve(request)
        if not counted.applied or counted.replayed:
            return counted
        record = self.engine.records[request.request_id]
        try:
            inserted = await self.ledger.insert(record)
        except BaseException:
            self.engine.unreserve(request.request_id)
            raise
        if not inserted:  # already in the ledger (settled, then forgotten here): a replay
            self.engine.unreserve(request.request_id)
            return Counted(applied=True, replayed=True)
        return counted

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """See ``Store.settle``: the ledger first, then the counters."""
        settled = await self.ledger.settle(request_id, settlement)
        if settled is None:
            return False
        if self.engine.settle(request_id, settlement) is None:
            # Not held here (a record of before the restart that was never loaded): count it.
            for key in settled.windows.values():
                self.engine.add_spent(settled.team, key, settlement.cost)
        self.engine.forget(request_id)
        return True

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew``: in memory, and in the ledger for the reconciler."""
        record = self.engine.records.get(request_id)
        self.engine.renew(request_id, now + lease_seconds, now)
        if record is not None and record.lease_until == now + lease_seconds:
            await self.ledger.renew(request_id, record.lease_until)

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot`` (slots live in memory: one replica)."""
        self.engine.release_slot(request_id)

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct``: the ledger, then the counters."""
        old = await self.ledger.correct(request_id, settlement)
        if old is None:
            return None
        delta = settlement.cost - old.cost
        for key in old.windows.values():
            self.engine.add_spent(old.team, key, delta)
        return delta

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id``: in memory, and in the ledger (committed on return)."""
        if self.engine.note_upstream_id(request_id, upstream_id) is not None:
            await self.ledger.note_upstream_id(request_id, upstream_id)

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        return self.engine.usage(team, keys, now)

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        return self.engine.rates(team, now)

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``Store.record``."""
        return await self.ledger.record(request_id)

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of``."""
        return await self.ledger.owner_of(upstream_id)

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``Store.dispatched``."""
        return await self.ledger.dispatched()

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``Store.records``."""
        return await self.ledger.records(since=since, until=until)


_STORE_CHECK: type[Store] = EngineStore

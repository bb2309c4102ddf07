"""The in-memory quota engine: the ``memory`` backend, and the decision core of ``sqlite``.

Every method body runs without an ``await`` between its checks and its writes, so on one event
loop each operation is atomic. Windows for RPM/TPM are sliding logs of the last 60 seconds (no
burst at a minute edge). A reservation holds two things: a concurrency slot (a lease: freed when
it runs out, or at once by ``release_slot`` when the client leaves) and money (reserved sums
per budget window, held until the record is settled, so a crashed replica's spend never counts
as neither reserved nor spent). A decision costs O(live reservations of the team).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Final

from .decision import fits
from .model import Counted, Period, RecordState, ReserveRequest, Settlement
from .store import LedgerRecord, LocalStore, WindowUsage

__all__ = ["MemoryEngine", "MemoryStore", "apply_correction"]

RATE_WINDOW_SECONDS: Final = 60.0
_MAX_SETTLED_KEPT: Final = 200_000
"""The memory backend forgets the oldest settled records past this (it is for tests)."""


class _RateEntry:
    __slots__ = ("at", "request_id", "tokens")

    def __init__(self, at: float, request_id: str, tokens: int) -> None:
        self.at = at
        self.request_id = request_id
        self.tokens = tokens


class _KeyRates:
    """One team key's own concurrency slots and 60-second log (``teams[].keys[].limits``).

    Its slots are freed with the team's (lease expiry, ``release_slot``, settlement), its log
    entries are its own (a settlement corrects their tokens as the team's).
    """

    __slots__ = ("index", "live", "log", "tokens")

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.log: deque[_RateEntry] = deque()
        self.index: dict[str, _RateEntry] = {}
        self.tokens = 0

    def prune(self, now: float) -> None:
        log, horizon = self.log, now - RATE_WINDOW_SECONDS
        while log and log[0].at <= horizon:
            entry = log.popleft()
            self.index.pop(entry.request_id, None)
            self.tokens -= entry.tokens

    def add(self, at: float, request_id: str, tokens: int) -> None:
        entry = _RateEntry(at, request_id, tokens)
        self.log.append(entry)
        self.index[request_id] = entry
        self.tokens += tokens

    def retokened(self, request_id: str, tokens: int) -> None:
        entry = self.index.get(request_id)
        if entry is not None:
            self.tokens += tokens - entry.tokens
            entry.tokens = tokens

    def remove(self, request_id: str) -> None:
        self.live.discard(request_id)
        entry = self.index.pop(request_id, None)
        if entry is not None:
            self.log.remove(entry)
            self.tokens -= entry.tokens


def apply_correction(record: LedgerRecord, settlement: Settlement) -> None:
    """Write a drift correction's cost, tokens and source into a settled record."""
    record.cost = settlement.cost
    record.prompt_tokens = settlement.prompt_tokens
    record.completion_tokens = settlement.completion_tokens
    record.usage_source = settlement.usage_source.value
    record.upstream_id = settlement.upstream_id or record.upstream_id


def apply_settlement(record: LedgerRecord, settlement: Settlement) -> None:
    """Write a settlement into a dispatched record: settled, its cost, tokens and outcome."""
    apply_correction(record, settlement)
    record.state = RecordState.SETTLED
    record.outcome = settlement.outcome
    record.settled_at = settlement.now


class MemoryEngine:
    """Synchronous quota state: decisions and bookkeeping, no I/O."""

    def __init__(self) -> None:
        self.records: dict[str, LedgerRecord] = {}
        self._live: dict[str, set[str]] = {}
        """Team -> request ids holding a concurrency slot (lease live, not settled)."""
        self._held: set[str] = set()
        """Request ids whose reservation (money) is counted: every unsettled record."""
        self._leases: dict[str, list[tuple[float, str]]] = {}
        """Team -> heap of (lease_until, request id) over its live reservations: expiry looks
        at the earliest lease only. Entries of released reservations are skipped when they
        surface, and the heap is rebuilt when they outnumber the live ones."""
        self._spent: dict[tuple[str, str], int] = {}
        self._reserved: dict[tuple[str, str], int] = {}
        self._rates: dict[str, deque[_RateEntry]] = {}
        self._rate_index: dict[str, _RateEntry] = {}
        self._rate_tokens: dict[str, int] = {}
        """Team -> tokens in its 60-second log (kept in step with it: O(1) TPM checks)."""
        self._keys: dict[tuple[str, str], _KeyRates] = {}
        """(team, key id) -> the key's own slots and log: keys with ``limits`` (and, after a
        start-up, every key of the records loaded)."""

    # -- state loading (sqlite start-up) -------------------------------------------------
    def load(self, record: LedgerRecord, now: float) -> None:
        """Install a record read back from durable storage (sqlite start-up).

        Unsettled records become live reservations while their lease lasts; records of the
        last minute refill the RPM/TPM windows. Spent sums are loaded with ``add_spent``.
        """
        scope = None
        if record.key_id is not None:
            # Which keys have limits is config, not in the record: every key's is loaded.
            scope = self._keys.setdefault((record.team, record.key_id), _KeyRates())
        if record.state is RecordState.DISPATCHED:
            self.records[record.request_id] = record
            # Its money stays reserved until it is settled (the reconciler will); its slot
            # only while its lease lasts.
            slot = record.lease_until > now
            self._hold(record, slot=slot)
            if slot and scope is not None:
                scope.live.add(record.request_id)
            tokens = record.tokens_reserved
        else:
            tokens = record.prompt_tokens + record.completion_tokens
        if record.created_at > now - RATE_WINDOW_SECONDS:
            self._log_rate(record.team, record.created_at, record.request_id, tokens)
            if scope is not None:
                scope.add(record.created_at, record.request_id, tokens)

    def add_spent(self, team: str, key: str, amount: int) -> None:
        """Add settled spend to a window (sqlite start-up)."""
        self._add(self._spent, team, key, amount)

    def forget(self, request_id: str) -> None:
        """Drop a settled record from memory once it is durable elsewhere."""
        record = self.records.get(request_id)
        if record is not None and record.state is RecordState.SETTLED:
            del self.records[request_id]

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _add(table: dict[tuple[str, str], int], team: str, key: str, amount: int) -> None:
        table[team, key] = table.get((team, key), 0) + amount

    def _hold(self, record: LedgerRecord, *, slot: bool = True) -> None:
        team = record.team
        if slot:
            live = self._live.setdefault(team, set())
            live.add(record.request_id)
            leases = self._leases.setdefault(team, [])
            heapq.heappush(leases, (record.lease_until, record.request_id))
            if len(leases) > 2 * len(live) + 64:
                records = self.records
                leases[:] = [(records[r].lease_until, r) for r in live]
                heapq.heapify(leases)
        self._held.add(record.request_id)
        reserved, amount = self._reserved, record.reserved
        for key in record.windows.values():
            reserved[team, key] = reserved.get((team, key), 0) + amount

    def _release_slot(self, record: LedgerRecord) -> None:
        live = self._live.get(record.team)
        if live is not None:
            live.discard(record.request_id)
        if record.key_id is not None and self._keys:
            scope = self._keys.get((record.team, record.key_id))
            if scope is not None:
                scope.live.discard(record.request_id)

    def _release(self, record: LedgerRecord) -> None:
        """Free the slot and the money (settled, or undone)."""
        self._release_slot(record)
        if record.request_id not in self._held:
            return
        self._held.discard(record.request_id)
        reserved, team, amount = self._reserved, record.team, record.reserved
        for key in record.windows.values():
            reserved[team, key] = reserved.get((team, key), 0) - amount

    def _expire(self, team: str, now: float) -> None:
        live = self._live.get(team)
        leases = self._leases.get(team)
        if not live or not leases:
            return
        while leases and leases[0][0] <= now:
            _, request_id = heapq.heappop(leases)
            if request_id not in live:
                continue  # released already
            record = self.records[request_id]
            if record.lease_until <= now:
                self._release_slot(record)  # the money stays reserved until settled
            else:  # renewed since: back in at its new lease
                heapq.heappush(leases, (record.lease_until, request_id))

    def _window(self, team: str, now: float) -> deque[_RateEntry]:
        log = self._rates.setdefault(team, deque())
        horizon = now - RATE_WINDOW_SECONDS
        while log and log[0].at <= horizon:
            entry = log.popleft()
            self._rate_index.pop(entry.request_id, None)
            self._rate_tokens[team] -= entry.tokens
        return log

    def _log_rate(self, team: str, at: float, request_id: str, tokens: int) -> None:
        entry = _RateEntry(at, request_id, tokens)
        self._rates.setdefault(team, deque()).append(entry)
        self._rate_index[request_id] = entry
        self._rate_tokens[team] = self._rate_tokens.get(team, 0) + tokens

    # -- the operations -------------------------------------------------------------------
    def reserve(self, request: ReserveRequest) -> Counted:
        """Count, and apply when every limit fits or the request does not enforce them.

        See ``Store.reserve``; the quota service decides from the counts
        (:func:`~.decision.decide`).
        """
        if request.request_id in self.records:
            return Counted(applied=True, replayed=True)
        self._expire(request.team, request.now)
        log = self._window(request.team, request.now)
        scope = self._key_scope(request)
        counted = self._count(request, log, scope)
        if request.enforce and not fits(request, counted):
            return counted
        self._apply(request, scope)
        counted.applied = True
        return counted

    def _count(
        self, request: ReserveRequest, log: deque[_RateEntry], scope: _KeyRates | None
    ) -> Counted:
        """What the team (and the key's own scope) holds before this request."""
        team, limits, now, tokens = request.team, request.limits, request.now, request.tokens
        used_tokens = self._rate_tokens.get(team, 0)
        budgets: dict[Period, int] = {}
        if limits.budgets:
            spent, reserved = self._spent, self._reserved
            for period, key in request.periods.items():
                if period in limits.budgets:
                    budgets[period] = spent.get((team, key), 0) + reserved.get((team, key), 0)
        counted = Counted(
            applied=False,
            live=len(self._live.get(team, ())),
            requests=len(log),
            tokens=used_tokens,
            budgets=budgets,
        )
        if limits.rpm is not None or limits.tpm is not None:
            counted.rpm_wait = _rpm_wait(log, limits.rpm, now)
            counted.tpm_wait = _tpm_wait(log, limits.tpm, tokens, now, used_tokens)
        own = request.key_limits
        if scope is not None and own is not None:
            counted.key_live, counted.key_requests = len(scope.live), len(scope.log)
            counted.key_tokens = scope.tokens
            counted.key_rpm_wait = _rpm_wait(scope.log, own.rpm, now)
            counted.key_tpm_wait = _tpm_wait(scope.log, own.tpm, tokens, now, scope.tokens)
        return counted

    def _key_scope(self, request: ReserveRequest) -> _KeyRates | None:
        """The key's own rate log and slots, pruned to now, when it has limits of its own."""
        if request.key_limits is None or request.key_id is None:
            return None
        scope = self._keys.setdefault((request.team, request.key_id), _KeyRates())
        scope.prune(request.now)
        return scope

    def _apply(self, request: ReserveRequest, scope: _KeyRates | None) -> None:
        """Write the record, hold its money and slot, log its rate (and the key's)."""
        now = request.now
        record = LedgerRecord(
            request_id=request.request_id,
            team=request.team,
            key_id=request.key_id,
            model=request.model,
            stream=request.stream,
            reserved=request.amount,
            tokens_reserved=request.tokens,
            windows=dict(request.periods),
            created_at=now,
            lease_until=now + request.lease_seconds,
            environment=request.environment,
            tags=dict(request.tags),
            end_user=request.end_user,
        )
        self.records[record.request_id] = record
        self._hold(record)
        self._log_rate(request.team, now, record.request_id, request.tokens)
        if scope is not None:
            scope.live.add(record.request_id)
            scope.add(now, record.request_id, request.tokens)

    def unreserve(self, request_id: str) -> None:
        """Undo a reservation whose durable write failed (as if it never happened)."""
        record = self.records.pop(request_id, None)
        if record is None:
            return
        self._release(record)
        entry = self._rate_index.pop(request_id, None)
        if entry is not None:
            # Out of the log now: left in place it would count against RPM until older
            # entries ahead of it aged out (up to a minute). Rare path, O(window).
            self._rates[record.team].remove(entry)
            self._rate_tokens[record.team] -= entry.tokens
        if record.key_id is not None:
            scope = self._keys.get((record.team, record.key_id))
            if scope is not None:
                scope.remove(request_id)

    def settle(self, request_id: str, settlement: Settlement) -> LedgerRecord | None:
        """Apply a settlement once; return the updated record, or None if nothing changed."""
        record = self.records.get(request_id)
        if record is None or record.state is RecordState.SETTLED:
            return None
        self._release(record)
        spent, team, cost = self._spent, record.team, settlement.cost
        for key in record.windows.values():
            spent[team, key] = spent.get((team, key), 0) + cost
        entry = self._rate_index.get(request_id)
        if entry is not None:
            actual = settlement.prompt_tokens + settlement.completion_tokens
            self._rate_tokens[record.team] += actual - entry.tokens
            entry.tokens = actual
        if record.key_id is not None and self._keys:
            scope = self._keys.get((record.team, record.key_id))
            if scope is not None:
                scope.retokened(request_id, settlement.prompt_tokens + settlement.completion_tokens)
        apply_settlement(record, settlement)
        return record

    def renew(self, request_id: str, lease_until: float, now: float) -> None:
        """Extend a live lease; one that ran out by ``now`` is released, never revived."""
        record = self.records.get(request_id)
        if record is None or request_id not in self._live.get(record.team, ()):
            return
        if record.lease_until <= now:
            self._release_slot(record)
            return
        record.lease_until = max(record.lease_until, lease_until)

    def release_slot(self, request_id: str) -> None:
        """Free a request's concurrency slot now (its client left); the money stays reserved."""
        record = self.records.get(request_id)
        if record is not None:
            self._release_slot(record)

    def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct`` (a settled record still held in memory)."""
        record = self.records.get(request_id)
        if record is None or record.state is not RecordState.SETTLED:
            return None
        delta = settlement.cost - record.cost
        for key in record.windows.values():
            self.add_spent(record.team, key, delta)
        apply_correction(record, settlement)
        return delta

    def note_upstream_id(self, request_id: str, upstream_id: str) -> LedgerRecord | None:
        """Note the upstream id of an unsettled record; return it (None if settled/unknown)."""
        record = self.records.get(request_id)
        if record is None or record.state is RecordState.SETTLED:
            return None
        record.upstream_id = upstream_id
        return record

    def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        self._expire(team, now)
        return {
            key: WindowUsage(
                spent=self._spent.get((team, key), 0),
                reserved=self._reserved.get((team, key), 0),
            )
            for key in keys
        }

    def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        log = self._window(team, now)
        return len(log), self._rate_tokens.get(team, 0)

    def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of`` (a scan: the memory backend is for tests and demos)."""
        for record in self.records.values():
            if record.upstream_id == upstream_id:
                return record.team
        return None


class MemoryStore:
    """The ``memory`` backend: state lives and dies with the process (tests, demos)."""

    is_remote = False

    def __init__(self) -> None:
        self.engine: Final = MemoryEngine()
        self._settled: deque[str] = deque()

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def reserve(self, request: ReserveRequest) -> Counted:
        """See ``Store.reserve``."""
        return self.engine.reserve(request)

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """See ``Store.settle``."""
        return self.settle_nowait(request_id, settlement)

    def settle_nowait(self, request_id: str, settlement: Settlement) -> bool:
        """See ``LocalStore.settle_nowait`` (nothing to persist)."""
        record = self.engine.settle(request_id, settlement)
        if record is None:
            return False
        self._settled.append(request_id)
        while len(self._settled) > _MAX_SETTLED_KEPT:
            self.engine.records.pop(self._settled.popleft(), None)
        return True

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew``."""
        self.engine.renew(request_id, now + lease_seconds, now)

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot``."""
        self.engine.release_slot(request_id)

    def release_slot_nowait(self, request_id: str) -> None:
        """See ``LocalStore.release_slot_nowait``."""
        self.engine.release_slot(request_id)

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id``."""
        self.engine.note_upstream_id(request_id, upstream_id)

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct``."""
        return self.engine.correct(request_id, settlement)

    def note_upstream_id_nowait(self, request_id: str, upstream_id: str) -> None:
        """See ``LocalStore.note_upstream_id_nowait`` (nothing to persist)."""
        self.engine.note_upstream_id(request_id, upstream_id)

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        return self.engine.usage(team, keys, now)

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        return self.engine.rates(team, now)

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``Store.record``."""
        return self.engine.records.get(request_id)

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of``."""
        return self.engine.owner_of(upstream_id)

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``Store.dispatched``."""
        return [r for r in self.engine.records.values() if r.state is RecordState.DISPATCHED]

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``Store.records``."""
        found = [r for r in self.engine.records.values() if since <= r.created_at < until]
        return sorted(found, key=lambda r: r.created_at)


_STORE_CHECK: type[LocalStore] = MemoryStore


def _rpm_wait(log: deque[_RateEntry], limit: int | None, now: float) -> float:
    """Seconds until one more request fits the RPM ``limit`` (0 when it fits now)."""
    if limit is None or len(log) + 1 <= limit:
        return 0.0
    return log[0].at + RATE_WINDOW_SECONDS - now if log else RATE_WINDOW_SECONDS


def _tpm_wait(
    log: deque[_RateEntry], limit: int | None, tokens: int, now: float, total: int
) -> float:
    """Seconds until ``tokens`` more fit the TPM ``limit`` as the minute's entries age out."""
    if limit is None or total + tokens <= limit:
        return 0.0
    if tokens > limit:
        return RATE_WINDOW_SECONDS
    for entry in log:
        total -= entry.tokens
        if total + tokens <= limit:
            return max(entry.at + RATE_WINDOW_SECONDS - now, 0.001)
    return RATE_WINDOW_SECONDS  # pragma: no cover - the loop always frees enough

"""Stateful property test of every Store backend against a simple model.

Rules: reserve (new ids and replays), settle (a cost below, at or a bit above the reservation),
settle again, let time pass (leases expire), renew, and for sqlite a restart. After every step:

- each window's spent equals the sum of the settled costs charged to it (exactly);
- each window's reserved equals the model's unsettled reservations (exactly: a lease that ran
  out frees its concurrency slot, never its money, until it is settled);
- admission alone never overcommits: spent + reserved ≤ limit + the overshoot of settled costs
  above their reservations;
- no id is settled twice, and the unsettled records are exactly the model's.

Redis runs on the server's clock, so its machine never lets time pass (leases stay live).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from clipia_proxy.config import StoreConfig
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import (
    Micro,
    Period,
    RecordState,
    ReserveRequest,
    Settlement,
    TeamLimits,
)
from clipia_proxy.quotas.redis import RedisStore
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import Store
from tests.conftest import fresh_postgres_schema
from tests.harness import decided

_T = TypeVar("_T")

TEAM = "t"
LIMITS = TeamLimits(budgets={Period.DAY: Micro(2_000), Period.MONTH: Micro(3_500)}, concurrency=6)
DAYS = ["day:2026-11-24", "day:2026-11-25"]
MONTH = "month:2026-11"
WINDOWS = [*DAYS, MONTH]
LIMIT_OF = {DAYS[0]: 2_000, DAYS[1]: 2_000, MONTH: 3_500}
T0 = 1_795_000_000.0


@dataclass
class Entry:
    amount: int
    windows: list[str]
    lease_until: float
    lease_in_file: float
    cost: int | None = None


class StoreMachine(RuleBasedStateMachine):
    """The model and the store under test (``backend`` is set by a subclass factory)."""

    backend = "memory"
    redis_url = ""
    postgres_dsn = ""

    ids = Bundle("ids")
    settled_ids = Bundle("settled_ids")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = T0
        self.entries: dict[str, Entry] = {}
        self.tmp: str | None = None
        self.prefix = f"hyp-{uuid.uuid4().hex[:10]}"
        self.store: Store = self.run(self._open())

    # -- plumbing ----------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Store:
        store: Store
        if self.backend == "memory":
            store = MemoryStore()
        elif self.backend == "sqlite":
            if self.tmp is None:
                self.tmp = tempfile.mkdtemp(prefix="clipia-hyp-")
            store = SqliteStore(Path(self.tmp) / "ledger.db", clock=lambda: self.now)
        else:
            dsn = await fresh_postgres_schema(self.postgres_dsn)
            store = RedisStore.from_config(
                StoreConfig(backend="redis", redis_key_prefix=self.prefix),
                PostgresLedger(dsn),
                url=self.redis_url,
            )
        await store.start()
        return store

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def live(self, entry: Entry) -> bool:
        return entry.cost is None and entry.lease_until > self.now

    # -- rules -------------------------------------------------------------------------------
    @rule(
        target=ids,
        amount=st.integers(min_value=1, max_value=900),
        day=st.sampled_from(DAYS),
        lease=st.sampled_from([5.0, 30.0, 120.0]),
    )
    def reserve(self, amount: int, day: str, lease: float) -> str:
        rid = f"r-{uuid.uuid4().hex[:8]}"
        windows = {Period.DAY: day, Period.MONTH: MONTH}
        if self.backend == "redis":
            lease = 600.0
        result = self.run(
            decided(
                self.store,
                ReserveRequest(
                    request_id=rid,
                    team=TEAM,
                    amount=Micro(amount),
                    tokens=10,
                    periods=windows,
                    now=self.now,
                    lease_seconds=lease,
                    limits=LIMITS,
                ),
            )
        )
        assert not result.replayed
        live = [e for e in self.entries.values() if self.live(e)]
        held = [e for e in self.entries.values() if e.cost is None]
        fits = len(live) + 1 <= 6 and all(
            self.spent(w) + sum(e.amount for e in held if w in e.windows) + amount <= LIMIT_OF[w]
            for w in (day, MONTH)
        )
        # The store admits exactly when the model says everything fits.
        assert result.admitted == fits, (result, fits)
        if result.admitted:
            until = self.now + lease
            self.entries[rid] = Entry(amount, [day, MONTH], until, until)
        return rid

    @rule(rid=ids)
    def replay(self, rid: str) -> None:
        entry = self.entries.get(rid)
        if entry is None:
            return  # a refused id: reserving it again is a fresh decision, not a replay
        result = self.run(
            decided(
                self.store,
                ReserveRequest(
                    request_id=rid,
                    team=TEAM,
                    amount=Micro(entry.amount),
                    tokens=10,
                    periods={Period.DAY: entry.windows[0], Period.MONTH: MONTH},
                    now=self.now,
                    lease_seconds=60,
                    limits=LIMITS,
                ),
            )
        )
        assert result.admitted
        assert result.replayed

    @rule(target=settled_ids, rid=consumes(ids), ratio=st.sampled_from([0, 0.25, 0.5, 1, 1.1, 1.2]))
    def settle(self, rid: str, ratio: float) -> str:
        entry = self.entries.get(rid)
        cost = int((entry.amount if entry else 100) * ratio)
        applied = self.run(self.store.settle(rid, Settlement(cost=Micro(cost), now=self.now)))
        if entry is None:
            assert not applied
            return rid
        assert applied
        entry.cost = cost
        return rid

    @rule(rid=settled_ids, cost=st.integers(min_value=0, max_value=5_000))
    def settle_again(self, rid: str, cost: int) -> None:
        assert not self.run(self.store.settle(rid, Settlement(cost=Micro(cost), now=self.now)))

    @precondition(lambda self: self.backend != "redis")
    @rule(seconds=st.sampled_from([1.0, 10.0, 40.0, 200.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(rid=ids, lease=st.sampled_from([10.0, 100.0]))
    def renew(self, rid: str, lease: float) -> None:
        self.run(self.store.renew(rid, self.now, lease))
        entry = self.entries.get(rid)
        if entry is not None and self.live(entry) and self.backend != "redis":
            entry.lease_until = max(entry.lease_until, self.now + lease)

    @precondition(lambda self: self.backend == "sqlite")
    @rule()
    def restart(self) -> None:
        self.run(self.store.close())
        self.store = self.run(self._open())
        for entry in self.entries.values():
            entry.lease_until = entry.lease_in_file  # renewals live in memory only

    # -- invariants --------------------------------------------------------------------------
    def spent(self, window: str) -> int:
        return sum(e.cost or 0 for e in self.entries.values() if window in e.windows)

    @invariant()
    def accounts_balance(self) -> None:
        usage = self.run(self.store.usage(TEAM, WINDOWS, self.now))
        for window in WINDOWS:
            in_window = [e for e in self.entries.values() if window in e.windows]
            held = sum(e.amount for e in in_window if e.cost is None)
            assert usage[window].spent == self.spent(window)
            assert usage[window].reserved == held
            overshoot = sum(
                max((e.cost or 0) - e.amount, 0) for e in in_window if e.cost is not None
            )
            assert usage[window].spent + usage[window].reserved <= LIMIT_OF[window] + overshoot

    @invariant()
    def ledger_matches(self) -> None:
        dispatched = self.run(self.store.dispatched())
        assert {r.request_id for r in dispatched} == {
            rid for rid, e in self.entries.items() if e.cost is None
        }
        assert all(r.state is RecordState.DISPATCHED for r in dispatched)


def machine(backend: str, redis_url: str = "", postgres_dsn: str = "") -> type[StoreMachine]:
    return type(
        f"{backend.title()}StoreMachine",
        (StoreMachine,),
        {"backend": backend, "redis_url": redis_url, "postgres_dsn": postgres_dsn},
    )


COMMON = {
    "deadline": None,
    "stateful_step_count": 30,
    "suppress_health_check": [HealthCheck.too_slow],
}


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_store_state_machine(backend: str) -> None:
    run_state_machine_as_test(
        machine(backend),
        settings=settings(max_examples=50, **COMMON),  # type: ignore[arg-type]
    )


def test_redis_store_state_machine(redis_url: str, postgres_dsn: str) -> None:
    run_state_machine_as_test(
        machine("redis", redis_url, postgres_dsn),
        settings=settings(max_examples=15, **COMMON),  # type: ignore[arg-type]
    )

"""One contract suite for every ``Store`` backend: memory, sqlite and redis.

Each sentence of the ``Store`` docstring (and of ``reserve``/``settle``/``renew``) is a test,
run against all three backends. Memory and sqlite run on the ``now`` passed in; Redis runs on
the server's ``TIME``, so the harness advances a fake clock for the first two and really
waits (briefly) for Redis.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from clipia_proxy.config import StoreConfig
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.quotas import sqlite as sqlite_module
from clipia_proxy.quotas.ledgered import EngineStore
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import (
    KeyLimits,
    Micro,
    Outcome,
    Period,
    Reason,
    RecordState,
    ReserveRequest,
    Settlement,
    TeamLimits,
    UsageSource,
)
from clipia_proxy.quotas.redis import RedisStore
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import Store, StoreUnavailable
from tests.conftest import fresh_postgres_schema
from tests.fault_proxy import FaultProxy
from tests.harness import BOUND, STORE_TIMEOUT, Clock, decided

TEAM = "team-a"
DAY = "day:2026-11-25"
MONTH = "month:2026-11"
PERIODS = {Period.DAY: DAY, Period.MONTH: MONTH}
T0 = 1_795_000_020.0  # a whole minute (T0 % 60 == 0) in 2026-11


class Harness:
    """A store under test and its notion of time."""

    def __init__(self, kind: str, store: Store, clock: Clock, tmp: Path, prefix: str) -> None:
        self.kind = kind
        self.store = store
        self.clock = clock
        self.tmp = tmp
        self.prefix = prefix

    @property
    def server_clock(self) -> bool:
        """Whether leases and windows run on the store's own clock (Redis)."""
        return self.kind.startswith("redis")

    @property
    def now(self) -> float:
        return time.time() if self.server_clock else self.clock.t

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the store."""
        if self.server_clock:
            await asyncio.sleep(seconds)
        else:
            self.clock.t += seconds

    def request(
        self,
        request_id: str | None = None,
        *,
        amount: int = 1000,
        tokens: int = 100,
        limits: TeamLimits | None = None,
        lease: float = 60.0,
        shadow: bool = False,
        periods: dict[Period, str] | None = None,
        team: str = TEAM,
        key_id: str = "key-1",
        key_limits: KeyLimits | None = None,
    ) -> ReserveRequest:
        return ReserveRequest(
            request_id=request_id or f"req-{uuid.uuid4().hex[:12]}",
            team=team,
            amount=Micro(amount),
            tokens=tokens,
            periods=dict(PERIODS if periods is None else periods),
            now=self.now,
            lease_seconds=lease,
            limits=limits or TeamLimits(),
            enforce=not shadow,
            model="gpt-5.5",
            key_id=key_id,
            key_limits=key_limits,
            stream=True,
        )

    async def reserved(self, key: str = DAY, team: str = TEAM) -> int:
        return (await self.store.usage(team, [key], self.now))[key].reserved

    async def spent(self, key: str = DAY, team: str = TEAM) -> int:
        return (await self.store.usage(team, [key], self.now))[key].spent


def settlement(cost: int, **kwargs: Any) -> Settlement:
    return Settlement(cost=Micro(cost), **kwargs)


async def make_sqlite(path: Path, clock: Clock) -> SqliteStore:
    store = SqliteStore(path, clock=clock)
    await store.start()
    return store


async def make_redis(
    url: str, prefix: str, postgres_dsn: str, *, seconds: float = STORE_TIMEOUT, start: bool = True
) -> RedisStore:
    """Redis counters over a PostgreSQL ledger in a fresh schema."""
    dsn = await fresh_postgres_schema(postgres_dsn)
    store = RedisStore.from_config(
        StoreConfig(backend="redis", redis_key_prefix=prefix, timeout_seconds=seconds),
        PostgresLedger(dsn),
        url=url,
    )
    if start:
        await store.start()
    return store


@pytest.fixture(params=["memory", "sqlite", "memory+postgres", "sqlite+postgres", "redis+postgres"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """Every counters and ledger combination (``counters+ledger``; alone: the same store).

    memory and sqlite counters over the PostgreSQL ledger are one implementation.
    """
    clock = Clock(T0)
    kind: str = request.param
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    store: Store
    if kind == "memory":
        store = MemoryStore()
        await store.start()
    elif kind == "sqlite":
        store = await make_sqlite(tmp_path / "ledger.db", clock)
    elif kind == "redis+postgres":
        url: str = request.getfixturevalue("redis_url")
        store = await make_redis(url, prefix, request.getfixturevalue("postgres_dsn"))
    else:
        dsn = await fresh_postgres_schema(request.getfixturevalue("postgres_dsn"))
        store = EngineStore(PostgresLedger(dsn), clock=clock)
        await store.start()
    harness = Harness(kind, store, clock, tmp_path, prefix)
    try:
        yield harness
    finally:
        await harness.store.close()


# -- reserve: admission writes the record ----------------------------------------------------


async def test_admission_writes_a_dispatched_record(h: Harness) -> None:
    before = h.now
    req = h.request("r1", amount=1234, tokens=77, lease=60)
    result = await decided(h.store, req)
    assert result.admitted
    assert result.reason is None
    assert not result.replayed
    record = await h.store.record("r1")
    assert record is not None
    assert record.state is RecordState.DISPATCHED
    assert (record.team, record.key_id, record.model, record.stream) == (
        TEAM,
        "key-1",
        "gpt-5.5",
        True,
    )
    assert (record.reserved, record.tokens_reserved) == (1234, 77)
    assert record.windows == PERIODS
    assert before - 1 <= record.created_at <= h.now + 1
    assert record.lease_until == pytest.approx(record.created_at + 60, abs=0.01)
    assert record.cost == 0
    assert record.outcome is None
    assert [r.request_id for r in await h.store.dispatched()] == ["r1"]
    usage = await h.store.usage(TEAM, [DAY, MONTH, "week:2026-W48"], h.now)
    assert usage[DAY].reserved == usage[MONTH].reserved == 1234
    assert usage[DAY].spent == usage[MONTH].spent == 0
    assert usage["week:2026-W48"].reserved == 0
    assert await h.store.rates(TEAM, h.now) == (1, 77)


async def test_budget_refusal_is_all_or_nothing_across_periods(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(10_000), Period.MONTH: Micro(1_500)})
    assert (await decided(h.store, h.request("a", amount=1_000, limits=limits))).admitted
    refused = await decided(h.store, h.request("b", amount=600, limits=limits))
    assert not refused.admitted
    assert refused.reason is Reason.BUDGET
    assert refused.period is Period.MONTH
    assert (refused.limit, refused.used) == (1_500, 1_000)
    # The day window had room, yet nothing was reserved on it either.
    assert await h.reserved(DAY) == 1_000
    assert await h.reserved(MONTH) == 1_000
    assert await h.store.record("b") is None
    assert [r.request_id for r in await h.store.dispatched()] == ["a"]
    assert await h.store.rates(TEAM, h.now) == (1, 100)


async def test_budget_refusal_on_the_day_leaves_the_month_untouched(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(999), Period.MONTH: Micro(10**9)})
    refused = await decided(h.store, h.request("x", amount=1_000, limits=limits))
    assert (refused.admitted, refused.reason, refused.period) == (False, Reason.BUDGET, Period.DAY)
    assert await h.reserved(DAY) == 0
    assert await h.reserved(MONTH) == 0
    assert await h.store.rates(TEAM, h.now) == (0, 0)
    assert await h.store.dispatched() == []
    assert await h.store.records(since=0, until=h.now + 3600) == []


async def test_budget_admits_exactly_to_the_limit(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(3_000)})
    for i in range(3):
        result = await decided(h.store, h.request(f"r{i}", amount=1_000, limits=limits))
        assert result.admitted
        assert result.budget_remaining == 3_000 - 1_000 * (i + 1)
        assert result.budget_period is Period.DAY
    refused = await decided(h.store, h.request("r3", amount=1, limits=limits))
    assert (refused.admitted, refused.used, refused.limit) == (False, 3_000, 3_000)


async def test_tightest_period_reported(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(5_000), Period.MONTH: Micro(2_000)})
    result = await decided(h.store, h.request("r", amount=500, limits=limits))
    assert (result.budget_remaining, result.budget_period) == (1_500, Period.MONTH)


async def test_reserve_is_idempotent_by_request_id(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(1_000)}, rpm=1, concurrency=1)
    first = await decided(h.store, h.request("same", amount=1_000, limits=limits))
    assert first.admitted
    assert not first.replayed
    # A retry (lost reply) of the same id: nothing applied twice, even though a new request
    # would now be refused by every limit.
    again = await decided(h.store, h.request("same", amount=1_000, limits=limits))
    assert again.admitted
    assert again.replayed
    assert await h.reserved(DAY) == 1_000
    assert await h.store.rates(TEAM, h.now) == (1, 100)
    assert len(await h.store.dispatched()) == 1


async def test_reserve_replayed_after_settlement_applies_nothing(h: Harness) -> None:
    assert (await decided(h.store, h.request("done", amount=1_000))).admitted
    assert await h.store.settle("done", settlement(400))
    again = await decided(h.store, h.request("done", amount=1_000))
    assert again.admitted
    assert again.replayed
    assert await h.reserved(DAY) == 0
    assert await h.spent(DAY) == 400
    record = await h.store.record("done")
    assert record is not None
    assert record.state is RecordState.SETTLED


# -- settle ----------------------------------------------------------------------------------


async def test_settle_replaces_the_reservation_by_the_cost(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=1_000))
    assert await h.store.settle(
        "r",
        settlement(
            321,
            prompt_tokens=10,
            completion_tokens=5,
            usage_source=UsageSource.STREAM,
            outcome=Outcome.CLIENT_DISCONNECT,
            upstream_id="chatcmpl-abc",
            now=h.now,
        ),
    )
    usage = await h.store.usage(TEAM, [DAY, MONTH], h.now)
    assert usage[DAY].spent == usage[MONTH].spent == 321
    assert usage[DAY].reserved == usage[MONTH].reserved == 0
    record = await h.store.record("r")
    assert record is not None
    assert record.state is RecordState.SETTLED
    assert (record.cost, record.prompt_tokens, record.completion_tokens) == (321, 10, 5)
    assert record.usage_source == "stream"
    assert record.outcome is Outcome.CLIENT_DISCONNECT
    assert record.upstream_id == "chatcmpl-abc"
    assert record.settled_at is not None
    assert record.reserved == 1_000
    assert await h.store.dispatched() == []
    assert await h.store.owner_of("chatcmpl-abc") == TEAM
    assert await h.store.owner_of("chatcmpl-unknown") is None


async def test_settle_above_the_reservation_charges_the_cost(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=1_000))
    assert await h.store.settle("r", settlement(1_700))
    assert await h.spent(MONTH) == 1_700
    assert await h.reserved(MONTH) == 0


async def test_settle_is_idempotent(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=1_000))
    assert await h.store.settle("r", settlement(250, upstream_id="chatcmpl-1"))
    assert not await h.store.settle("r", settlement(999, upstream_id="chatcmpl-2"))
    assert await h.spent(DAY) == 250
    assert await h.reserved(DAY) == 0
    record = await h.store.record("r")
    assert record is not None
    assert (record.cost, record.upstream_id) == (250, "chatcmpl-1")
    assert await h.store.owner_of("chatcmpl-2") is None


async def test_settle_unknown_id_is_false(h: Harness) -> None:
    assert not await h.store.settle("never-reserved", settlement(5))
    assert await h.spent(DAY) == 0


async def test_settle_at_zero_frees_the_budget(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(1_000)})
    await decided(h.store, h.request("a", amount=1_000, limits=limits))
    assert not (await decided(h.store, h.request("b", amount=1_000, limits=limits))).admitted
    await h.store.settle("a", settlement(0, outcome=Outcome.NOT_SENT))
    assert (await decided(h.store, h.request("b", amount=1_000, limits=limits))).admitted


# -- leases ----------------------------------------------------------------------------------


async def test_lease_expiry_frees_concurrency_but_the_money_stays_reserved_until_settled(
    h: Harness,
) -> None:
    """A crashed request's lease frees its slot; its money counts until it is settled.

    Between the lease's end and the reconciler's settlement the spend must count somewhere:
    released at the lease's end, it was neither reserved nor spent (a budget hole).
    """
    limits = TeamLimits(budgets={Period.DAY: Micro(1_500)}, concurrency=1)
    assert (
        await decided(h.store, h.request("old", amount=1_000, lease=0.05, limits=limits))
    ).admitted
    refused = await decided(h.store, h.request("new", amount=100, limits=limits))
    assert not refused.admitted
    assert refused.reason is Reason.CONCURRENCY
    await h.advance(0.15)
    assert await h.reserved(DAY) == 1_000  # no budget hole
    over = await decided(h.store, h.request("big", amount=600, limits=limits))
    assert (over.admitted, over.reason) == (False, Reason.BUDGET)
    assert (await decided(h.store, h.request("new", amount=100, limits=limits))).admitted
    old = await h.store.record("old")
    assert old is not None
    assert old.state is RecordState.DISPATCHED
    assert {r.request_id for r in await h.store.dispatched()} == {"old", "new"}
    # The late settlement releases the old money once and charges its cost once; the live
    # reservation of "new" stays.
    assert await h.store.settle("old", settlement(400))
    usage = (await h.store.usage(TEAM, [DAY], h.now))[DAY]
    assert (usage.spent, usage.reserved) == (400, 100)
    assert not await h.store.settle("old", settlement(400))
    usage = (await h.store.usage(TEAM, [DAY], h.now))[DAY]
    assert (usage.spent, usage.reserved) == (400, 100)


async def test_release_slot_frees_concurrency_not_money(h: Harness) -> None:
    limits = TeamLimits(concurrency=1)
    await decided(h.store, h.request("gone", amount=700, limits=limits))
    assert not (await decided(h.store, h.request("next", limits=limits))).admitted
    await h.store.release_slot("gone")
    assert await h.reserved(DAY) == 700
    assert (await decided(h.store, h.request("next", amount=100, limits=limits))).admitted
    await h.store.release_slot("gone")  # twice: harmless
    await h.store.renew("gone", h.now, 30.0)  # never revived by a renewal
    assert not (await decided(h.store, h.request("third", limits=limits))).admitted
    assert await h.store.settle("gone", settlement(300))
    assert (await h.spent(DAY), await h.reserved(DAY)) == (300, 100)


async def test_correct_moves_a_settled_cost_and_its_windows_spent(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=1_000))
    assert await h.store.correct("r", settlement(5)) is None  # not settled: nothing to correct
    await h.store.settle("r", settlement(400, upstream_id="chatcmpl-x", prompt_tokens=1))
    fixed = Settlement(
        cost=Micro(550),
        prompt_tokens=3,
        completion_tokens=4,
        usage_source=UsageSource.GENERATION,
        upstream_id="chatcmpl-x",
    )
    assert await h.store.correct("r", fixed) == 150
    assert (await h.spent(DAY), await h.reserved(DAY)) == (550, 0)
    record = await h.store.record("r")
    assert record is not None
    assert (record.cost, record.prompt_tokens, record.completion_tokens) == (550, 3, 4)
    assert (record.usage_source, record.outcome) == ("generation", Outcome.COMPLETED)
    assert await h.store.correct("unknown", fixed) is None


async def test_note_upstream_id_is_durable_before_settlement(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=700))
    await h.store.note_upstream_id("r", "chatcmpl-abc")
    if h.kind == "sqlite":  # from the file, not from memory
        await h.store.close()
        h.store = await make_sqlite(h.tmp / "ledger.db", h.clock)
    (record,) = await h.store.dispatched()
    assert (record.request_id, record.upstream_id) == ("r", "chatcmpl-abc")
    assert await h.store.owner_of("chatcmpl-abc") == TEAM
    assert await h.store.settle("r", settlement(300, upstream_id="chatcmpl-abc"))
    await h.store.note_upstream_id("r", "chatcmpl-other")  # settled: no-op
    settled = await h.store.record("r")
    assert settled is not None
    assert settled.upstream_id == "chatcmpl-abc"


async def test_sqlite_note_upstream_id_nowait_joins_the_turn(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    await decided(store, sq.request("r", amount=700))
    store.note_upstream_id_nowait("r", "chatcmpl-abc")
    # The next read is queued after the write: it sees it committed.
    record = await store.record("r")
    assert record is not None
    assert record.upstream_id == "chatcmpl-abc"


async def test_renew_extends_a_live_lease(h: Harness) -> None:
    limits = TeamLimits(concurrency=1)
    await decided(h.store, h.request("long", amount=500, lease=0.3, limits=limits))
    await h.advance(0.1)
    await h.store.renew("long", h.now, 30.0)
    await h.advance(0.4)
    assert await h.reserved(DAY) == 500
    refused = await decided(h.store, h.request("other", limits=limits))
    assert refused.reason is Reason.CONCURRENCY
    record = await h.store.record("long")
    assert record is not None
    if h.kind != "sqlite":  # sqlite keeps leases in memory only (see the report)
        assert record.lease_until >= h.now + 25


async def test_renew_does_not_revive_an_expired_lease(h: Harness) -> None:
    limits = TeamLimits(concurrency=1)
    await decided(h.store, h.request("gone", amount=500, lease=0.05, limits=limits))
    await h.advance(0.15)
    # No other operation ran since the lease ran out: a renew must not bring it back.
    await h.store.renew("gone", h.now, 30.0)
    assert await h.reserved(DAY) == 500  # the money waits for its settlement
    assert (await decided(h.store, h.request("next", limits=limits))).admitted


async def test_renew_after_settlement_is_a_no_op(h: Harness) -> None:
    await decided(h.store, h.request("r", amount=500))
    await h.store.settle("r", settlement(100))
    await h.store.renew("r", h.now, 30.0)
    assert await h.reserved(DAY) == 0
    assert await h.store.dispatched() == []


# -- rates and concurrency -------------------------------------------------------------------


async def test_rpm_refuses_with_retry_after(h: Harness) -> None:
    limits = TeamLimits(rpm=3)
    for i in range(3):
        result = await decided(h.store, h.request(f"r{i}", limits=limits))
        assert result.admitted
        assert result.requests_remaining == 2 - i
    refused = await decided(h.store, h.request("r3", limits=limits))
    assert (refused.admitted, refused.reason) == (False, Reason.RPM)
    assert (refused.limit, refused.used) == (3, 3)
    assert 50 < refused.retry_after <= 60
    # Settling does not give a request back: RPM counts requests made.
    await h.store.settle("r0", settlement(1))
    assert not (await decided(h.store, h.request("r4", limits=limits))).admitted
    assert (await h.store.rates(TEAM, h.now))[0] == 3


async def test_rpm_sliding_window_has_no_burst_at_the_minute_edge(h: Harness) -> None:
    if h.server_clock:
        pytest.skip("needs an injected clock; Redis windows run on the server's TIME")
    limits = TeamLimits(rpm=3)
    h.clock.t = T0 + 59.5  # half a second before a minute edge
    for i in range(3):
        assert (await decided(h.store, h.request(f"a{i}", limits=limits))).admitted
    h.clock.t = T0 + 60.5  # just after the edge: a fixed window would admit 3 more
    refused = await decided(h.store, h.request("b0", limits=limits))
    assert (refused.admitted, refused.reason) == (False, Reason.RPM)
    assert refused.retry_after == pytest.approx(59.0)
    h.clock.t = T0 + 119.4
    assert not (await decided(h.store, h.request("b1", limits=limits))).admitted
    h.clock.t = T0 + 119.5  # the first three are exactly 60 s old: out of the window
    for i in range(3):
        assert (await decided(h.store, h.request(f"c{i}", limits=limits))).admitted
    assert await h.store.rates(TEAM, h.now) == (3, 300)


async def test_tpm_counts_estimates_then_settled_tokens(h: Harness) -> None:
    limits = TeamLimits(tpm=1_000)
    first = await decided(h.store, h.request("big", tokens=800, limits=limits))
    assert first.admitted
    assert first.tokens_remaining == 200
    refused = await decided(h.store, h.request("more", tokens=300, limits=limits))
    assert (refused.admitted, refused.reason, refused.used) == (False, Reason.TPM, 800)
    assert 50 < refused.retry_after <= 60
    # The settlement corrects the estimate with the tokens actually used.
    await h.store.settle("big", settlement(10, prompt_tokens=120, completion_tokens=80))
    assert await h.store.rates(TEAM, h.now) == (1, 200)
    admitted = await decided(h.store, h.request("more", tokens=300, limits=limits))
    assert admitted.admitted
    assert admitted.tokens_remaining == 500


async def test_tpm_request_larger_than_the_limit_waits_a_full_window(h: Harness) -> None:
    refused = await decided(h.store, h.request("huge", tokens=5_000, limits=TeamLimits(tpm=1_000)))
    assert (refused.admitted, refused.reason, refused.retry_after) == (False, Reason.TPM, 60)


async def test_concurrency_is_a_lease_count(h: Harness) -> None:
    limits = TeamLimits(concurrency=2)
    assert (await decided(h.store, h.request("a", limits=limits))).admitted
    assert (await decided(h.store, h.request("b", limits=limits))).admitted
    refused = await decided(h.store, h.request("c", limits=limits))
    assert (refused.admitted, refused.reason, refused.used, refused.limit) == (
        False,
        Reason.CONCURRENCY,
        2,
        2,
    )
    assert refused.retry_after > 0
    await h.store.settle("a", settlement(1))
    assert (await decided(h.store, h.request("c", limits=limits))).admitted
    # Other teams are not affected.
    assert (await decided(h.store, h.request("z", limits=limits, team="team-b"))).admitted


async def test_concurrent_reserves_never_overcommit(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(10_000)})
    results = await asyncio.gather(
        *(decided(h.store, h.request(f"r{i}", amount=1_000, limits=limits)) for i in range(25))
    )
    assert sum(r.admitted for r in results) == 10
    assert await h.reserved(DAY) == 10_000


# -- shadow ----------------------------------------------------------------------------------


async def test_shadow_admits_and_says_why_it_would_refuse(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.MONTH: Micro(500)}, rpm=5)
    result = await decided(h.store, h.request("s", amount=1_000, limits=limits, shadow=True))
    assert result.admitted
    assert (result.reason, result.period) == (Reason.BUDGET, Period.MONTH)
    assert result.budget_remaining == 0
    assert await h.reserved(MONTH) == 1_000
    record = await h.store.record("s")
    assert record is not None
    assert record.state is RecordState.DISPATCHED


async def test_shadow_rate_limit(h: Harness) -> None:
    limits = TeamLimits(rpm=1)
    assert (await decided(h.store, h.request("a", limits=limits, shadow=True))).reason is None
    second = await decided(h.store, h.request("b", limits=limits, shadow=True))
    assert (second.admitted, second.reason) == (True, Reason.RPM)
    assert await h.store.rates(TEAM, h.now) == (2, 200)


# -- ledger reads ----------------------------------------------------------------------------


async def test_records_are_a_half_open_interval_oldest_first(h: Harness) -> None:
    for name in ("a", "b", "c"):
        await decided(h.store, h.request(name))
        await h.advance(0.02)
    await h.store.settle("b", settlement(7))
    everything = await h.store.records(since=h.now - 3600, until=h.now + 3600)
    assert [r.request_id for r in everything] == ["a", "b", "c"]
    a, b, c = everything
    assert a.created_at < b.created_at < c.created_at
    assert b.state is RecordState.SETTLED
    assert b.cost == 7
    middle = await h.store.records(since=b.created_at, until=c.created_at)
    assert [r.request_id for r in middle] == ["b"]
    assert await h.store.records(since=h.now + 10, until=h.now + 20) == []


async def test_dispatched_lists_only_unsettled_records(h: Harness) -> None:
    for name in ("a", "b", "c"):
        await decided(h.store, h.request(name))
    await h.store.settle("b", settlement(7))
    assert {r.request_id for r in await h.store.dispatched()} == {"a", "c"}
    assert await h.store.record("nope") is None


async def test_large_amounts_are_exact(h: Harness) -> None:
    big = 123_456_789_012_345  # 123 million credits, 15 significant digits
    limits = TeamLimits(budgets={Period.TOTAL: Micro(big * 2 + 1)})
    periods = {Period.TOTAL: "total"}
    result = await decided(h.store, h.request("big", amount=big, limits=limits, periods=periods))
    assert result.admitted
    assert result.budget_remaining == big + 1
    assert await h.reserved("total") == big
    await h.store.settle("big", settlement(big + 7))
    assert await h.spent("total") == big + 7
    record = await h.store.record("big")
    assert record is not None
    assert (record.reserved, record.cost) == (big, big + 7)


# -- sqlite: durability ----------------------------------------------------------------------


@pytest.fixture
async def sq(tmp_path: Path) -> AsyncIterator[Harness]:
    clock = Clock(T0)
    store = await make_sqlite(tmp_path / "ledger.db", clock)
    harness = Harness("sqlite", store, clock, tmp_path, "")
    try:
        yield harness
    finally:
        await harness.store.close()


async def _set_query_only(store: SqliteStore, on: bool) -> None:
    def apply() -> None:
        store._conn().execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")

    await store._run(apply)


async def test_sqlite_state_survives_close_and_reopen(sq: Harness) -> None:
    limits = TeamLimits(rpm=3)
    await decided(sq.store, sq.request("open", amount=1_000, tokens=50, limits=limits, lease=600))
    sq.clock.t += 1
    await decided(sq.store, sq.request("paid", amount=900, tokens=60, limits=limits))
    await sq.store.settle("paid", settlement(700, prompt_tokens=20, completion_tokens=10))
    await sq.store.close()
    sq.clock.t += 5
    reopened = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    sq.store = reopened
    usage = await reopened.usage(TEAM, [DAY, MONTH], sq.now)
    assert usage[DAY].spent == usage[MONTH].spent == 700
    assert usage[DAY].reserved == 1_000  # the open lease is still live after the restart
    assert [r.request_id for r in await reopened.dispatched()] == ["open"]
    assert await reopened.rates(TEAM, sq.now) == (2, 50 + 30)
    assert (await decided(reopened, sq.request("third", limits=limits))).admitted
    refused = await decided(reopened, sq.request("fourth", limits=limits))
    assert (refused.admitted, refused.reason) == (False, Reason.RPM)
    # Settled records were forgotten in memory but stay idempotent through the file.
    assert not await reopened.settle("paid", settlement(1))
    assert (await reopened.usage(TEAM, [DAY], sq.now))[DAY].spent == 700


async def test_sqlite_expired_lease_after_restart_keeps_its_money_reserved(sq: Harness) -> None:
    limits = TeamLimits(concurrency=1)
    await decided(sq.store, sq.request("open", amount=1_000, lease=10))
    await sq.store.close()
    sq.clock.t += 120
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    assert await sq.reserved(DAY) == 1_000  # until the reconciler settles it
    assert await sq.store.rates(TEAM, sq.now) == (0, 0)
    assert [r.request_id for r in await sq.store.dispatched()] == ["open"]
    assert (await decided(sq.store, sq.request("next", limits=limits))).admitted  # no slot held
    assert await sq.store.settle("open", settlement(250))
    assert (await sq.spent(DAY), await sq.reserved(DAY)) == (250, 1000)


async def test_sqlite_failed_write_at_reserve_leaves_nothing(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    limits = TeamLimits(budgets={Period.DAY: Micro(2_000)}, rpm=2, concurrency=1)
    await decided(store, sq.request("earlier", amount=500, tokens=10, limits=limits))
    await store.settle("earlier", settlement(500, prompt_tokens=5, completion_tokens=5))
    await _set_query_only(store, True)
    with pytest.raises(StoreUnavailable):
        await decided(store, sq.request("doomed", amount=1_000, tokens=40, limits=limits))
    assert "doomed" not in store.engine.records
    assert await sq.reserved(DAY) == 0
    assert await store.rates(TEAM, sq.now) == (1, 10)
    await _set_query_only(store, False)
    assert await store.record("doomed") is None
    # Neither the concurrency slot nor the RPM slot nor the budget was kept by the failure.
    again = await decided(store, sq.request("doomed", amount=1_000, tokens=40, limits=limits))
    assert again.admitted
    assert not again.replayed
    assert again.requests_remaining == 0


async def test_sqlite_closed_database_raises_store_unavailable(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    await store._run(store._close)
    with pytest.raises(StoreUnavailable):
        await decided(store, sq.request("x"))
    assert await sq.reserved(DAY) == 0
    assert store.engine.records == {}
    await store._run(store._open)


async def test_sqlite_settle_retries_until_the_write_lands(
    sq: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    monkeypatch.setattr(sqlite_module, "_SETTLE_BACKOFF_SECONDS", 0.02)
    await decided(store, sq.request("r", amount=1_000))
    await _set_query_only(store, True)

    async def heal() -> None:
        await asyncio.sleep(0.1)
        await _set_query_only(store, False)

    settled, _ = await asyncio.gather(store.settle("r", settlement(300)), heal())
    assert settled
    record = await store.record("r")
    assert record is not None
    assert record.state is RecordState.SETTLED
    assert record.cost == 300
    await store.close()
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    assert await sq.spent(DAY) == 300
    assert await sq.store.dispatched() == []


async def _wait_forgotten(store: SqliteStore, request_id: str) -> None:
    async with asyncio.timeout(5):
        while request_id in store.engine.records:  # noqa: ASYNC110 - polls the store's state
            await asyncio.sleep(0.01)


async def test_sqlite_settle_nowait_commits_in_the_background(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    await decided(store, sq.request("r", amount=1_000))
    assert store.settle_nowait("r", settlement(300))
    assert not store.settle_nowait("r", settlement(1))  # exactly once
    # Budgets see the settlement at once, before its write is committed.
    assert (await sq.reserved(DAY), await sq.spent(DAY)) == (0, 300)
    record = await store.record("r")  # a read is queued behind the write
    assert record is not None
    assert (record.state, record.cost) == (RecordState.SETTLED, 300)
    await _wait_forgotten(store, "r")


async def test_sqlite_a_lingering_settlement_commits_on_its_own(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    await decided(store, sq.request("r", amount=1_000))
    assert store.settle_nowait("r", settlement(300))
    assert "r" in store.engine.records  # lingering: not handed to the writer yet
    await _wait_forgotten(store, "r")  # no other call came: the linger timer sent it


async def test_sqlite_a_lingering_settlement_rides_with_the_next_write(
    sq: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    monkeypatch.setattr(sqlite_module, "_LINGER_SECONDS", 60.0)  # the timer never fires here
    await decided(store, sq.request("a", amount=1_000))
    assert store.settle_nowait("a", settlement(300))
    await asyncio.sleep(0.05)
    assert "a" in store.engine.records
    await decided(store, sq.request("b", amount=1_000))  # takes the settlement along, first
    await _wait_forgotten(store, "a")
    record = await store.record("a")
    assert record is not None
    assert (record.state, record.cost) == (RecordState.SETTLED, 300)


async def test_sqlite_settle_nowait_retries_until_the_write_lands(
    sq: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    monkeypatch.setattr(sqlite_module, "_SETTLE_BACKOFF_SECONDS", 0.02)
    await decided(store, sq.request("r", amount=1_000))
    await _set_query_only(store, True)
    assert store.settle_nowait("r", settlement(300))
    await asyncio.sleep(0.1)
    assert "r" in store.engine.records  # not committed yet: still remembered
    await _set_query_only(store, False)
    await _wait_forgotten(store, "r")
    assert "ledger settlement of r failed" in caplog.text
    assert "not committed" not in caplog.text
    await store.close()
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    assert await sq.spent(DAY) == 300
    assert await sq.store.dispatched() == []


async def test_sqlite_settle_nowait_gives_up_and_leaves_the_record_to_the_reconciler(
    sq: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)
    monkeypatch.setattr(sqlite_module, "_SETTLE_BACKOFF_SECONDS", 0.001)
    await decided(store, sq.request("r", amount=1_000))
    await decided(store, sq.request("late", amount=1_000))
    await _set_query_only(store, True)
    assert store.settle_nowait("r", settlement(300))
    async with asyncio.timeout(5):
        while "not committed" not in caplog.text:  # noqa: ASYNC110 - polls the log
            await asyncio.sleep(0.01)
    assert "ledger settlement of r not committed" in caplog.text
    await _set_query_only(store, False)
    await store.close()
    # The store is closed: a settlement now cannot be written either, and says so.
    assert store.settle_nowait("late", settlement(5))
    assert "ledger settlement of late not committed" in caplog.text
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    assert sorted(r.request_id for r in await sq.store.dispatched()) == ["late", "r"]


async def test_sqlite_file_settings(sq: Harness) -> None:
    store = sq.store
    assert isinstance(store, SqliteStore)

    def pragmas() -> tuple[object, ...]:
        db = store._conn()
        return tuple(
            db.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_size", "journal_mode", "synchronous", "wal_autocheckpoint")
        )

    assert await store._run(pragmas) == (1024, "wal", 1, 10_000)  # synchronous 1 = NORMAL


async def test_sqlite_an_existing_file_keeps_its_page_size(tmp_path: Path) -> None:
    path = tmp_path / "old.db"

    def create_old_file() -> None:
        db = sqlite3.connect(path)
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE early (x)")
        db.close()

    await asyncio.to_thread(create_old_file)
    store = await make_sqlite(path, Clock(T0))
    try:
        await decided(
            store,
            ReserveRequest(
                request_id="r",
                team=TEAM,
                amount=Micro(5),
                tokens=1,
                periods={Period.DAY: DAY},
                now=T0,
                lease_seconds=60,
                limits=TeamLimits(),
            ),
        )
        page_size = await store._run(
            lambda: store._conn().execute("PRAGMA page_size").fetchone()[0]
        )
        assert page_size == 4096
        assert (await store.record("r")) is not None
    finally:
        await store.close()


async def test_sqlite_replayed_reserve_after_restart(sq: Harness) -> None:
    await decided(sq.store, sq.request("r", amount=1_000))
    await sq.store.settle("r", settlement(10))
    await sq.store.close()
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    again = await decided(sq.store, sq.request("r", amount=1_000))
    assert again.admitted
    assert again.replayed
    assert await sq.reserved(DAY) == 0


# -- redis: TTLs, lost replies, outages ------------------------------------------------------


@pytest.fixture
async def rd(redis_url: str, postgres_dsn: str) -> AsyncIterator[Harness]:
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    store = await make_redis(redis_url, prefix, postgres_dsn)
    harness = Harness("redis", store, Clock(T0), Path(os.devnull), prefix)
    try:
        yield harness
    finally:
        await harness.store.close()


def shared_ledger(h: Harness) -> PostgresLedger:
    """A second connection pool to the harness store's ledger (another replica's)."""
    assert isinstance(h.store, RedisStore)
    ledger = h.store.ledger
    assert isinstance(ledger, PostgresLedger)
    return PostgresLedger(ledger.dsn)


async def _keys_and_ttls(url: str, prefix: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(url)
    try:
        out: dict[str, int] = {}
        async for key in client.scan_iter(match=f"{{{prefix}:*", count=500):
            out[key.decode()] = await client.ttl(key)
        return out
    finally:
        await client.aclose()


async def test_redis_every_key_has_a_ttl(rd: Harness, redis_url: str) -> None:
    limits = TeamLimits(
        budgets={
            Period.DAY: Micro(10_000),
            Period.MONTH: Micro(10_000),
            Period.TOTAL: Micro(10**9),
        },
        rpm=100,
        tpm=100_000,
        concurrency=3,
    )
    periods = {Period.DAY: DAY, Period.MONTH: MONTH, Period.TOTAL: "total"}
    for i in range(4):
        await decided(rd.store, rd.request(f"r{i}", amount=2_000, limits=limits, periods=periods))
    await decided(rd.store, rd.request("short", amount=10, limits=limits, lease=0.05))
    await rd.store.settle("r0", settlement(1_500, upstream_id="chatcmpl-x", prompt_tokens=3))
    await rd.store.settle("r1", settlement(0, outcome=Outcome.NOT_SENT))
    await rd.store.renew("r2", rd.now, 30)
    await decided(rd.store, rd.request("huge", amount=10**8, limits=limits, periods=periods))
    await asyncio.sleep(0.1)
    await rd.store.usage(TEAM, [DAY, MONTH, "total"], rd.now)  # expires "short"
    await rd.store.settle("short", settlement(10))
    await decided(rd.store, rd.request("ok", limits=limits))
    own = KeyLimits(rpm=10, tpm=100_000, concurrency=3)  # a key's own slots and log
    for name in ("k1", "k2"):
        assert (await decided(rd.store, rd.request(name, key_limits=own))).admitted
    await rd.store.settle("k1", settlement(5, prompt_tokens=2))
    ttls = await _keys_and_ttls(redis_url, rd.prefix)
    assert any(":klive:" in name for name in ttls)
    assert any(":kwsum:" in name for name in ttls)
    assert len(ttls) >= 10, ttls
    # Only the team's epoch and sequence never expire: without the epoch the counters are
    # lost, and the sequence is what a lagging replica is caught by.
    assert {name: ttl for name, ttl in ttls.items() if ttl <= 0} == {
        f"{{{rd.prefix}:{TEAM}}}:epoch": -1,
        f"{{{rd.prefix}:{TEAM}}}:seq": -1,
    }


async def test_redis_lost_reply_retry_applies_nothing_twice(rd: Harness, redis_url: str) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    via_proxy = RedisStore.from_config(
        StoreConfig(backend="redis", redis_key_prefix=rd.prefix, timeout_seconds=1.0),
        shared_ledger(rd),
        url=proxy.url,
    )
    try:
        await via_proxy.start()
        # Load the scripts first, so the lost replies are the scripts' and not NOSCRIPT's.
        await decided(via_proxy, rd.request("warm", team="warm-up"))
        await via_proxy.settle("warm", settlement(1))
        await via_proxy.rates(TEAM, rd.now)  # and the team's counters (its epoch) are there
        proxy.drop_replies = 100  # every reply is cut: the script runs, the caller never hears
        with pytest.raises(StoreUnavailable):
            await decided(via_proxy, rd.request("lost", amount=1_000))
        assert proxy.dropped >= 1
        # The caller's retry (through a healed path) finds its own earlier effect.
        proxy.drop_replies = 0
        again = await decided(via_proxy, rd.request("lost", amount=1_000))
        assert again.admitted
        assert again.replayed
        assert await rd.reserved(DAY) == 1_000
        assert await rd.store.rates(TEAM, rd.now) == (1, 100)

        proxy.drop_replies = 100
        with pytest.raises(StoreUnavailable):
            await via_proxy.settle("lost", settlement(600))
        proxy.drop_replies = 0
        assert not await via_proxy.settle("lost", settlement(600))
        usage = (await rd.store.usage(TEAM, [DAY], rd.now))[DAY]
        assert (usage.spent, usage.reserved) == (600, 0)

        # One lost reply (redis-py does not retry a script by itself): the caller's retry on
        # the same pool is the no-op replay.
        proxy.drop_replies = 1
        with pytest.raises(StoreUnavailable):
            await decided(via_proxy, rd.request("blip", amount=1_000))
        once = await decided(via_proxy, rd.request("blip", amount=1_000))
        assert once.admitted
        assert once.replayed
        assert await rd.reserved(DAY) == 1_000
    finally:
        await via_proxy.close()
        await proxy.close()


async def test_redis_down_raises_store_unavailable_quickly(rd: Harness, redis_url: str) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    store = RedisStore.from_config(
        StoreConfig(backend="redis", redis_key_prefix=rd.prefix, timeout_seconds=0.2),
        shared_ledger(rd),
        url=proxy.url,
    )
    try:
        await store.start()
        proxy.refuse = True
        proxy.cut_all()
        # Bounded (BOUND): a store that retried a refused connection forever hangs here.
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(BOUND):
                await decided(store, rd.request("down"))
        await proxy.close()  # now nothing listens at all
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(BOUND):
                await store.usage(TEAM, [DAY], rd.now)
        assert await rd.store.record("down") is None
    finally:
        await store.close()
        await proxy.close()


async def test_redis_slow_raises_store_unavailable(rd: Harness, redis_url: str) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    store = RedisStore.from_config(
        StoreConfig(backend="redis", redis_key_prefix=rd.prefix, timeout_seconds=0.2),
        shared_ledger(rd),
        url=proxy.url,
    )
    try:
        await store.start()
        proxy.delay = 2.0  # ten times the store's timeout: waiting for the reply would admit it
        with pytest.raises(StoreUnavailable):
            await decided(store, rd.request("slow"))
    finally:
        proxy.delay = 0
        await store.close()
        await proxy.close()


async def test_redis_dead_port(unused_tcp_port: int, postgres_dsn: str) -> None:
    store = await make_redis(
        f"redis://127.0.0.1:{unused_tcp_port}/0", "dead", postgres_dsn, seconds=0.2, start=False
    )
    try:
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(BOUND):  # a refused port, never retried forever
                await store.start()
        with pytest.raises(StoreUnavailable):
            await decided(
                store,
                ReserveRequest(
                    request_id="x",
                    team=TEAM,
                    amount=Micro(1),
                    tokens=1,
                    periods=PERIODS,
                    now=time.time(),
                    lease_seconds=5,
                    limits=TeamLimits(),
                ),
            )
    finally:
        await store.close()


async def test_attribution_is_written_with_the_record(h: Harness) -> None:
    """Environment, tags and end user reach the record on every backend (redis: in the ledger)."""
    req = msgspec.structs.replace(
        h.request("r1"),
        environment="test",
        tags={"service": "indexer"},
        end_user="h:0123",
    )
    assert (await decided(h.store, req)).admitted
    record = await h.store.record("r1")
    assert record is not None
    assert (record.environment, record.tags, record.end_user) == (
        "test",
        {"service": "indexer"},
        "h:0123",
    )


KEY_DAY = f"{DAY}:key:key-1"
KEY_PERIODS_OF_KEY_1 = {**PERIODS, Period.KEY_DAY: KEY_DAY}


async def test_a_key_budget_refuses_and_reserves_nothing_on_the_team(h: Harness) -> None:
    """A key's own budget: refused on the key window, the team's windows untouched."""
    limits = TeamLimits(budgets={Period.DAY: Micro(10**9), Period.KEY_DAY: Micro(1_500)})
    first = h.request("a", amount=1_000, limits=limits, periods=KEY_PERIODS_OF_KEY_1)
    assert (await decided(h.store, first)).admitted
    second = h.request("b", amount=600, limits=limits, periods=KEY_PERIODS_OF_KEY_1)
    refused = await decided(h.store, second)
    assert (refused.admitted, refused.reason, refused.period) == (
        False,
        Reason.BUDGET,
        Period.KEY_DAY,
    )
    assert await h.reserved(DAY) == await h.reserved(KEY_DAY) == 1_000
    assert await h.store.record("b") is None
    # Another key of the team (no key budget) still fits in the team's window.
    other = h.request("c", amount=600, limits=limits)
    assert (await decided(h.store, other)).admitted
    assert await h.reserved(DAY) == 1_600
    assert await h.reserved(KEY_DAY) == 1_000
    # Settling charges the key window and the team's alike.
    assert await h.store.settle("a", Settlement(cost=Micro(700), now=h.now))
    assert await h.spent(DAY) == await h.spent(KEY_DAY) == 700
    assert await h.reserved(KEY_DAY) == 0


async def test_a_team_budget_refusal_reserves_nothing_on_the_key(h: Harness) -> None:
    limits = TeamLimits(budgets={Period.DAY: Micro(999), Period.KEY_DAY: Micro(10**9)})
    request = h.request("x", amount=1_000, limits=limits, periods=KEY_PERIODS_OF_KEY_1)
    refused = await decided(h.store, request)
    assert (refused.admitted, refused.period) == (False, Period.DAY)
    assert await h.reserved(KEY_DAY) == 0
    assert await h.reserved(DAY) == 0


# -- a key's own limits (teams[].keys[].limits) -------------------------------------------------


async def test_a_key_rpm_refuses_that_key_and_leaves_the_team_untouched(h: Harness) -> None:
    own = KeyLimits(rpm=2)
    team = TeamLimits(rpm=10)
    for i in range(2):
        result = await decided(h.store, h.request(f"k{i}", limits=team, key_limits=own))
        assert result.admitted
        assert (result.requests_remaining, result.key_requests_remaining) == (9 - i, 1 - i)
    refused = await decided(h.store, h.request("k2", limits=team, key_limits=own))
    assert (refused.admitted, refused.reason, refused.key) == (False, Reason.RPM, True)
    assert (refused.limit, refused.used) == (2, 2)
    assert 50 < refused.retry_after <= 60
    assert await h.store.record("k2") is None
    assert await h.store.rates(TEAM, h.now) == (2, 200)  # the refusal took no team place
    # The team's other key still has the team's room.
    other = await decided(h.store, h.request("o", limits=team, key_id="key-2"))
    assert (other.admitted, other.requests_remaining, other.key_requests_remaining) == (
        True,
        7,
        None,
    )
    # Settling gives no request back (RPM counts requests made), on the key as on the team.
    await h.store.settle("k0", settlement(1))
    assert not (await decided(h.store, h.request("k3", limits=team, key_limits=own))).admitted


async def test_a_team_refusal_leaves_the_key_untouched(h: Harness) -> None:
    own = KeyLimits(rpm=5, tpm=10_000, concurrency=5)
    first = await decided(h.store, h.request("a", limits=TeamLimits(rpm=1), key_limits=own))
    assert (first.key_requests_remaining, first.key_tokens_remaining) == (4, 9_900)
    refused = await decided(h.store, h.request("b", limits=TeamLimits(rpm=1), key_limits=own))
    assert (refused.admitted, refused.reason, refused.key) == (False, Reason.RPM, False)
    # The key's log and slots have "a" only: the refused "b" left nothing on them.
    again = await decided(h.store, h.request("c", key_limits=own))
    assert (again.key_requests_remaining, again.key_tokens_remaining) == (3, 9_800)
    # A budget refusal (after the rate checks passed) leaves nothing on the key either.
    poor = TeamLimits(budgets={Period.DAY: Micro(1)})
    assert not (await decided(h.store, h.request("d", limits=poor, key_limits=own))).admitted
    last = await decided(h.store, h.request("e", key_limits=own))
    assert (last.key_requests_remaining, last.key_tokens_remaining) == (2, 9_700)


async def test_a_key_tpm_counts_estimates_then_settled_tokens(h: Harness) -> None:
    own = KeyLimits(tpm=1_000)
    first = await decided(h.store, h.request("big", tokens=800, key_limits=own))
    assert (first.key_tokens_remaining, first.tokens_remaining) == (200, None)
    refused = await decided(h.store, h.request("more", tokens=300, key_limits=own))
    assert (refused.admitted, refused.reason, refused.key, refused.used) == (
        False,
        Reason.TPM,
        True,
        800,
    )
    assert 50 < refused.retry_after <= 60
    # Another key of the team is not held back by this key's tokens.
    assert (await decided(h.store, h.request("o", tokens=300, key_id="key-2"))).admitted
    await h.store.settle("big", settlement(10, prompt_tokens=120, completion_tokens=80))
    admitted = await decided(h.store, h.request("more", tokens=300, key_limits=own))
    assert (admitted.admitted, admitted.key_tokens_remaining) == (True, 500)


async def test_a_key_concurrency_is_a_lease_count_of_its_own(h: Harness) -> None:
    own = KeyLimits(concurrency=1)
    team = TeamLimits(concurrency=3)
    assert (await decided(h.store, h.request("a", limits=team, key_limits=own))).admitted
    refused = await decided(h.store, h.request("b", limits=team, key_limits=own))
    assert (refused.admitted, refused.reason, refused.key, refused.used, refused.limit) == (
        False,
        Reason.CONCURRENCY,
        True,
        1,
        1,
    )
    # The team's other key has the team's two other slots.
    assert (await decided(h.store, h.request("o1", limits=team, key_id="key-2"))).admitted
    assert (await decided(h.store, h.request("o2", limits=team, key_id="key-2"))).admitted
    assert not (await decided(h.store, h.request("o3", limits=team, key_id="key-2"))).admitted
    # Freed with the team's slot: by release_slot, by settlement.
    await h.store.release_slot("a")
    assert (await decided(h.store, h.request("b", key_limits=own))).admitted
    await h.store.settle("b", settlement(1))
    assert (await decided(h.store, h.request("c", key_limits=own))).admitted


async def test_a_key_slot_is_freed_when_its_lease_runs_out(h: Harness) -> None:
    own = KeyLimits(concurrency=1)
    assert (await decided(h.store, h.request("a", key_limits=own, lease=0.2))).admitted
    assert not (await decided(h.store, h.request("b", key_limits=own))).admitted
    await h.advance(0.3)
    assert (await decided(h.store, h.request("b", key_limits=own, lease=60))).admitted
    # A renewed lease keeps the key's slot too.
    await h.store.renew("b", h.now, 600)
    await h.advance(0.1)
    assert not (await decided(h.store, h.request("c", key_limits=own))).admitted


async def test_concurrent_reserves_never_overcommit_a_key(h: Harness) -> None:
    own = KeyLimits(concurrency=4)
    results = await asyncio.gather(
        *(decided(h.store, h.request(f"r{i}", key_limits=own)) for i in range(12))
    )
    assert sum(r.admitted for r in results) == 4
    assert all(r.key for r in results if not r.admitted)


async def test_shadow_says_a_key_would_be_refused(h: Harness) -> None:
    own = KeyLimits(rpm=1)
    assert (await decided(h.store, h.request("a", key_limits=own, shadow=True))).admitted
    result = await decided(h.store, h.request("b", key_limits=own, shadow=True))
    assert (result.admitted, result.reason, result.key) == (True, Reason.RPM, True)


async def test_sqlite_a_keys_minute_survives_close_and_reopen(sq: Harness) -> None:
    own = KeyLimits(rpm=2, concurrency=1)
    await decided(sq.store, sq.request("open", key_limits=own, lease=600))
    await sq.store.close()
    sq.clock.t += 5
    sq.store = await make_sqlite(sq.tmp / "ledger.db", sq.clock)
    refused = await decided(sq.store, sq.request("next", key_limits=own))
    assert (refused.reason, refused.key) == (Reason.CONCURRENCY, True)  # "open" holds its slot
    assert await sq.store.settle("open", settlement(1))
    assert (await decided(sq.store, sq.request("next", key_limits=own))).admitted
    assert await sq.store.settle("next", settlement(1))
    refused = await decided(sq.store, sq.request("third", key_limits=own))  # "open" + "next"
    assert (refused.reason, refused.key) == (Reason.RPM, True)


async def test_redis_a_keys_slots_and_minute_are_rebuilt_from_the_ledger(
    rd: Harness, redis_url: str
) -> None:
    own = KeyLimits(rpm=2, concurrency=1)
    assert (await decided(rd.store, rd.request("open", key_limits=own, lease=600))).admitted
    client = aioredis.Redis.from_url(redis_url)
    try:  # the counters are lost (a flush of this prefix)
        names = [name async for name in client.scan_iter(match=f"{{{rd.prefix}:*")]
        await client.delete(*names)
    finally:
        await client.aclose()
    refused = await decided(rd.store, rd.request("next", key_limits=own))  # rebuilds first
    assert (refused.reason, refused.key) == (Reason.CONCURRENCY, True)
    assert await rd.store.settle("open", settlement(1))
    assert (await decided(rd.store, rd.request("next", key_limits=own))).admitted
    assert await rd.store.settle("next", settlement(1))
    refused = await decided(rd.store, rd.request("third", key_limits=own))
    assert (refused.reason, refused.key) == (Reason.RPM, True)

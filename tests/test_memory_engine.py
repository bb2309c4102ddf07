"""The memory engine's running TPM sum stays equal to its 60-second log, whatever happens."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from clipia_proxy.quotas.memory import MemoryEngine
from clipia_proxy.quotas.model import Micro, Period, ReserveRequest, Settlement, TeamLimits

LIMITS = TeamLimits(tpm=10_000_000)
STEP = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 500)),
    st.tuples(st.just("settle"), st.integers(0, 500)),
    st.tuples(st.just("unreserve"), st.integers(0, 0)),
    st.tuples(st.just("wait"), st.integers(1, 40)),
)


def _request(
    rid: str, now: float, *, amount: int, tokens: int, lease: float, limits: TeamLimits
) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid,
        team="t",
        amount=Micro(amount),
        tokens=tokens,
        periods={Period.TOTAL: "total"},
        now=now,
        lease_seconds=lease,
        limits=limits,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, max_size=60))
def test_running_token_sum_matches_the_log(steps: list[tuple[str, int]]) -> None:
    engine = MemoryEngine()
    now = 1_000.0
    issued: list[str] = []
    for index, (kind, value) in enumerate(steps):
        if kind == "reserve":
            rid = f"r{index}"
            engine.reserve(_request(rid, now, amount=1, tokens=value, lease=600, limits=LIMITS))
            issued.append(rid)
        elif kind == "settle" and issued:
            engine.settle(
                issued[value % len(issued)],
                Settlement(cost=Micro(1), prompt_tokens=value, completion_tokens=1, now=now),
            )
        elif kind == "unreserve" and issued:
            engine.unreserve(issued.pop())
        elif kind == "wait":
            now += value
        requests, tokens = engine.rates("t", now)
        log = list(engine._rates.get("t", ()))
        assert tokens == sum(entry.tokens for entry in log)
        assert requests == len(log)


LEASE_STEP = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 100)),  # lease seconds
    st.tuples(st.just("settle"), st.integers(0, 500)),
    st.tuples(st.just("renew"), st.integers(0, 500)),
    st.tuples(st.just("unreserve"), st.integers(0, 0)),
    st.tuples(st.just("wait"), st.integers(1, 60)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LEASE_STEP, max_size=80))
def test_lease_expiry_matches_a_full_scan(steps: list[tuple[str, int]]) -> None:
    """Expiry looks only at the earliest lease; it must release exactly what a scan would.

    A lease holds the concurrency slot; the money stays reserved until settled or undone.
    """
    engine = MemoryEngine()
    now = 1_000.0
    issued: list[str] = []
    leases: dict[str, float] = {}  # the model: live reservation -> lease end
    unsettled: set[str] = set()
    for index, (kind, value) in enumerate(steps):
        if kind == "reserve":
            rid = f"r{index}"
            engine.reserve(
                _request(rid, now, amount=10, tokens=1, lease=value, limits=TeamLimits())
            )
            issued.append(rid)
            leases[rid] = now + value
            unsettled.add(rid)
        elif kind == "settle" and issued:
            rid = issued[value % len(issued)]
            engine.settle(rid, Settlement(cost=Micro(1), now=now))
            leases.pop(rid, None)
            unsettled.discard(rid)
        elif kind == "renew" and issued:
            rid = issued[value % len(issued)]
            engine.renew(rid, now + value, now)
            if rid in leases:
                if leases[rid] <= now:
                    del leases[rid]
                else:
                    leases[rid] = max(leases[rid], now + value)
        elif kind == "unreserve" and issued:
            rid = issued.pop()
            engine.unreserve(rid)
            leases.pop(rid, None)
            unsettled.discard(rid)
        elif kind == "wait":
            now += value
        usage = engine.usage("t", ["total"], now)["total"]
        for rid in [r for r, end in leases.items() if end <= now]:
            del leases[rid]
        assert usage.reserved == 10 * len(unsettled)
        assert engine._live.get("t", set()) == set(leases)
        assert len(engine._leases.get("t", [])) <= 2 * len(leases) + 65

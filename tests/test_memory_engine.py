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


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, max_size=60))
def test_running_token_sum_matches_the_log(steps: list[tuple[str, int]]) -> None:
    engine = MemoryEngine()
    now = 1_000.0
    issued: list[str] = []
    for index, (kind, value) in enumerate(steps):
        if kind == "reserve":
            rid = f"r{index}"
            engine.reserve(
                ReserveRequest(
                    request_id=rid,
                    team="t",
                    amount=Micro(1),
                    tokens=value,
                    periods={Period.TOTAL: "total"},
                    now=now,
                    lease_seconds=600,
                    limits=LIMITS,
                )
            )
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

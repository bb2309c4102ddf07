"""The admission decision is made once, in the quota service, from the counts a store returns.

Stores count, reserve and apply (``Store.reserve`` returns :class:`Counted`); which limit
refuses, the numbers of the refusal, the remaining-limit headers and shadow mode are
:func:`decide`'s. The contract suite (``test_store_contract``) runs the same decisions over
every backend; here the decision itself, the service's use of it, and the split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clipia_proxy.quotas
from clipia_proxy.errors import BudgetExceeded, QuotaStoreUnavailable
from clipia_proxy.quotas.decision import decide, fits
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import (
    Counted,
    KeyLimits,
    Micro,
    Period,
    Reason,
    ReserveRequest,
    TeamLimits,
)
from clipia_proxy.quotas.service import QuotaService
from clipia_proxy.quotas.store import StoreUnavailable
from tests.harness import Clock
from tests.test_quota_service import NOW, admit, config, worst

PERIODS = {Period.DAY: "day:2026-11-25", Period.MONTH: "month:2026-11"}
FULL = TeamLimits(
    budgets={Period.DAY: Micro(10_000), Period.MONTH: Micro(50_000)},
    rpm=10,
    tpm=1_000,
    concurrency=2,
)
OWN = KeyLimits(rpm=3, tpm=300, concurrency=1)


def request(
    limits: TeamLimits = FULL, *, enforce: bool = True, own: KeyLimits | None = None
) -> ReserveRequest:
    return ReserveRequest(
        request_id="r",
        team="t",
        amount=Micro(1_000),
        tokens=100,
        periods=dict(PERIODS),
        now=NOW,
        lease_seconds=60,
        limits=limits,
        enforce=enforce,
        key_id="k",
        key_limits=own,
    )


def counted(**fields: object) -> Counted:
    """Counts well within ``FULL`` and ``OWN``, with ``fields`` changed."""
    base: dict[str, object] = {
        "applied": True,
        "live": 0,
        "requests": 1,
        "tokens": 100,
        "budgets": {Period.DAY: 2_000, Period.MONTH: 40_000},
    }
    return Counted(**{**base, **fields})  # type: ignore[arg-type]


# Every limit over, one at a time in reverse order: each step uncovers the next refusal.
OVER: list[tuple[dict[str, object], Reason, bool]] = [
    ({"live": 2, "key_live": 1}, Reason.CONCURRENCY, False),
    ({"requests": 10, "rpm_wait": 12.5}, Reason.RPM, False),
    ({"tokens": 950, "tpm_wait": 3.0}, Reason.TPM, False),
    ({"key_live": 1}, Reason.CONCURRENCY, True),
    ({"key_requests": 3, "key_rpm_wait": 7.0}, Reason.RPM, True),
    ({"key_tokens": 250, "key_tpm_wait": 2.0}, Reason.TPM, True),
    ({"budgets": {Period.DAY: 9_500, Period.MONTH: 49_500}}, Reason.BUDGET, False),
]


@pytest.mark.parametrize("first", range(len(OVER)))
def test_the_first_limit_over_refuses_in_the_documented_order(first: int) -> None:
    fields: dict[str, object] = {"applied": False}
    for over, _, _ in reversed(OVER[first:]):
        fields.update(over)
    result = decide(request(own=OWN), counted(**fields))
    _, reason, key = OVER[first]
    assert not result.admitted
    assert (result.reason, result.key) == (reason, key)
    if reason is Reason.BUDGET:
        assert (result.period, result.limit, result.used) == (Period.DAY, 10_000, 9_500)
        assert result.retry_after == 0.0
    elif reason is Reason.CONCURRENCY:
        assert result.retry_after == 1.0
    else:
        assert result.retry_after == fields[("key_" if key else "") + reason.value + "_wait"]


def test_a_wait_that_ran_out_still_says_retry_after_a_moment() -> None:
    result = decide(request(), counted(applied=False, requests=10, rpm_wait=0.0))
    assert (result.reason, result.retry_after) == (Reason.RPM, 0.001)


def test_an_admission_says_what_every_limit_leaves() -> None:
    result = decide(request(own=OWN), counted(key_requests=1, key_tokens=50))
    assert result.admitted
    assert result.reason is None
    assert (result.requests_remaining, result.tokens_remaining) == (8, 800)
    assert (result.key_requests_remaining, result.key_tokens_remaining) == (1, 150)
    # day: 10_000 - 2_000 - 1_000; month: 50_000 - 40_000 - 1_000. The day is tighter.
    assert (result.budget_remaining, result.budget_period) == (7_000, Period.DAY)


def test_unlimited_leaves_no_header_numbers() -> None:
    result = decide(request(TeamLimits()), counted())
    assert result.admitted
    assert result.requests_remaining is None
    assert result.budget_remaining is None


def test_shadow_is_admitted_and_says_what_would_have_refused() -> None:
    result = decide(
        request(enforce=False),
        counted(budgets={Period.DAY: 9_500, Period.MONTH: 0}, requests=10, rpm_wait=5.0),
    )
    assert result.admitted
    assert (result.reason, result.period) == (Reason.RPM, None)
    assert result.budget_remaining == 0  # the day is over; never shown below 0


def test_a_replay_is_admitted_and_changes_nothing() -> None:
    result = decide(request(), Counted(applied=True, replayed=True))
    assert result.admitted
    assert result.replayed


@pytest.mark.parametrize(
    ("enforce", "store_counted"),
    [
        (True, counted(applied=True, live=2)),  # applied over its concurrency
        (True, counted(applied=False)),  # refused what fits
        (False, counted(applied=False)),  # a shadow request not applied
    ],
)
def test_a_store_that_disagrees_with_the_limits_is_a_store_failure(
    enforce: bool, store_counted: Counted
) -> None:
    with pytest.raises(StoreUnavailable, match="against its limits"):
        decide(request(enforce=enforce), store_counted)


COUNTS = st.builds(
    Counted,
    applied=st.just(False),
    live=st.integers(0, 4),
    requests=st.integers(0, 12),
    tokens=st.integers(0, 1_200),
    key_live=st.integers(0, 2),
    key_requests=st.integers(0, 4),
    key_tokens=st.integers(0, 400),
    budgets=st.fixed_dictionaries(
        {Period.DAY: st.integers(0, 11_000), Period.MONTH: st.integers(0, 51_000)}
    ),
)


@settings(max_examples=300, deadline=None)
@given(counts=COUNTS, own=st.sampled_from([None, OWN]), enforce=st.booleans())
def test_fits_is_exactly_no_refusal(counts: Counted, own: KeyLimits | None, enforce: bool) -> None:
    """What a store applies (``fits``) and what the service decides never disagree."""
    req = request(own=own, enforce=enforce)
    applied = fits(req, counts) or not enforce
    result = decide(req, msgspec.structs.replace(counts, applied=applied))
    assert result.admitted == applied
    assert (result.reason is None) == fits(req, counts)


class _LyingStore(MemoryStore):
    """Says it applied a reservation whatever the limits (a store comparing differently)."""

    async def reserve(self, request: ReserveRequest) -> Counted:
        counts = await super().reserve(msgspec.structs.replace(request, enforce=False))
        return msgspec.structs.replace(counts, applied=True)


async def test_the_service_refuses_and_voids_what_a_disagreeing_store_applied() -> None:
    store = _LyingStore()
    quotas = QuotaService(store, config(budget="{day: 1}"), clock=Clock(NOW))
    await admit(quotas, worst("0.6"), rid="first")
    with pytest.raises(QuotaStoreUnavailable):
        await admit(quotas, worst("0.6"), rid="second")  # over the day: the store applied it
    voided = await store.record("second")
    assert voided is not None
    assert voided.cost == 0
    assert voided.settled_at is not None
    # The honest store refuses the same request with the budget's own error.
    honest = QuotaService(MemoryStore(), config(budget="{day: 1}"), clock=Clock(NOW))
    await admit(honest, worst("0.6"), rid="first")
    with pytest.raises(BudgetExceeded):
        await admit(honest, worst("0.6"), rid="second")


BACKENDS = ("memory.py", "sqlite.py", "ledgered.py", "redis.py")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_only_count_and_apply(backend: str) -> None:
    """No backend names a refusal reason or shadow mode: both are the service's decision."""
    path = Path(clipia_proxy.quotas.__file__).parent / backend
    tree = ast.parse(path.read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {"Reason", "ReserveResult", "shadow"}
    text = path.read_text()
    assert "shadow" not in text
    assert "refusal" not in text

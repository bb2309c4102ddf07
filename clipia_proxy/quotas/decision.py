"""The admission decision: every limit compared, once, for every store (pure, no I/O).

A store's ``reserve`` counts what a team (and the key's own scope) already holds and applies
the reservation when :func:`fits` — the Redis store's Lua script runs the same comparisons, in
one atomic step with the write. Everything else about the decision is made here, from the
counts the store returns (:class:`~.model.Counted`): which limit refuses first (the team's
concurrency, RPM and TPM, then the key's own, then the budgets in period order), the numbers
for the error message and the ``Retry-After`` header, what each limit leaves (the
``x-ratelimit-*`` headers), and shadow mode, where a request that does not ``enforce`` its
limits is applied and the refusal it would have had is reported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .model import (
    Counted,
    KeyLimits,
    Micro,
    Period,
    Reason,
    ReserveRequest,
    ReserveResult,
    TeamLimits,
)
from .store import StoreUnavailable

__all__ = ["decide", "fits"]


class _Check(NamedTuple):
    """One limit: after this request, ``used + add`` must stay at or below ``limit``."""

    reason: Reason
    limit: int
    used: int
    add: int
    key: bool = False
    period: Period | None = None
    wait: float = 0.0


def _rates(
    limits: TeamLimits | KeyLimits,
    live: int,
    requests: int,
    tokens: int,
    waits: tuple[float, float],
    *,
    add_tokens: int,
    key: bool,
) -> Iterator[_Check]:
    """Concurrency, RPM and TPM, in that order (a team's or, with ``key``, a key's own)."""
    if limits.concurrency is not None:
        yield _Check(Reason.CONCURRENCY, limits.concurrency, live, 1, key, wait=1.0)
    if limits.rpm is not None:
        yield _Check(Reason.RPM, limits.rpm, requests, 1, key, wait=waits[0])
    if limits.tpm is not None:
        yield _Check(Reason.TPM, limits.tpm, tokens, add_tokens, key, wait=waits[1])


def _checks(request: ReserveRequest, counted: Counted) -> Iterator[_Check]:
    """Every limit of the request, in the order a refusal names the first that fails."""
    limits, c, tokens = request.limits, counted, request.tokens
    yield from _rates(
        limits, c.live, c.requests, c.tokens, (c.rpm_wait, c.tpm_wait), add_tokens=tokens, key=False
    )
    own = request.key_limits
    if own is not None and request.key_id is not None:
        waits = (c.key_rpm_wait, c.key_tpm_wait)
        yield from _rates(
            own, c.key_live, c.key_requests, c.key_tokens, waits, add_tokens=tokens, key=True
        )
    budgets = limits.budgets
    for period in request.periods:
        limit = budgets.get(period)
        if limit is not None:
            used = c.budgets.get(period, 0)
            yield _Check(Reason.BUDGET, limit, used, request.amount, period=period)


def fits(request: ReserveRequest, counted: Counted) -> bool:
    """Whether every limit stays within bounds once this request is counted.

    The stores' test before they apply a reservation (the Redis script runs the same one);
    the same comparisons as :func:`_checks`, without naming which limit fails.
    """
    limits, c, tokens = request.limits, counted, request.tokens
    if not _rates_fit(limits, c.live, c.requests, c.tokens, tokens):
        return False
    own = request.key_limits
    if (
        own is not None
        and request.key_id is not None
        and not _rates_fit(own, c.key_live, c.key_requests, c.key_tokens, tokens)
    ):
        return False
    budgets, used, amount = limits.budgets, c.budgets, request.amount
    for period in request.periods if budgets else ():
        limit = budgets.get(period)
        if limit is not None and used.get(period, 0) + amount > limit:
            return False
    return True


def _rates_fit(
    limits: TeamLimits | KeyLimits, live: int, requests: int, tokens: int, add: int
) -> bool:
    return (
        (limits.concurrency is None or live + 1 <= limits.concurrency)
        and (limits.rpm is None or requests + 1 <= limits.rpm)
        and (limits.tpm is None or tokens + add <= limits.tpm)
    )


def _remaining(limit: int | None, used: int) -> int | None:
    """What a limit leaves once ``used`` is counted (never below 0); None when unlimited."""
    return None if limit is None else max(limit - used, 0)


def _tightest(request: ReserveRequest, counted: Counted) -> tuple[int, Period] | None:
    """The budget this request leaves least of: (what it leaves, its period); None: no budget."""
    budgets, used, amount = request.limits.budgets, counted.budgets, request.amount
    tightest: tuple[int, Period] | None = None
    for period in request.periods if budgets else ():
        limit = budgets.get(period)
        if limit is not None:
            left = limit - used.get(period, 0) - amount
            if tightest is None or left < tightest[0]:
                tightest = (left, period)
    return tightest


def decide(request: ReserveRequest, counted: Counted) -> ReserveResult:
    """Return the decision on ``request`` from what its store counted.

    Raises :class:`~.store.StoreUnavailable` when the store's ``applied`` contradicts the
    limits (a store that compared differently): a failed store call, whatever it applied is
    voided as for any other.
    """
    if counted.replayed:
        return ReserveResult(admitted=True, replayed=True)
    # The common case: applied and within every limit, nothing to name. ``fits`` runs again
    # here, not only in the store, so a store that compared differently (the Lua script) is
    # caught instead of admitting past a limit.
    if request.enforce and counted.applied and fits(request, counted):
        return _admitted(request, counted, None)
    refusal = next((c for c in _checks(request, counted) if c.used + c.add > c.limit), None)
    if counted.applied != (refusal is None or not request.enforce):
        raise StoreUnavailable(
            f"the store {'applied' if counted.applied else 'refused'} request "
            f"{request.request_id} against its limits"
        )
    if refusal is None or not request.enforce:
        return _admitted(request, counted, refusal)  # a shadow team's: what would refuse
    return ReserveResult(
        admitted=False,
        reason=refusal.reason,
        period=refusal.period,
        limit=refusal.limit,
        used=refusal.used,
        retry_after=max(refusal.wait, 0.001) if refusal.period is None else 0.0,
        key=refusal.key,
    )


def _admitted(request: ReserveRequest, counted: Counted, refusal: _Check | None) -> ReserveResult:
    """An admission: what every limit leaves, and the refusal a shadow team would have had."""
    limits, c, own = request.limits, counted, request.key_limits
    tightest = _tightest(request, counted)
    key_requests = key_tokens = None
    if own is not None and request.key_id is not None:
        key_requests = _remaining(own.rpm, c.key_requests + 1)
        key_tokens = _remaining(own.tpm, c.key_tokens + request.tokens)
    return ReserveResult(
        admitted=True,
        reason=None if refusal is None else refusal.reason,
        period=None if refusal is None else refusal.period,
        key=refusal is not None and refusal.key,
        requests_remaining=_remaining(limits.rpm, c.requests + 1),
        tokens_remaining=_remaining(limits.tpm, c.tokens + request.tokens),
        budget_remaining=None if tightest is None else Micro(max(tightest[0], 0)),
        budget_period=None if tightest is None else tightest[1],
        key_requests_remaining=key_requests,
        key_tokens_remaining=key_tokens,
    )

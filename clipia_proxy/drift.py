"""The drift check: settled costs compared with what Clipia says it charged, and corrected.

Every settlement is offered to :class:`DriftChecker`. It keeps, for a later check, a random
sample of them (``accounting.drift_sample_rate``, default 1 %) and every one whose cost did not
come from the upstream (``usage_source`` ``counted`` or ``reserved``) — as long as its upstream
id is known. ``accounting.drift_check_delay_seconds`` after the settlement (Clipia's records may
lag), a background task asks ``GET /v1/generation`` for the request's cost; when it differs from
the ledger's, the record is corrected (cost, tokens, ``usage_source: generation``) and its
windows' spent moves by the difference (:meth:`Store.correct`). Results are counted in
``clipia_proxy_drift_checks_total{result}`` and the credits moved in
``clipia_proxy_cost_drift_credits_total{team}``. A silent ``/v1/generation`` is asked again
(``_ATTEMPTS`` times, backing off) before the check counts ``unavailable``. The queue is
bounded: past ``_MAX_PENDING`` new checks are skipped (sampling, not bookkeeping).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Final

import msgspec

from .quotas.model import Micro, Outcome, Settlement, UsageSource, credits
from .quotas.store import StoreUnavailable

if TYPE_CHECKING:
    from .ledger import Ledger

__all__ = ["DriftCheck", "DriftChecker"]

_LOGGER: Final = logging.getLogger(__name__)
_MAX_PENDING: Final = 10_000
_NOT_FROM_UPSTREAM: Final = frozenset({UsageSource.COUNTED, UsageSource.RESERVED})
_ATTEMPTS: Final = 5
"""Checks of one settlement while ``/v1/generation`` stays silent (each after the delay,
doubled each time), before it is counted ``unavailable``."""


class DriftCheck(msgspec.Struct, frozen=True):
    """One settlement waiting to be checked."""

    due: float
    request_id: str
    team: str
    upstream_id: str
    cost: int
    attempts: int = 0
    """Checks that found ``/v1/generation`` silent so far (retried up to ``_ATTEMPTS``)."""


class DriftChecker:
    """Samples settlements and checks them against ``/v1/generation`` (see the module)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        sample_rate: float,
        delay: float,
        clock: Callable[[], float],
        record: Callable[[str, str, Decimal], None],
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._ledger = ledger
        self.sample_rate = sample_rate
        self.delay = delay
        self._clock = clock
        self._record = record
        self._chance = chance
        self._pending: list[tuple[float, int, DriftCheck]] = []
        """A heap by due time."""
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, request_id: str, team: str, settlement: Settlement) -> None:
        """Consider one settlement: keep it for a check if sampled or not from the upstream."""
        upstream_id = settlement.upstream_id
        if upstream_id is None or settlement.outcome is Outcome.NOT_SENT:
            return
        if settlement.usage_source not in _NOT_FROM_UPSTREAM and (
            self.sample_rate <= 0 or self._chance() >= self.sample_rate
        ):
            return
        self._push(
            DriftCheck(
                due=self._clock() + self.delay,
                request_id=request_id,
                team=team,
                upstream_id=upstream_id,
                cost=settlement.cost,
            )
        )

    def _push(self, check: DriftCheck) -> None:
        if len(self._pending) >= _MAX_PENDING:
            return  # sampling, not bookkeeping: past the bound, new checks are skipped
        heapq.heappush(self._pending, (check.due, next(self._seq), check))

    async def run(self, pause: Callable[[float], Awaitable[bool]]) -> None:
        """Check what is due until ``pause`` says the gateway is draining."""
        while True:
            now = self._clock()
            while self._pending and self._pending[0][0] <= now:
                check = heapq.heappop(self._pending)[2]
                try:
                    await self.check(check)
                except (StoreUnavailable, TimeoutError) as exc:
                    _LOGGER.info("drift check of %s postponed: %s", check.request_id, exc)
                    self._push(msgspec.structs.replace(check, due=now + max(self.delay, 1.0)))
                    break
            wait = max(self._pending[0][0] - self._clock(), 0.05) if self._pending else 1.0
            if await pause(min(wait, 1.0)):
                return

    async def check(self, check: DriftCheck) -> str:
        """Check one settlement now; return what came of it.

        ``match``, ``corrected`` or ``unavailable``; ``retry`` when ``/v1/generation`` is silent
        and the check was queued again.
        """
        generation = await self._ledger.generation_cost(check.upstream_id)
        if generation is None:
            if check.attempts + 1 < _ATTEMPTS:
                wait = max(self.delay, 1.0) * 2**check.attempts
                self._push(
                    msgspec.structs.replace(
                        check, due=self._clock() + wait, attempts=check.attempts + 1
                    )
                )
                return "retry"
            self._record(check.team, "unavailable", Decimal(0))
            return "unavailable"
        if generation.cost == check.cost:
            self._record(check.team, "match", Decimal(0))
            return "match"
        correction = Settlement(
            cost=Micro(generation.cost),
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            usage_source=UsageSource.GENERATION,
            upstream_id=check.upstream_id,
            now=self._clock(),
        )
        delta = await self._ledger.correct(check.request_id, correction)
        if delta is None:
            self._record(check.team, "unavailable", Decimal(0))
            return "unavailable"
        _LOGGER.warning(
            "drift: %s settled at %s credits, Clipia charged %s; corrected",
            check.request_id,
            credits(check.cost),
            credits(generation.cost),
        )
        self._record(check.team, "corrected", credits(delta))
        return "corrected"

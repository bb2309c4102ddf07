"""The spend ledger's rules: what each request is charged, exactly once, and reconciliation.

The record itself is written by the store (``reserve`` writes it ``dispatched`` before the
upstream sees the request). This module decides the settlement, best source first:

1. the upstream never received the request (connect failure) → 0, outcome ``not_sent``;
2. the upstream answered an error status → 0 (Clipia bills nothing for refused requests);
3. ``usage.cost`` from the response or the stream → ``response`` / ``stream``;
4. ``GET /v1/generation?id=`` (retried with backoff while it lags) → ``generation``;
5. tokens from ``usage`` times catalog prices → ``counted``;
6. otherwise the reservation itself (the worst case) → ``reserved``.

The upstream id is made durable as soon as it is known (:meth:`Ledger.note_upstream_id`: a
stream's first chunk, a non-streaming answer that lacks its cost), in the store's batch of that
event-loop turn. After a crash, records left ``dispatched`` are settled by
:meth:`Ledger.reconcile`, outcome ``crashed``: through ``/v1/generation`` when the upstream id
is known (while the lookup lags, the record stays ``dispatched`` with its money reserved and is
tried again, up to ``_CRASH_LOOKUP_HORIZON_SECONDS`` after it was created); without an id the
upstream may have received the request (the record is written just before it is sent, and a
request known not to have been sent is settled at 0 at once), so it is charged its
reservation. Settlement runs in the handler's ``finally`` when it needs no waiting (a local
store and a known cost), else in a TaskRegistry task; either way a cancelled handler cannot
skip it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from decimal import Decimal
from typing import Any, Final

import aiohttp
import msgspec

from .errors import ProxyError
from .quotas.admission import Admission
from .quotas.estimate import plausible_cost
from .quotas.model import Micro, Outcome, Settlement, UsageSource, to_micro
from .quotas.service import QuotaService
from .quotas.store import LedgerRecord, StoreUnavailable
from .record import RequestInfo
from .upstream import UpstreamClient, read_body
from .wire import Usage, decode_json

__all__ = ["Ledger"]

_LOGGER: Final = logging.getLogger(__name__)
_GENERATION_ATTEMPTS: Final = 4
_GENERATION_BACKOFF_SECONDS: Final = 0.25
_MAX_GENERATION_BODY: Final = 64 * 1024
_CRASH_LOOKUP_HORIZON_SECONDS: Final = 3600.0
"""How long after its creation a crashed record with an upstream id waits for
``/v1/generation`` to know it before being charged its reservation instead."""
_RECONCILE_PARALLEL: Final = 8
"""Generation lookups run at once by one reconciliation pass."""


class _GenerationCost(msgspec.Struct, frozen=True):
    cost: Micro
    prompt_tokens: int
    completion_tokens: int

    def settlement(self, outcome: Outcome, upstream_id: str | None, now: float) -> Settlement:
        """Return the settlement this generation record gives."""
        return Settlement(
            cost=self.cost,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            usage_source=UsageSource.GENERATION,
            outcome=outcome,
            upstream_id=upstream_id,
            now=now,
        )


class Ledger:
    """Settlement rules over a QuotaService (which owns the store)."""

    def __init__(
        self,
        quotas: QuotaService,
        upstream: UpstreamClient,
        *,
        rubles_per_credit: Decimal,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        spawn: Callable[[Coroutine[Any, Any, None], str], object] | None = None,
        upstream_for: Callable[[str], UpstreamClient] | None = None,
    ) -> None:
        self._quotas = quotas
        self._upstream = upstream
        self._upstream_for = upstream_for
        """Team -> the client whose key created its generations (sandbox teams: the test key)."""
        self._rubles_per_credit = rubles_per_credit
        self._sleep = sleep
        self._spawn = spawn
        self.usage_sources: dict[str, int] = {}
        """usage_source -> settlements (exported as metrics)."""
        self.implausible_costs = 0
        """Upstream costs not believed (settled from tokens instead; exported as a metric)."""
        self.on_settled: Callable[[str, str, Settlement], None] | None = None
        """Called with (request id, team, settlement) after each settlement (the drift check)."""
        self.postponed = 0
        """Crashed records the last reconciliation left for later (their generation lags)."""

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._spawn is None:
            coro.close()
            return
        self._spawn(coro, name)

    def note_upstream_id(self, record: RequestInfo, upstream_id: str) -> None:
        """Note the upstream id on the request's record and make it durable in the store now.

        A local store queues the write in this event-loop turn's transaction; a remote one
        gets it from a background task. Failures are logged: the settlement writes it again.
        """
        record.upstream_id = upstream_id
        admission = record.require_admission()
        if not admission.reserved:
            return
        request_id = admission.request_id
        local = self._quotas.local_store
        if local is not None:
            local.note_upstream_id_nowait(request_id, upstream_id)
        else:
            self._background(self._note_remote(request_id, upstream_id), "note-upstream-id")

    async def _note_remote(self, request_id: str, upstream_id: str) -> None:
        try:
            await self._quotas.call(self._quotas.store.note_upstream_id(request_id, upstream_id))
        except (StoreUnavailable, TimeoutError) as exc:
            _LOGGER.warning("upstream id of %s not written: %s", request_id, exc)

    def release_slot(self, record: RequestInfo) -> None:
        """Free the request's concurrency slot now (its client left); its money stays reserved."""
        if record.slot_released:
            return
        record.slot_released = True
        admission = record.require_admission()
        request_id = admission.request_id
        # The team's place in this gateway, and its slot in the store.
        self._quotas.leave_early(admission.team, request_id)
        if not admission.reserved:
            return
        self._quotas.slot_freed(admission.team, admission.admitted_at)
        local = self._quotas.local_store
        if local is not None:
            local.release_slot_nowait(request_id)
        else:
            self._background(self._release_remote(request_id), "release-slot")

    async def _release_remote(self, request_id: str) -> None:
        try:
            await self._quotas.call(self._quotas.store.release_slot(request_id))
        except (StoreUnavailable, TimeoutError) as exc:
            _LOGGER.warning("slot of %s not released (its lease will run out): %s", request_id, exc)

    def decide(self, record: RequestInfo, generation: _GenerationCost | None) -> Settlement:
        """Return the settlement for an admitted request, given the generation lookup's answer."""
        admission = record.require_admission()
        outcome = record.outcome
        assert outcome is not None, "admission sets the outcome"
        now = self._quotas.now()
        if not record.sent:
            return Settlement(
                cost=Micro(0), usage_source=UsageSource.COUNTED, outcome=Outcome.NOT_SENT, now=now
            )
        if record.upstream_status not in (None, 200):
            return Settlement(
                cost=Micro(0),
                usage_source=UsageSource.RESPONSE,
                outcome=Outcome.UPSTREAM_ERROR,
                upstream_id=record.upstream_id,
                now=now,
            )
        usage = record.usage
        reported = None if usage is None or usage.cost is None else to_micro(usage.cost)
        if (
            reported is not None
            and usage is not None
            and self._plausible(record, reported, usage.prompt_tokens, usage.completion_tokens)
        ):
            return Settlement(
                cost=reported,
                prompt_tokens=usage.prompt_tokens or 0,
                completion_tokens=usage.completion_tokens or 0,
                usage_source=record.usage_source or UsageSource.RESPONSE,
                outcome=outcome,
                upstream_id=record.upstream_id,
                now=now,
            )
        if generation is not None and self._plausible(
            record, generation.cost, generation.prompt_tokens, generation.completion_tokens
        ):
            return generation.settlement(outcome, record.upstream_id, now)
        counted = self._counted(record, usage)
        if counted is not None and usage is not None:
            return Settlement(
                cost=counted,
                prompt_tokens=usage.prompt_tokens or 0,
                completion_tokens=usage.completion_tokens or 0,
                usage_source=UsageSource.COUNTED,
                outcome=outcome,
                upstream_id=record.upstream_id,
                now=now,
            )
        return Settlement(
            cost=admission.amount,
            prompt_tokens=admission.estimate.prompt_tokens,
            completion_tokens=admission.estimate.n * admission.estimate.output_tokens,
            usage_source=UsageSource.RESERVED,
            outcome=outcome,
            upstream_id=record.upstream_id,
            now=now,
        )

    def _price(
        self, record: RequestInfo, prompt_tokens: int | None, completion_tokens: int | None
    ) -> Micro | None:
        """Return tokens x catalog prices, when the tokens and both prices are known."""
        if (
            prompt_tokens is None
            or completion_tokens is None
            or record.prompt_price is None
            or record.completion_price is None
        ):
            return None
        rubles = prompt_tokens * record.prompt_price + completion_tokens * record.completion_price
        return to_micro(rubles / self._rubles_per_credit)

    def _counted(self, record: RequestInfo, usage: Usage | None) -> Micro | None:
        """Return the cost of the usage's tokens at catalog prices, when all are known."""
        if usage is None:
            return None
        return self._price(record, usage.prompt_tokens, usage.completion_tokens)

    def _plausible(
        self,
        record: RequestInfo,
        cost: Micro,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> bool:
        """Sanity-check an upstream cost against its tokens x prices and the reservation.

        A cost within the reservation (the usual case) needs no arithmetic. One that is not
        believed is counted and logged.
        """
        admission = record.require_admission()
        reserved = admission.amount
        if 0 <= cost <= reserved or plausible_cost(
            cost,
            reserved=reserved,
            counted=self._price(record, prompt_tokens, completion_tokens),
        ):
            return True
        self.implausible_costs += 1
        _LOGGER.warning(
            "upstream cost %s credits for %s is implausible (reserved %s); settled from tokens",
            Decimal(cost) / 1_000_000,
            admission.request_id,
            Decimal(reserved) / 1_000_000,
        )
        return False

    def settle_now(self, record: RequestInfo) -> Settlement | None:
        """Settle a request without waiting, when that is possible; else return None.

        Possible when the store is local (memory, sqlite: its write is committed in the
        background) and no ``/v1/generation`` lookup is needed: the common case, which then
        costs the handler no task. Otherwise the caller runs :meth:`settle` in a task.
        """
        admission = record.require_admission()
        reserved = admission.reserved
        if _needs_lookup(record) or (reserved and not self._quotas.settles_locally):
            return None
        settlement = self.decide(record, None)
        self._slot_ends(record, admission)
        if reserved:
            self._quotas.settle_nowait(admission.request_id, settlement)
        elif admission.journaled:
            self._quotas.journal_settlement(admission.request_id, settlement)
        self._count(settlement)
        self._settled(admission.request_id, admission.team, settlement)
        return settlement

    async def settle(self, record: RequestInfo) -> Settlement:
        """Settle one admitted request (from a TaskRegistry task); return what was charged."""
        admission = record.require_admission()
        generation = None
        if _needs_lookup(record) and record.upstream_id is not None:
            generation = await self.generation_cost(record.upstream_id, admission.team)
        settlement = self.decide(record, generation)
        self._slot_ends(record, admission)
        if admission.reserved:
            await self._quotas.settle(admission.request_id, settlement)
        elif admission.journaled:
            self._quotas.journal_settlement(admission.request_id, settlement)
        self._count(settlement)
        self._settled(admission.request_id, admission.team, settlement)
        return settlement

    def _settled(self, request_id: str, team: str, settlement: Settlement) -> None:
        if self.on_settled is not None:
            self.on_settled(request_id, team, settlement)

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """Correct a settled record from Clipia's own cost (the drift check); see Store.correct."""
        return await self._quotas.call(self._quotas.store.correct(request_id, settlement))

    def _slot_ends(self, record: RequestInfo, admission: Admission) -> None:
        if admission.reserved and not record.slot_released:
            self._quotas.slot_freed(admission.team, admission.admitted_at)

    def _count(self, settlement: Settlement) -> None:
        source = settlement.usage_source.value
        self.usage_sources[source] = self.usage_sources.get(source, 0) + 1

    async def generation_cost(
        self,
        upstream_id: str,
        team: str | None = None,
        *,
        attempts: int = _GENERATION_ATTEMPTS,
    ) -> _GenerationCost | None:
        """Ask ``GET /v1/generation`` for the actual cost, retrying while it lags (404).

        Asked with the key ``team``'s requests use (a generation is visible to its own key).
        """
        for attempt in range(attempts):
            if attempt:
                await self._sleep(_GENERATION_BACKOFF_SECONDS * 2 ** (attempt - 1))
            try:
                upstream = (
                    self._upstream
                    if team is None or self._upstream_for is None
                    else self._upstream_for(team)
                )
                response = await upstream.send(
                    "GET",
                    "/generation",
                    request_id=f"ledger-{uuid.uuid4().hex}",
                    query={"id": upstream_id},
                )
            except ProxyError:
                return None
            try:
                status = response.status
                body = await read_body(response, _MAX_GENERATION_BODY)
            except (aiohttp.ClientError, TimeoutError):
                status, body = 0, b""
            finally:
                response.release()
            if status == 200:
                return _parse_generation(body)
            if status not in (404, 0) and status < 500:
                return None
        return None

    async def reconcile(self, *, only_expired: bool, created_before: float | None = None) -> int:
        """Settle records left ``dispatched`` (after a crash); return how many were settled.

        With ``only_expired`` (shared stores), only records whose lease ran out are touched:
        the others may belong to a live replica. ``created_before`` limits a pass to records
        older than that (a local store's later passes: only what the crash left). A record
        whose upstream id ``/v1/generation`` does not know yet stays ``dispatched`` (its money
        reserved) and counts in :attr:`postponed`, until ``_CRASH_LOOKUP_HORIZON_SECONDS``.
        """
        now = self._quotas.now()
        records = [
            record
            for record in await self._quotas.store.dispatched()
            if not (only_expired and record.lease_until > now)
            and not (created_before is not None and record.created_at >= created_before)
        ]
        gate = asyncio.Semaphore(_RECONCILE_PARALLEL)

        async def one(record: LedgerRecord) -> int:
            async with gate:
                settlement = await self._crash_settlement(record, now)
            if settlement is None:
                return 0
            if not await self._quotas.settle(record.request_id, settlement):
                return 0
            self._count(settlement)
            self._settled(record.request_id, record.team, settlement)
            _LOGGER.warning(
                "reconciled %s after a crash: %s credits (%s)",
                record.request_id,
                Decimal(settlement.cost) / 1_000_000,
                settlement.usage_source.value,
            )
            return 1

        results = await asyncio.gather(*(one(record) for record in records))
        settled = sum(results)
        self.postponed = len(records) - settled
        return settled

    async def _crash_settlement(self, record: LedgerRecord, now: float) -> Settlement | None:
        if record.upstream_id:
            # One lookup per pass: a lagging one is tried again by the next pass (start-up
            # is not held up by retries).
            generation = await self.generation_cost(record.upstream_id, record.team, attempts=1)
            if generation is not None:
                return generation.settlement(Outcome.CRASHED, record.upstream_id, now)
            if now - record.created_at < _CRASH_LOOKUP_HORIZON_SECONDS:
                _LOGGER.info(
                    "crashed %s: /v1/generation does not know %s yet; retried later",
                    record.request_id,
                    record.upstream_id,
                )
                return None
        # No upstream id: the record is written just before the request is sent, and one
        # known not to have been sent is settled at 0 at once; so it may have been received.
        return Settlement(
            cost=Micro(record.reserved),
            # The worst-case tokens reserved at admission stand in for the unknown real ones.
            prompt_tokens=record.tokens_reserved,
            completion_tokens=0,
            usage_source=UsageSource.RESERVED,
            outcome=Outcome.CRASHED,
            upstream_id=record.upstream_id,
            now=now,
        )


def _needs_lookup(record: RequestInfo) -> bool:
    """Whether the cost must be asked of ``/v1/generation`` (answered, but without a cost)."""
    return (
        record.sent
        and record.upstream_status in (None, 200)
        and (record.usage is None or record.usage.cost is None)
        and record.upstream_id is not None
    )


def _parse_generation(body: bytes) -> _GenerationCost | None:
    try:
        decoded = decode_json(body)
    except (msgspec.DecodeError, ValueError):
        return None
    data = decoded.get("data") if isinstance(decoded, dict) else None
    if not isinstance(data, dict):
        return None
    cost = data.get("total_cost")
    prompt = data.get("tokens_prompt")
    completion = data.get("tokens_completion")
    if isinstance(cost, bool) or not isinstance(cost, Decimal | int):
        return None
    return _GenerationCost(
        cost=to_micro(Decimal(cost)),
        prompt_tokens=prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0,
        completion_tokens=(
            completion if isinstance(completion, int) and not isinstance(completion, bool) else 0
        ),
    )

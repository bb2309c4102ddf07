"""QuotaService: what the handlers call — admit before dispatch, settle after, and the headers.

It sees only the ``Store`` protocol; team limits, periods, shadow mode, store failures
(``store.on_error``) and the messages people read are handled here, never in a backend.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Final, TypeVar
from zoneinfo import ZoneInfo

import msgspec

from clipia_proxy.config import Config, TeamConfig
from clipia_proxy.errors import (
    BudgetExceeded,
    ConcurrencyLimited,
    Overloaded,
    QuotaStoreUnavailable,
    RateLimited,
)

from .admission import Admission
from .decision import decide
from .estimate import Estimate
from .journal import Journal
from .model import (
    KEY_PERIODS,
    KeyLimits,
    Micro,
    Outcome,
    Period,
    Reason,
    ReserveRequest,
    ReserveResult,
    Settlement,
    TeamLimits,
    UsageSource,
    credits,
    to_micro,
)
from .periods import Window, windows
from .store import LocalStore, Store, StoreUnavailable

__all__ = ["ALL_PERIODS", "KeyQuota", "QuotaService", "key_quotas_of", "limits_of"]

_LOGGER: Final = logging.getLogger(__name__)
_T = TypeVar("_T")
ALL_PERIODS: Final = [Period.DAY, Period.WEEK, Period.MONTH, Period.TOTAL]
_RATE_WINDOW_SECONDS: Final = 60.0
_FULL_WINDOW_RESET: Final = "1m0s"
"""``x-ratelimit-reset-*`` of an admitted request: the sliding window is whole again then."""


class KeyQuota(msgspec.Struct, frozen=True, kw_only=True):
    """A team key's own limits: ``teams[].keys[].budget`` (micro) and ``.limits``."""

    budgets: dict[Period, Micro]
    """Under the ``key_*`` periods: reserved in the same record as the team's budgets."""
    limits: KeyLimits | None
    """RPM, TPM and concurrency, checked with the team's in the same store call."""


def key_quotas_of(config: Config) -> dict[tuple[str, str], KeyQuota]:
    """Return (team, key id) -> the key's own budget and limits, for keys that have any."""
    found: dict[tuple[str, str], KeyQuota] = {}
    for team in config.teams:
        for key in team.keys:
            budgets: dict[Period, Micro] = {}
            if key.budget is not None:
                budgets = {
                    KEY_PERIODS[period]: to_micro(amount)
                    for period in ALL_PERIODS
                    if (amount := getattr(key.budget, period.value)) is not None
                }
            limits = None
            if key.limits is not None and any(
                value is not None
                for value in (key.limits.rpm, key.limits.tpm, key.limits.concurrency)
            ):
                limits = KeyLimits(
                    rpm=key.limits.rpm, tpm=key.limits.tpm, concurrency=key.limits.concurrency
                )
            if budgets or limits is not None:
                found[team.id, key.id] = KeyQuota(budgets=budgets, limits=limits)
    return found


def limits_of(team: TeamConfig) -> TeamLimits:
    """Return the quota limits of a configured team (budgets in micro-credits)."""
    budgets = {
        period: to_micro(amount)
        for period in ALL_PERIODS
        if (amount := getattr(team.budget, period.value)) is not None
    }
    return TeamLimits(
        budgets=budgets,
        rpm=team.limits.rpm,
        tpm=team.limits.tpm,
        concurrency=team.limits.concurrency,
    )


def _tighter(*pairs: tuple[int | None, int | None]) -> tuple[int, int] | None:
    """Of (limit, remaining) pairs, the one with the least remaining (limits that apply only)."""
    found: tuple[int, int] | None = None
    for limit, remaining in pairs:
        if limit is not None and remaining is not None and (found is None or remaining < found[1]):
            found = (limit, remaining)
    return found


def _humanise_seconds(seconds: float) -> str:
    whole = max(math.ceil(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class QuotaService:
    """Admission and settlement against one store, for the teams of one config."""

    def __init__(self, store: Store, config: Config, *, clock: Callable[[], float] = time.time):
        self.store: Final = store
        self._clock = clock
        self._zone = ZoneInfo(config.accounting.timezone)
        self._lease = config.accounting.lease_seconds
        self._timeout = config.store.timeout_seconds
        # Local stores answer in microseconds (sqlite has its own busy timeout): no timer.
        self._remote = store.is_remote
        self._local: LocalStore | None = (
            store if not store.is_remote and isinstance(store, LocalStore) else None
        )
        """The store again when it can settle without waiting (memory, sqlite), else None."""
        self._fail_open = config.store.on_error == "fail_open"
        self._limits = {team.id: limits_of(team) for team in config.teams}
        self._key_quotas = key_quotas_of(config)
        self._windows: tuple[float, float, dict[Period, Window]] | None = None
        self._window_keys: dict[Period, str] = {}
        """Period -> window key of ``self._windows`` (set with it)."""
        """(computed at, valid until, windows): windows only change at a local midnight."""
        self._shadow = {team.id: team.shadow for team in config.teams}
        self._reset_texts: dict[dt.datetime, str] = {}
        self.rejections: Counter[tuple[str, str]] = Counter()
        """(team, reason) -> refusals; reason ``store_unavailable`` included."""
        self.would_reject: Counter[tuple[str, str]] = Counter()
        """(team, reason) -> refusals a shadow team would have had."""
        self.store_errors: Counter[str] = Counter()
        """on_error outcome (``fail_closed``/``fail_open``) -> count."""
        self.store_reachable = True
        """False since the last store call failed, until one succeeds (feeds ``/readyz``)."""
        self.fail_open: Final = self._fail_open
        self.journal: Journal | None = None
        """The outage journal (set by the application): see :mod:`clipia_proxy.journal`."""
        self._slot_seconds: dict[str, float] = {}
        """Team -> moving average of how long its requests held a concurrency slot."""
        self._lookups: dict[str, deque[float]] = {}
        """Team -> times in the last minute of its requests the store did not count in its RPM
        (``/v1/generation`` lookups, chat requests refused before a reservation; this replica)."""
        self._active: dict[str, int] = {}
        """Team -> its chat requests in this gateway (from before the body is read to the end)."""
        self._active_total = 0
        self._left_early: set[str] = set()
        """Requests whose place :meth:`leave_early` ended while their handler still runs."""
        self._key_refused: set[str] = set()
        """Requests their key's own limit or budget refused: no place in the team's RPM (a
        key hammering past its own limit must not take the minute of the team's other keys)."""
        self._shares: dict[str, int] = {}
        self._max_connections = config.upstream.max_connections
        self._apply_shares(config)

    def _apply_shares(self, config: Config) -> None:
        """Compute each team's most requests at once (the lower of its share and concurrency)."""
        total = config.upstream.max_connections
        share = config.upstream.max_connections_per_team
        if share is None:
            share = max(1, total // min(max(len(config.teams), 1), 4))
        self._max_connections = total
        self._shares = {
            team.id: min(share, team.limits.concurrency or share) for team in config.teams
        }

    def enter(self, team: str) -> None:
        """Admit a chat request into the gateway, before its body is read; or raise 429/503.

        Refused at once when the team already has its share in the gateway (its
        ``limits.concurrency``, else ``upstream.max_connections_per_team``: requests still
        sending their bodies count), when its RPM is already spent by requests the store did
        not count, or when every upstream connection is taken. Pair with :meth:`leave`.
        """
        active = self._active.get(team, 0)
        shadow = self._shadow.get(team, False)
        if not shadow:
            share = self._shares.get(team, self._max_connections)
            if active >= share:
                self.rejections[team, Reason.CONCURRENCY.value] += 1
                raise ConcurrencyLimited(
                    f"Team {team!r} already has {active} of {share} requests in flight; retry "
                    "when one finishes.",
                    retry_after=self._slot_wait(team, share),
                )
            limits = self._limits.get(team) if self._lookups else None
            rpm = limits.rpm if limits is not None else None
            if rpm is not None:
                now = self._clock()
                if self._lookups_in_window(team, now) >= rpm:
                    self.rejections[team, Reason.RPM.value] += 1
                    wait = self._lookups[team][0] + _RATE_WINDOW_SECONDS - now
                    raise RateLimited(
                        f"Team {team!r} reached {rpm} requests per minute; retry in "
                        f"{_humanise_seconds(wait)}.",
                        retry_after=max(math.ceil(wait), 1),
                    )
        if self._active_total >= self._max_connections:
            raise Overloaded(
                f"All {self._max_connections} upstream connections of this gateway are in use; "
                "the request was not sent.",
                retry_after=1,
            )
        self._active[team] = active + 1
        self._active_total += 1

    def leave_early(self, team: str, request_id: str) -> None:
        """End a request's place now (its client left) although its handler still runs."""
        if request_id in self._left_early:
            return
        self._left_early.add(request_id)
        self.leave(team, counted=True)

    def left_early(self, request_id: str) -> bool:
        """Whether :meth:`leave_early` ended this request's place (then skip :meth:`leave`)."""
        if request_id in self._left_early:
            self._left_early.discard(request_id)
            self._key_refused.discard(request_id)
            return True
        return False

    def leave(self, team: str, *, counted: bool, request_id: str | None = None) -> None:
        """End a request :meth:`enter` let in; ``counted``: the store has it in the RPM.

        A request refused by its key's own limit or budget (``request_id``) is not counted.
        """
        if self._key_refused and request_id in self._key_refused:
            self._key_refused.discard(request_id)
            counted = True
        active = self._active.get(team, 0) - 1
        if active > 0:
            self._active[team] = active
        else:
            self._active.pop(team, None)
        self._active_total -= 1
        if not counted and self._limits.get(team, TeamLimits()).rpm is not None:
            self._lookups.setdefault(team, deque()).append(self._clock())

    def apply(self, config: Config) -> None:
        """Take a reloaded config's team limits, shadow flags and accounting (store kept)."""
        self._apply_shares(config)
        self._limits = {team.id: limits_of(team) for team in config.teams}
        self._key_quotas = key_quotas_of(config)
        self._shadow = {team.id: team.shadow for team in config.teams}
        self._zone = ZoneInfo(config.accounting.timezone)
        self._lease = config.accounting.lease_seconds
        self._windows = None

    def now(self) -> float:
        """Return the service clock (seconds since the epoch)."""
        return self._clock()

    def windows(self, now: float) -> dict[Period, Window]:
        """Return every period's window at ``now`` (cached until the next reset)."""
        cached = self._windows
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        current = windows(ALL_PERIODS, dt.datetime.fromtimestamp(now, dt.UTC), self._zone)
        next_reset = min(
            window.resets_at.timestamp() for window in current.values() if window.resets_at
        )
        self._windows = (now, next_reset, current)
        self._window_keys = {period: window.key for period, window in current.items()}
        return current

    async def admit(
        self,
        *,
        request_id: str,
        team: str,
        key_id: str | None,
        model: str,
        stream: bool,
        estimate: Estimate,
        environment: str = "live",
        tags: dict[str, str] | None = None,
        end_user: str | None = None,
    ) -> Admission:
        """Reserve the estimate on every period and check every limit, or raise 402/429/503.

        ``environment``, ``tags`` and ``end_user`` are written on the ledger record.
        """
        now = self._clock()
        current = self.windows(now)
        request, limits = self._reserve_request(
            request_id=request_id,
            team=team,
            key_id=key_id,
            model=model,
            stream=stream,
            estimate=estimate,
            now=now,
            environment=environment,
            tags=tags or {},
            end_user=end_user,
        )
        key_limits = request.key_limits
        try:
            if self._remote:
                async with asyncio.timeout(self._timeout):
                    counted = await self.store.reserve(request)
            else:  # local stores answer at once (sqlite has its own busy timeout): no timer
                counted = await self.store.reserve(request)
            result = decide(request, counted)
        except (StoreUnavailable, TimeoutError) as exc:
            return await self._store_unavailable(request, estimate, exc)
        self.store_reachable = True
        if not result.admitted:
            assert result.reason is not None
            self.rejections[team, result.reason.value] += 1
            if result.key or (
                result.period is not None and result.period.calendar is not result.period
            ):
                self._key_refused.add(request_id)
            raise self._refusal(team, result, estimate, current, now, key_id)
        if result.reason is not None:
            self.would_reject[team, result.reason.value] += 1
            _LOGGER.info("shadow team %s would be refused: %s", team, result.reason.value)
        return Admission(
            request_id=request_id,
            team=team,
            amount=estimate.amount,
            estimate=estimate,
            reserved=True,
            headers=self._headers(limits, result, current, key_limits),
            would_reject=result.reason,
            admitted_at=now,
        )

    def _reserve_request(
        self,
        *,
        request_id: str,
        team: str,
        key_id: str | None,
        model: str,
        stream: bool,
        estimate: Estimate,
        now: float,
        environment: str,
        tags: dict[str, str],
        end_user: str | None,
    ) -> tuple[ReserveRequest, TeamLimits]:
        """Return the store's request, and the limits its headers show (the key's budgets in)."""
        limits = self._limits.get(team, TeamLimits())
        lookups = self._lookups_in_window(team, now) if self._lookups else 0
        periods = self._window_keys  # cached with the windows; the stores copy it
        quota = self._key_quotas.get((team, key_id)) if key_id is not None else None
        key_limits = None
        if quota is not None:
            if quota.budgets:
                # The key's own budget: the same calendar windows under a key-scoped window
                # key, reserved in the same record as the team's (all or nothing across both).
                periods = {
                    **periods,
                    **{p: f"{periods[p.calendar]}:key:{key_id}" for p in quota.budgets},
                }
                limits = msgspec.structs.replace(
                    limits, budgets={**limits.budgets, **quota.budgets}
                )
            # The key's own rates and concurrency: decided in the same store call as the team's.
            key_limits = quota.limits
        request = ReserveRequest(
            request_id=request_id,
            team=team,
            amount=estimate.amount,
            tokens=estimate.tokens,
            periods=periods,
            now=now,
            lease_seconds=self._lease,
            # This replica's /v1/generation lookups take their places in the team's RPM.
            limits=limits
            if not lookups or limits.rpm is None
            else msgspec.structs.replace(limits, rpm=max(limits.rpm - lookups, 0)),
            enforce=not self._shadow.get(team, False),
            model=model,
            key_id=key_id,
            key_limits=key_limits,
            stream=stream,
            environment=environment,
            tags=tags,
            end_user=end_user,
        )
        return request, limits

    async def _store_unavailable(
        self, request: ReserveRequest, estimate: Estimate, exc: Exception
    ) -> Admission:
        """The store did not answer: serve unreserved (``fail_open``), or raise 503."""
        request_id, team, now = request.request_id, request.team, request.now
        self.store_reachable = False
        journal = self.journal
        if self._fail_open and (journal is None or journal.has_room()):
            self.store_errors["fail_open"] += 1
            if journal is not None:
                # Served: its record and settlement wait in the journal for the store. A
                # reservation that did land before its reply was lost is the same record
                # (replays are idempotent by request id): never voided, it was sent.
                journal.append(journal.reserve_entry(request))
            else:
                await self._void(request_id)
            _LOGGER.warning(
                "quota store unavailable (%s); fail_open serves %s %s",
                exc.__class__.__name__,
                request_id,
                "journaled" if journal is not None else "unrecorded",
            )
            return Admission(
                request_id=request_id,
                team=team,
                amount=estimate.amount,
                estimate=estimate,
                reserved=False,
                headers={},
                admitted_at=now,
                journaled=journal is not None,
            )
        # Refused, never sent. The store may have applied the reservation before its reply
        # was lost (or may still apply it: a slow store runs queued commands late): the
        # record is closed at 0 by a journaled void, replayed once the store answers (and
        # before this replica's reconciler looks at it), so a request never sent is never
        # charged. Without a journal, one best-effort void now.
        if journal is not None:
            journal.append(journal.void_entry(request_id, now))
        else:
            await self._void(request_id)
        self.store_errors["fail_closed"] += 1
        self.rejections[team, "store_unavailable"] += 1
        _LOGGER.warning("quota store unavailable (%s); refusing", exc.__class__.__name__)
        raise QuotaStoreUnavailable(
            "The quota store is unavailable; the request was not sent.", retry_after=1
        ) from exc

    def _lookups_in_window(self, team: str, now: float) -> int:
        log = self._lookups.get(team)
        if log is None:
            return 0
        while log and log[0] <= now - _RATE_WINDOW_SECONDS:
            log.popleft()
        if not log:
            del self._lookups[team]
            return 0
        return len(log)

    async def count_lookup(self, team: str) -> None:
        """Count one ``GET /v1/generation`` against the team's RPM, or raise 429.

        A lookup is admitted while the team's requests in the shared window plus this
        replica's lookups are under ``limits.rpm``; it then takes a place in the RPM of the
        team's chat requests on this replica for a minute. No budget, no ledger record.
        """
        rpm = self._limits.get(team, TeamLimits()).rpm
        if rpm is None:
            return
        now = self._clock()
        lookups = self._lookups_in_window(team, now)
        try:
            if self._remote:
                async with asyncio.timeout(self._timeout):
                    requests, _ = await self.store.rates(team, now)
            else:
                requests, _ = await self.store.rates(team, now)
        except (StoreUnavailable, TimeoutError):
            requests = 0  # the lookup spends no budget: this replica's own count still holds
        if requests + lookups >= rpm:
            self.rejections[team, Reason.RPM.value] += 1
            log = self._lookups.get(team)
            wait = log[0] + _RATE_WINDOW_SECONDS - now if log else 1.0
            raise RateLimited(
                f"Team {team!r} reached {rpm} requests per minute; retry in "
                f"{_humanise_seconds(wait)}.",
                retry_after=max(math.ceil(wait), 1),
            )
        self._lookups.setdefault(team, deque()).append(now)

    def slot_freed(self, team: str, admitted_at: float) -> None:
        """Learn how long a team's requests hold a concurrency slot (a moving average)."""
        held = max(self._clock() - admitted_at, 0.0)
        average = self._slot_seconds.get(team)
        self._slot_seconds[team] = held if average is None else 0.8 * average + 0.2 * held

    def _slot_wait(self, team: str, limit: int) -> int:
        """Return the seconds until a slot is likely free (an honest ``Retry-After``).

        With ``limit`` requests of the team's average duration in flight at random stages, the
        first ends after about average / (limit + 1). At least 1; 1 while nothing was learnt.
        """
        average = self._slot_seconds.get(team)
        if average is None:
            return 1
        return max(1, math.ceil(average / (limit + 1)))

    def _refusal(
        self,
        team: str,
        result: ReserveResult,
        estimate: Estimate,
        current: dict[Period, Window],
        now: float,
        key_id: str | None = None,
    ) -> Exception:
        match result.reason:
            case Reason.BUDGET:
                assert result.period is not None
                period = result.period.calendar
                window = current[period]
                wait = window.resets_at.timestamp() - now if window.resets_at is not None else None
                resets = f"; resets in {_humanise_seconds(wait)}" if wait is not None else ""
                who = (
                    f"Key {key_id!r} of team {team!r}"
                    if period is not result.period
                    else f"Team {team!r}"
                )
                return BudgetExceeded(
                    f"{who} has used {credits(result.used)} of its "
                    f"{credits(result.limit)} credits per {period.value}; this request "
                    f"may cost up to {credits(estimate.amount)}{resets}.",
                    retry_after=math.ceil(wait) if wait is not None else None,
                )
            case Reason.CONCURRENCY:
                who = f"Key {key_id!r} of team {team!r}" if result.key else f"Team {team!r}"
                return ConcurrencyLimited(
                    f"{who} already has {result.used} of {result.limit} requests in "
                    "flight; retry when one finishes.",
                    retry_after=self._slot_wait(team, result.limit),
                )
            case Reason.RPM:
                if result.key:
                    who, rpm = f"Key {key_id!r} of team {team!r}", None
                else:
                    who, rpm = f"Team {team!r}", self._limits.get(team, TeamLimits()).rpm
                return RateLimited(
                    f"{who} reached {rpm or result.limit} requests per minute; retry in "
                    f"{_humanise_seconds(result.retry_after)}.",
                    retry_after=math.ceil(result.retry_after),
                    limit=result.limit if result.key else None,
                )
            case Reason.TPM:
                who = f"Key {key_id!r} of team {team!r}" if result.key else f"Team {team!r}"
                return RateLimited(
                    f"{who} reached {result.limit} tokens per minute (this request may "
                    f"use {estimate.tokens}); retry in {_humanise_seconds(result.retry_after)}.",
                    retry_after=math.ceil(result.retry_after),
                    reason="tpm",
                    limit=result.limit if result.key else None,
                )
            case None:  # pragma: no cover - refused results always carry a reason
                raise AssertionError("refusal without a reason")

    def _headers(
        self,
        limits: TeamLimits,
        result: ReserveResult,
        current: dict[Period, Window],
        key_limits: KeyLimits | None = None,
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        # The tighter of the team's and the key's own limit (the one that refuses first).
        requests = _tighter(
            (limits.rpm, result.requests_remaining),
            (key_limits.rpm if key_limits else None, result.key_requests_remaining),
        )
        if requests is not None:
            headers["x-ratelimit-limit-requests"] = str(requests[0])
            headers["x-ratelimit-remaining-requests"] = str(requests[1])
            # Sliding 60-second windows: this request leaves the window (which is then back
            # to its full limit) a minute from now. OpenAI's duration format.
            headers["x-ratelimit-reset-requests"] = _FULL_WINDOW_RESET
        tokens = _tighter(
            (limits.tpm, result.tokens_remaining),
            (key_limits.tpm if key_limits else None, result.key_tokens_remaining),
        )
        if tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens[0])
            headers["x-ratelimit-remaining-tokens"] = str(tokens[1])
            headers["x-ratelimit-reset-tokens"] = _FULL_WINDOW_RESET
        if result.budget_remaining is not None and result.budget_period is not None:
            headers["x-clipia-budget-remaining"] = str(credits(result.budget_remaining))
            resets_at = current[result.budget_period.calendar].resets_at
            if resets_at is not None:
                headers["x-clipia-budget-reset"] = self._reset_text(resets_at)
        return headers

    def _reset_text(self, resets_at: dt.datetime) -> str:
        cached = self._reset_texts.get(resets_at)
        if cached is None:
            cached = resets_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
            if len(self._reset_texts) >= 16:  # a few current windows; old ones go
                self._reset_texts.clear()
            self._reset_texts[resets_at] = cached
        return cached

    async def _void(self, request_id: str) -> None:
        void = Settlement(
            cost=Micro(0),
            usage_source=UsageSource.COUNTED,
            outcome=Outcome.NOT_SENT,
            now=self._clock(),
        )
        try:
            async with asyncio.timeout(self._timeout):
                await self.store.settle(request_id, void)
        except (StoreUnavailable, TimeoutError):
            if self.journal is not None:
                self.journal.append(self.journal.void_entry(request_id, void.now))
                _LOGGER.info("could not void %s now; journaled", request_id)
            else:
                _LOGGER.info("could not void %s (store still unavailable)", request_id)

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """Replace the reservation by the actual cost (idempotent; retried while the store fails)."""
        for attempt in range(6):
            try:
                if not self._remote:
                    return await self.store.settle(request_id, settlement)
                async with asyncio.timeout(self._timeout * 2):
                    return await self.store.settle(request_id, settlement)
            except (StoreUnavailable, TimeoutError) as exc:
                _LOGGER.warning(
                    "settlement of %s failed (%s); retry %d",
                    request_id,
                    exc.__class__.__name__,
                    attempt + 1,
                )
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        if self.journal is not None:
            self.journal.append(self.journal.settle_entry(request_id, settlement))
            _LOGGER.error("settlement of %s could not be written; journaled", request_id)
            return False
        _LOGGER.error(
            "settlement of %s could not be written; the reconciler will charge it", request_id
        )
        return False

    def journal_settlement(self, request_id: str, settlement: Settlement) -> None:
        """Journal the settlement of a request admitted through the journal (fail_open)."""
        if self.journal is not None:
            self.journal.append(self.journal.settle_entry(request_id, settlement))

    @property
    def local_store(self) -> LocalStore | None:
        """The store when it can act without waiting (memory, sqlite), else None."""
        return self._local

    async def call(self, operation: Awaitable[_T]) -> _T:
        """Await one store operation, bounded by ``store.timeout_seconds`` for a remote store."""
        if not self._remote:
            return await operation
        async with asyncio.timeout(self._timeout):
            return await operation

    @property
    def settles_locally(self) -> bool:
        """Whether ``settle_nowait`` can be used (memory, sqlite); else use ``settle``."""
        return self._local is not None

    def settle_nowait(self, request_id: str, settlement: Settlement) -> bool:
        """Settle at once (a local store only: see ``settles_locally``)."""
        assert self._local is not None
        return self._local.settle_nowait(request_id, settlement)

    async def budgets(
        self, team: str, key_id: str | None = None
    ) -> list[dict[str, Decimal | str | None]]:
        """Return the team's budget periods for ``GET /v1/key`` (with ``key_id``: the key's own)."""
        if key_id is None:
            budgets = self._limits.get(team, TeamLimits()).budgets
        else:
            quota = self._key_quotas.get((team, key_id))
            if quota is None or not quota.budgets:
                return []
            budgets = quota.budgets
        now = self._clock()
        current = self.windows(now)
        suffix = "" if key_id is None else f":key:{key_id}"
        keys = [current[period.calendar].key + suffix for period in budgets]
        usage = await self.store.usage(team, keys, now)
        out: list[dict[str, Decimal | str | None]] = []
        for (period, limit), key in zip(budgets.items(), keys, strict=True):
            window = current[period.calendar]
            used = usage[key]
            out.append(
                {
                    "period": period.calendar.value,
                    "limit": credits(limit),
                    "spent": credits(used.spent),
                    "reserved": credits(used.reserved),
                    "remaining": credits(max(limit - used.spent - used.reserved, 0)),
                    "resets_at": (
                        window.resets_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
                        if window.resets_at is not None
                        else None
                    ),
                }
            )
        return out

    async def spent_total(self, team: str) -> Decimal:
        """Return everything the team has spent, in credits (the ``total`` window)."""
        usage = await self.store.usage(team, ["total"], self._clock())
        return credits(usage["total"].spent)

    def limits(self, team: str) -> TeamLimits:
        """Return a team's limits."""
        return self._limits.get(team, TeamLimits())

    def key_limits(self, team: str, key_id: str) -> KeyLimits | None:
        """Return a team key's own RPM, TPM and concurrency (``teams[].keys[].limits``)."""
        quota = self._key_quotas.get((team, key_id))
        return quota.limits if quota is not None else None

"""Quota value types: money, periods, limits, reservations and decisions (pure, no I/O).

Money is integer micro-credits (:data:`Micro`) everywhere inside; decimals exist only at the
edges (config, upstream ``usage.cost``, reports). Every conversion from a decimal amount of
credits rounds *up* to the next micro-credit — one rule for reservations and settlements, so
the gateway never under-counts.
"""

from __future__ import annotations

import math
from decimal import Decimal
from enum import StrEnum
from typing import Final, NewType

import msgspec

__all__ = [
    "KEY_PERIODS",
    "MICRO_PER_CREDIT",
    "Counted",
    "KeyLimits",
    "Micro",
    "Outcome",
    "Period",
    "Reason",
    "RecordState",
    "ReserveRequest",
    "ReserveResult",
    "Settlement",
    "TeamLimits",
    "UsageSource",
    "credits",
    "to_micro",
]

Micro = NewType("Micro", int)
"""An amount of Clipia credits in millionths (1 credit = 1 000 000 micro-credits)."""

MICRO_PER_CREDIT: Final = 1_000_000
_MICRO: Final = Decimal(MICRO_PER_CREDIT)


def to_micro(amount: Decimal | int) -> Micro:
    """Return ``amount`` credits in micro-credits, rounded up (never under-counts)."""
    if type(amount) is int:
        return Micro(amount * MICRO_PER_CREDIT)
    return Micro(math.ceil(amount * _MICRO))  # Decimal's ceiling: exact, rounds up


def credits(amount: int) -> Decimal:
    """Return micro-credits as an exact decimal number of credits."""
    return Decimal(amount) / MICRO_PER_CREDIT


class Period(StrEnum):
    """A budget period: calendar day, ISO week, month (in ``accounting.timezone``) or total.

    The ``key_*`` periods are the same calendar windows for one team key's own budget
    (``teams[].keys[].budget``): their window keys are the team window's key plus
    ``:key:<key id>``, reserved and settled with the team's in one record (all or nothing).
    """

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"
    KEY_DAY = "key_day"
    KEY_WEEK = "key_week"
    KEY_MONTH = "key_month"
    KEY_TOTAL = "key_total"

    @property
    def calendar(self) -> Period:
        """The team period whose window this one follows (itself for a team period)."""
        return _CALENDAR.get(self, self)


_CALENDAR: Final[dict[Period, Period]] = {
    Period.KEY_DAY: Period.DAY,
    Period.KEY_WEEK: Period.WEEK,
    Period.KEY_MONTH: Period.MONTH,
    Period.KEY_TOTAL: Period.TOTAL,
}
KEY_PERIODS: Final[dict[Period, Period]] = {team: key for key, team in _CALENDAR.items()}
"""Team period -> the period of a key's own budget over the same window."""


class Reason(StrEnum):
    """Why a request was (or, in shadow mode, would have been) refused."""

    BUDGET = "budget"
    RPM = "rpm"
    TPM = "tpm"
    CONCURRENCY = "concurrency"


class UsageSource(StrEnum):
    """Where a settled cost came from, best first."""

    RESPONSE = "response"
    STREAM = "stream"
    GENERATION = "generation"
    COUNTED = "counted"
    RESERVED = "reserved"


class Outcome(StrEnum):
    """How a request that reached (or may have reached) the upstream ended."""

    COMPLETED = "completed"
    CLIENT_DISCONNECT = "client_disconnect"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    CRASHED = "crashed"
    NOT_SENT = "not_sent"
    """The upstream never received the request (connect failure): settled at 0."""


class RecordState(StrEnum):
    """A ledger record is written ``dispatched`` before dispatch and ``settled`` once."""

    DISPATCHED = "dispatched"
    SETTLED = "settled"


class TeamLimits(msgspec.Struct, frozen=True, kw_only=True):
    """A team's quota limits; ``None`` means unlimited."""

    budgets: dict[Period, Micro] = msgspec.field(default_factory=dict)
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


class KeyLimits(msgspec.Struct, frozen=True, kw_only=True):
    """A team key's own rates and concurrency (``teams[].keys[].limits``); ``None``: unlimited.

    Counted on the key's own sliding minute and leases, next to the team's and in the same
    decision (all or nothing across both). The key's own budget is not here: it rides in the
    team's ``TeamLimits.budgets`` under the ``key_*`` periods.
    """

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


class ReserveRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One admission: check every limit and reserve ``amount`` on every budget period.

    ``periods`` maps each budgeted period to its window key (``day:2026-11-25``); the ledger
    record fields (``model``, ``key_id``, ``stream``) are written with the reservation.
    """

    request_id: str
    team: str
    amount: Micro
    tokens: int
    """Estimated tokens (prompt bound + output cap), counted against TPM."""
    periods: dict[Period, str]
    now: float
    """Seconds since the epoch (the store's clock for windows and leases)."""
    lease_seconds: float
    limits: TeamLimits
    enforce: bool = True
    """False: apply the reservation even past a limit (a shadow team's; a journal replay)."""
    model: str = ""
    key_id: str | None = None
    key_limits: KeyLimits | None = None
    """The key's own RPM/TPM/concurrency: when set (with ``key_id``), the request is also
    checked and counted on the key's own window and leases."""
    stream: bool = False
    environment: str = "live"
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    end_user: str | None = None


class Counted(msgspec.Struct, kw_only=True):
    """A store's answer to ``reserve``: what it counted before this request, and what it did.

    The store applies the reservation when every count plus this request stays within its
    limit (or when the request does not ``enforce`` them) and says so in ``applied``; the
    quota service turns the counts into the decision (:func:`~.decision.decide`).
    """

    applied: bool
    replayed: bool = False
    """This request id was reserved already (a retried call): nothing was applied."""
    live: int = 0
    """The team's requests holding a concurrency slot."""
    requests: int = 0
    """The team's requests in the last 60 seconds."""
    tokens: int = 0
    """The team's tokens in the last 60 seconds."""
    key_live: int = 0
    key_requests: int = 0
    key_tokens: int = 0
    """The same three on the key's own slots and minute (when the request has ``key_limits``)."""
    budgets: dict[Period, int] = msgspec.field(default_factory=dict)
    """Spent + reserved micro-credits of each budgeted period's window."""
    rpm_wait: float = 0.0
    tpm_wait: float = 0.0
    key_rpm_wait: float = 0.0
    key_tpm_wait: float = 0.0
    """Seconds until the request fits that rate limit, set when it does not fit now."""


class ReserveResult(msgspec.Struct, frozen=True, kw_only=True):
    """The decision, and the numbers for headers and messages."""

    admitted: bool
    reason: Reason | None = None
    """Why it was refused (or would have been, when ``shadow``)."""
    period: Period | None = None
    """The budget period that refused it."""
    limit: int = 0
    used: int = 0
    """For a budget: spent + reserved (micro); for rpm/tpm/concurrency: the current count."""
    retry_after: float = 0.0
    requests_remaining: int | None = None
    tokens_remaining: int | None = None
    budget_remaining: Micro | None = None
    """The tightest period's remaining budget after this reservation."""
    budget_period: Period | None = None
    key: bool = False
    """The refusal (``reason`` rpm/tpm/concurrency) is the key's own limit, not the team's."""
    key_requests_remaining: int | None = None
    """Like ``requests_remaining``, on the key's own RPM (when it has one)."""
    key_tokens_remaining: int | None = None
    replayed: bool = False
    """True when this request id was already reserved (a retried call): nothing was applied."""


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    """The actual outcome of a request, replacing its reservation exactly once."""

    cost: Micro
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_source: UsageSource = UsageSource.COUNTED
    outcome: Outcome = Outcome.COMPLETED
    upstream_id: str | None = None
    now: float = 0.0

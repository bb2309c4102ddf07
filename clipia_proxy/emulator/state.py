"""The emulator's memory: what it received, what it answered, what it charged, what is scripted.

:class:`EmulatorState` is shared by every request of one emulator app. Tests build it, keep a
reference, script faults with :meth:`EmulatorState.push_fault`, and afterwards read
:attr:`EmulatorState.requests` and :attr:`EmulatorState.bills`. It holds no aiohttp objects
and performs no I/O; time comes from the injected ``now`` (wall clock, epoch seconds) and
``monotonic`` (rate-limit windows) callables, so tests can move time by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from clipia_proxy.emulator.faults import Fault

__all__ = ["Bill", "EmulatorState", "RateDecision", "RecordedRequest"]

_WINDOW_SECONDS: Final = 60.0
SANDBOX_PREFIX: Final = "clipia_test_"
"""Sandbox keys: their requests are answered and report their computed cost, but charge nothing."""
_KEY_PREFIXES: Final = ("clipia_live_", SANDBOX_PREFIX)


@dataclass(slots=True, kw_only=True)
class RecordedRequest:
    """One request the emulator received, and what it answered.

    The request fields are set on arrival and never change. The response fields (``key``,
    ``status``, ``generation_id``, ``stream``, ``sent``, ``completed``) fill in while the
    request is served, so a test may read a stream's ``sent`` while it is still running.
    """

    method: str
    path: str
    query_string: str
    headers: list[tuple[str, str]]
    """Every header as received, in order, duplicates kept, names in their original case."""
    body: bytes
    json: object | None
    """The body decoded as JSON (fractions as ``Decimal``), or ``None`` if empty or invalid."""
    request_id: str | None
    """The ``X-Request-Id`` header, if any."""
    key: str | None = None
    """The key that authenticated (from any channel); ``None`` if none did."""
    status: int = 0
    """The status answered; 0 until the headers are sent."""
    generation_id: str | None = None
    stream: bool = False
    sent: bytearray = field(default_factory=bytearray)
    """Every body byte written, exactly and in order (for a stream: all events, as written)."""
    completed: bool = False
    """The response reached its natural end (a stream: after ``[DONE]``, or its last event)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bill:
    """What one chat generation was charged; billed in full even if its stream broke."""

    id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    """Credits, rounded half-up to 6 places."""
    streamed: bool
    request_id: str | None
    key: str
    finish_reason: str
    """The first choice's finish reason."""
    created: int
    """Epoch seconds (the response's ``created``)."""

    @property
    def charged(self) -> bool:
        """Whether the key was charged: a sandbox key (``clipia_test_…``) never is."""
        return not self.key.startswith(SANDBOX_PREFIX)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateDecision:
    """The outcome of counting one request against a key's RPM window."""

    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int
    """Seconds until the oldest counted request leaves the window (0 when it is empty)."""


@dataclass(slots=True)
class _Scripted:
    fault: Fault
    remaining: int


class EmulatorState:
    """Everything one emulator app remembers and is scripted with.

    ``hold``: when set to an ``asyncio.Event``, every *billed* chat request (it passed auth,
    validation and limits, and its bill exists) waits for the event before writing its
    response. Race tests set it, fire requests, inspect ``bills``, then ``hold.set()``.
    """

    def __init__(
        self,
        seed: int = 0,
        keys: Iterable[str] | None = None,
        rpm: int = 120,
        *,
        key_limits: dict[str, Decimal] | None = None,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Create the state.

        Args:
            seed: Seeds every generated text; the same seed and input give the same answer.
            keys: Exact accepted keys; ``None`` accepts any ``clipia_live_…``/``clipia_test_…``.
            rpm: Chat requests per key per sliding 60 s window.
            key_limits: Optional credit budget per key; at or over it, chat answers 402.
            now: Wall clock in epoch seconds (``created``, ``created_at``).
            monotonic: Clock for the RPM window.
            sleep: Waits out the ``first_byte_delay`` and ``chunk_gap`` faults (tests pass one
                that records the delays instead of waiting).
        """
        self.seed = seed
        self.keys: frozenset[str] | None = frozenset(keys) if keys is not None else None
        self.rpm = rpm
        self.key_limits: dict[str, Decimal] = dict(key_limits or {})
        self.now = now
        self.monotonic = monotonic
        self.sleep = sleep
        self.hold: asyncio.Event | None = None
        self.requests: list[RecordedRequest] = []
        self.bills: dict[str, Bill] = {}
        self._faults: deque[_Scripted] = deque()
        self._windows: dict[str, deque[float]] = {}
        self._lags: dict[str, int] = {}
        self._counter = 0

    def push_fault(self, *faults: Fault) -> None:
        """Queue ``faults`` (FIFO); each applies to its next ``times`` chat requests."""
        self._faults.extend(_Scripted(f, f.times) for f in faults if f.times > 0)

    def take_fault(self) -> Fault | None:
        """Return the fault for the chat request arriving now, consuming one of its ``times``."""
        if not self._faults:
            return None
        head = self._faults[0]
        head.remaining -= 1
        if head.remaining <= 0:
            self._faults.popleft()
        return head.fault

    @property
    def pending_faults(self) -> int:
        """Return how many chat requests still have a scripted fault waiting."""
        return sum(s.remaining for s in self._faults)

    def reset(self) -> None:
        """Forget records, bills, faults, generation lags and rate windows (ids stay unique)."""
        self.requests.clear()
        self.bills.clear()
        self._faults.clear()
        self._windows.clear()
        self._lags.clear()

    def is_accepted_key(self, key: str) -> bool:
        """Return whether ``key`` authenticates."""
        if self.keys is None:
            return key.startswith(_KEY_PREFIXES) and len(key) > len("clipia_live_")
        # Constant time per candidate, as a real key check would be.
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.keys)

    def _window(self, key: str) -> deque[float]:
        window = self._windows.setdefault(key, deque())
        horizon = self.monotonic() - _WINDOW_SECONDS
        while window and window[0] <= horizon:
            window.popleft()
        return window

    def _decision(self, window: deque[float], *, allowed: bool) -> RateDecision:
        reset = 0
        if window:
            reset = max(1, math.ceil(window[0] + _WINDOW_SECONDS - self.monotonic()))
        return RateDecision(
            allowed=allowed,
            limit=self.rpm,
            remaining=max(0, self.rpm - len(window)),
            reset_seconds=reset,
        )

    def admit(self, key: str) -> RateDecision:
        """Count one chat request for ``key`` if its window has room; say whether it did."""
        window = self._window(key)
        if len(window) >= self.rpm:
            return self._decision(window, allowed=False)
        window.append(self.monotonic())
        return self._decision(window, allowed=True)

    def peek_rate(self, key: str) -> RateDecision:
        """Return ``key``'s window state without counting a request."""
        window = self._window(key)
        return self._decision(window, allowed=len(window) < self.rpm)

    def usage(self, key: str) -> Decimal:
        """Return the credits charged to ``key`` so far (always 0 for a sandbox key)."""
        return sum((b.cost for b in self.bills.values() if b.key == key and b.charged), Decimal(0))

    def is_exhausted(self, key: str) -> bool:
        """Return whether ``key`` has a credit limit and has used all of it."""
        limit = self.key_limits.get(key)
        return limit is not None and self.usage(key) >= limit

    def next_generation_id(self) -> str:
        """Return a fresh ``chatcmpl-`` + 12 hex id, deterministic from the seed and a counter."""
        while True:
            self._counter += 1
            digest = hashlib.sha256(f"{self.seed}:{self._counter}".encode()).hexdigest()
            candidate = f"chatcmpl-{digest[:12]}"
            if candidate not in self.bills:
                return candidate

    def add_bill(self, bill: Bill, *, lag: int = 0) -> None:
        """Record ``bill``; its first ``lag`` generation lookups will answer "not found"."""
        self.bills[bill.id] = bill
        if lag > 0:
            self._lags[bill.id] = lag

    def lookup_generation(self, generation_id: str, key: str | None = None) -> Bill | None:
        """Return the bill for a ``/v1/generation`` lookup, or ``None`` (unknown or lagging).

        With ``key``, only a generation that key created is found (a live key does not see
        the sandbox's generations, nor the other way round).
        """
        bill = self.bills.get(generation_id)
        if bill is None or (key is not None and bill.key != key):
            return None
        lag = self._lags.get(generation_id, 0)
        if lag > 0:
            self._lags[generation_id] = lag - 1
            return None
        return bill

"""Do something once a burst of events is over: one timer, however many events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["AfterQuiet"]


class AfterQuiet:
    """Call ``action`` once ``seconds`` have passed without a :meth:`note`.

    The first note arms one timer; later notes only move the time it waits from, and the
    timer, when it fires early, waits again for the rest: a note costs no timer of its own.
    """

    def __init__(self, seconds: float, action: Callable[[], None]) -> None:
        self.seconds = seconds
        self._action = action
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def note(self) -> None:
        """Something happened: ``action`` waits for ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.seconds, self._fire)

    def cancel(self) -> None:
        """Do not call ``action`` (until the next note)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        waited = loop.time() - self._last
        if waited < self.seconds:  # noted since: wait for the rest
            self._timer = loop.call_later(self.seconds - waited, self._fire)
            return
        self._timer = None
        self._action()

"""Clients that hang up while Clipia is still silent: noticed within a second, one timer for all.

aiohttp tells a handler that is not cancelled nothing when its client leaves: the transport it
answers on is gone (or closing) then. A request waiting for Clipia's first byte is watched
here; once a second one sweep checks every watched request's transport and calls the
``on_gone`` of those whose client left (each at most once). Watching and unwatching are a set
insertion and removal: a timer per request (``call_later`` and its ``cancel``) cost more than
the rest of the check put together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from aiohttp import web

__all__ = ["HangupWatch", "Watched"]

_LOGGER: Final = logging.getLogger(__name__)


class Watched:
    """One watched request; ``cancel`` when its wait is over (idempotent)."""

    __slots__ = ("on_gone", "request", "watch")

    def __init__(
        self, watch: HangupWatch, request: web.BaseRequest, on_gone: Callable[[], None]
    ) -> None:
        self.watch = watch
        self.request = request
        self.on_gone = on_gone

    def cancel(self) -> None:
        """Stop watching (the answer came, or the wait failed)."""
        self.watch.waiting.discard(self)


class HangupWatch:
    """The requests waiting for Clipia, checked together every ``interval`` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self.waiting: set[Watched] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, request: web.BaseRequest, on_gone: Callable[[], None]) -> Watched:
        """Watch ``request`` until the returned handle is cancelled; ``on_gone`` runs once."""
        watched = Watched(self, request, on_gone)
        self.waiting.add(watched)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._sweep)
        return watched

    def close(self) -> None:
        """Stop the sweeps (the app's cleanup); nothing is called any more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.waiting.clear()

    def _sweep(self) -> None:
        self._timer = None
        gone = [watched for watched in self.waiting if _left(watched.request)]
        for watched in gone:
            self.waiting.discard(watched)
            try:
                watched.on_gone()
            except Exception:  # one failing callback must not stop the others'
                _LOGGER.exception("releasing a hung-up request's slot failed")
        if self.waiting:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._sweep)


def _left(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()

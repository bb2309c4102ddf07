"""TaskRegistry: named, referenced background tasks that are drained on shutdown.

Nothing in the gateway is fire-and-forget. A task spawned here is kept alive by a reference,
carries a name, has its exception logged (once, here), and is awaited — for a bounded time, then
cancelled — when the application shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

__all__ = ["TaskRegistry"]

_LOGGER: Final = logging.getLogger(__name__)
_T = TypeVar("_T")


class TaskRegistry:
    """Own every background task of one application."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def pending(self, prefix: str = "") -> int:
        """Return how many tasks whose name starts with ``prefix`` are still running."""
        return sum(1 for task in self._tasks if task.get_name().startswith(prefix))

    def spawn(self, coro: Coroutine[Any, Any, _T], *, name: str) -> asyncio.Task[_T]:
        """Start ``coro`` as a named task that the registry keeps until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            _LOGGER.error("background task %s failed: %s", task.get_name(), exc, exc_info=exc)

    async def drain(self, grace_seconds: float) -> None:
        """Wait up to ``grace_seconds`` for every task, then cancel what is left."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        for task in pending:
            _LOGGER.warning("cancelling background task %s at shutdown", task.get_name())
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

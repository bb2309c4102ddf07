"""Memory back to the operating system once a burst of dropped connections is over.

A connection that never gets a request through (a head over ``server.max_header_bytes``, one
past its header deadline, one refused at the connection cap, a parser error, a client that
connects and leaves) leaves what it allocated to the heap. Hostile heads read a header line at
a time fill it with many small blocks: 600 such connections took the gateway from 48 to
125 MiB, and after they had all closed it stayed at 125 MiB (reused by the next burst, never
returned: the allocator keeps freed pages inside its heap). glibc's ``malloc_trim(0)``
returns them (measured: 125 -> 52 MiB, a few milliseconds of the event loop).

:class:`MemoryTrim` calls it once per burst: when at least ``burst`` connections were dropped
and none for ``quiet_seconds``. Connections that served a request never count, so ordinary
traffic never trims. Where the C library has no ``malloc_trim`` (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from typing import Final

from .quiet import AfterQuiet

__all__ = ["MemoryTrim", "malloc_trim"]

_LOGGER: Final = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """Return the C library's ``malloc_trim`` through ctypes, or None where it has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


malloc_trim: Final = _find_malloc_trim()
"""``malloc_trim(pad)`` of the C library (returns 1 when memory was released), or None."""


class MemoryTrim:
    """Trims the heap once after each burst of dropped connections (see the module docstring)."""

    def __init__(
        self,
        *,
        burst: int = 64,
        quiet_seconds: float = 1.0,
        trim: Callable[[int], int] | None = malloc_trim,
    ) -> None:
        self._burst = burst
        self._trim = trim
        self._dropped = 0
        self._quiet = AfterQuiet(quiet_seconds, self._after_quiet)
        self.trims = 0
        """How many times the heap was trimmed."""

    def dropped(self) -> None:
        """Count a connection closed without serving a request (both ports' protocols call it)."""
        if self._trim is None:
            return
        self._dropped += 1
        if self._dropped >= self._burst:
            self._quiet.note()

    def close(self) -> None:
        """Stop waiting for the end of a burst (the server stops)."""
        self._quiet.cancel()

    def _after_quiet(self) -> None:
        if self._trim is None:  # pragma: no cover - dropped() counts nothing without it
            return
        dropped, self._dropped = self._dropped, 0
        began = time.perf_counter()
        self._trim(0)
        self.trims += 1
        _LOGGER.info(
            "%d connections closed without a request: the heap was trimmed (%.1f ms)",
            dropped,
            (time.perf_counter() - began) * 1000,
        )

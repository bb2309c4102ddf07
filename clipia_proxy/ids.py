"""Request ids: the gateway's own, and whether a client's ``X-Request-Id`` may be kept."""

from __future__ import annotations

import itertools
import secrets
from typing import Final

__all__ = ["new_request_id"]

_REQUEST_IDS: Final = map(f"{secrets.token_hex(10)}{{:012x}}".format, itertools.count(1))
"""80 random bits per process (replicas never collide) + a counter (no syscall per request,
unlike uuid4). Unique, not secret: they are in every response header."""


def new_request_id() -> str:
    """Return a fresh request id (32 lowercase hex characters)."""
    return next(_REQUEST_IDS)

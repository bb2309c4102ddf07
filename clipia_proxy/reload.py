"""Config hot reload: on SIGHUP and when the config file changes, validate and swap atomically.

What a reload changes for *new* requests: team keys (a revoked key gets 401 at once), identity
mode, model policy, caps, budgets, rate limits and shadow mode, catalog TTLs. What it keeps:
counters, reservations and the ledger (the store), open streams (they finish under the config
they started with), the upstream connection pool and the metrics registry. Settings that need
new sockets or a new store (``server.*``, ``upstream.*``, ``store.*``) are *not* applied: the
reload succeeds, and a warning names each one that waits for a restart.

An invalid new file changes nothing: the old config keeps serving, the problems are logged and
``config_reloads_total{result="error"}`` counts it. Kubernetes updates a mounted ConfigMap by
swapping a symlink: the watcher compares the resolved file's identity (device, inode, size,
mtime), so both in-place edits and symlink swaps are seen.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from .config import Config, ConfigError, load_config

__all__ = ["Reloader", "restart_only_changes"]

_LOGGER: Final = logging.getLogger(__name__)
_RESTART_ONLY: Final = ("server", "upstream", "store")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Return the changed settings that a reload cannot apply (``server.port``, …)."""
    changed: list[str] = []
    for section in _RESTART_ONLY:
        before, after = getattr(old, section), getattr(new, section)
        changed.extend(
            f"{section}.{field}"
            for field in before.__struct_fields__
            if getattr(before, field) != getattr(after, field)
        )
    return changed


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()  # follows symlinks: a ConfigMap update swaps the link target
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Reloader:
    """Watch one config file; call ``apply`` with each valid new config."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        current: Callable[[], Config],
        apply: Callable[[Config], None],
        record: Callable[[str], None],
        interval: float = 2.0,
    ) -> None:
        self._path = Path(path)
        self._current = current
        self._apply = apply
        self._record = record
        self._interval = interval
        self._seen: tuple[int, int, int, int] | None = None
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """Load, validate and apply the file now; return whether the new config took effect."""
        async with self._lock:
            self._seen = await asyncio.to_thread(_identity, self._path)
            try:
                # Reading and validating touches files (YAML, key file, zone data): a thread.
                # Secrets are read at start only (upstream.* and store.* need a restart).
                config = await asyncio.to_thread(load_config, self._path, resolve_secrets=False)
            except ConfigError as exc:
                self._record("error")
                _LOGGER.error(  # noqa: TRY400 - the problems are the message
                    "config reload refused; the previous config keeps serving: %s",
                    "; ".join(exc.problems),
                )
                return False
            waiting = restart_only_changes(self._current(), config)
            self._apply(config)
            self._record("success")
            for warning in config.warnings:
                _LOGGER.warning("%s", warning)
            if waiting:
                _LOGGER.warning(
                    "config reloaded; these changes wait for a restart: %s", ", ".join(waiting)
                )
            else:
                _LOGGER.info("config reloaded")
            return True

    async def prime(self) -> None:
        """Note the file as it is now (the config in force was loaded from it)."""
        self._seen = await asyncio.to_thread(_identity, self._path)

    async def watch(self, pause: Callable[[float], Awaitable[bool]]) -> None:
        """Check the file every ``interval`` seconds and reload on change.

        ``pause(seconds)`` sleeps and returns True when watching must stop (shutdown).
        """
        while not await pause(self._interval):
            identity = await asyncio.to_thread(_identity, self._path)  # stat: off the loop
            if identity is not None and identity != self._seen:
                await self.reload()

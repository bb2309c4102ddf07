"""Run the gateway: the data port and the admin port in one process, with a graceful stop.

On SIGTERM (or SIGINT) ``/readyz`` turns 503 at once and new requests get 503 ``draining``;
the listening sockets close, in-flight requests and streams get
``server.shutdown_grace_seconds`` to finish, background work is drained, and ``serve`` returns
(the process exits 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from .app import create_admin_app, create_app
from .config import Config, Secret
from .keys import HEALTH

__all__ = ["Running", "serve", "start"]

_LOGGER: Final = logging.getLogger(__name__)


class Running:
    """A started gateway: its runners and the ports it actually listens on."""

    def __init__(
        self,
        app: web.Application,
        data: web.AppRunner,
        admin: web.AppRunner,
        ports: tuple[int, int],
    ) -> None:
        self.app: Final = app
        self.data_runner: Final = data
        self.admin_runner: Final = admin
        self.port, self.admin_port = ports

    async def stop(self) -> None:
        """Drain and stop: readiness off, sockets closed, in-flight work given the grace period."""
        self.app[HEALTH].is_draining = True
        await self.data_runner.cleanup()
        await self.admin_runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the runner is not listening")  # pragma: no cover


async def start(config: Config, *, api_key: Secret | None = None) -> Running:
    """Start both ports (a port of 0 picks a free one) and return the running gateway."""
    app = create_app(config, api_key=api_key)
    admin = create_admin_app(app)
    grace = config.server.shutdown_grace_seconds
    data_runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace)
    admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
    await data_runner.setup()
    await admin_runner.setup()
    host = config.server.host
    await web.TCPSite(data_runner, host, config.server.port).start()
    await web.TCPSite(admin_runner, host, config.server.admin_port).start()
    return Running(
        app, data_runner, admin_runner, (_bound_port(data_runner), _bound_port(admin_runner))
    )


async def serve(
    config: Config,
    *,
    api_key: Secret | None = None,
    on_ready: Callable[[Running], Awaitable[None] | None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""
    running = await start(config, api_key=api_key)
    _LOGGER.info(
        "clipia-proxy listening on %s:%d (admin %d)",
        config.server.host,
        running.port,
        running.admin_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if on_ready is not None:
            result = on_ready(running)
            if result is not None:
                await result
        await stop.wait()
        _LOGGER.info(
            "shutdown requested; draining for up to %.0fs", config.server.shutdown_grace_seconds
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await running.stop()
        _LOGGER.info("clipia-proxy stopped")

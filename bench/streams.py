"""RSS per open stream: hold many streams open through a proxy and watch its resident memory.

The emulator is told (``POST /_emulator/faults``) to send the first two events of each of the
next ``count`` streams (the role delta and the first token) and then stall with the socket
open. The benchmark opens ``count`` such streams through the proxy, waits until every one has
delivered its first token (so each is a live, relayed stream inside the proxy: a client
connection, an upstream connection and the relay state), samples the proxy's RSS, and divides
the growth over the baseline by the number of open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Final

import aiohttp

from clipia_proxy.wire import encode_json

from .load import _FIRST_TOKEN, Target, chat_body
from .procs import Child

_OPENING_AT_ONCE: Final = 64
"""Streams being opened at the same time (connect + first token), to spare the listen backlog."""


@dataclass
class HoldResult:
    requested: int
    opened: int
    failed: int
    rss_before: int
    rss_open: int
    rss_after_close: int
    open_seconds: float
    sockets_before: int
    sockets_open: int
    sockets_after_close: int

    @property
    def bytes_per_stream(self) -> float | None:
        if self.opened == 0:
            return None
        return (self.rss_open - self.rss_before) / self.opened


async def _control(session: aiohttp.ClientSession, url: str, payload: dict[str, object]) -> None:
    async with session.post(
        url, data=encode_json(payload), headers={"Content-Type": "application/json"}
    ) as resp:
        await resp.read()
        resp.raise_for_status()


async def hold_streams(
    target: Target,
    proxy: Child,
    *,
    emulator_root: str,
    count: int,
    max_tokens: int,
    open_timeout: float,
    settle_seconds: float = 0.5,
) -> HoldResult:
    """Open ``count`` stalled streams through ``target``; return the proxy's RSS before/while/after.

    Also counts the proxy's TCP sockets (client + upstream) at the same moments: after close,
    they should fall back to about the keep-alive pool.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    connector = aiohttp.TCPConnector(limit=count + 8, limit_per_host=count + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as control:
        await _control(control, f"{emulator_root}/_emulator/reset", {})
        await _control(
            control,
            f"{emulator_root}/_emulator/faults",
            {"stall_after_chunks": 2, "stall_seconds": 300.0, "times": count},
        )
        await asyncio.sleep(settle_seconds)
        rss_before = proxy.rss_bytes()
        sockets_before = proxy.tcp_connections()

        body = chat_body(target.model, stream=True, max_tokens=max_tokens)
        headers = target.headers()
        gate = asyncio.Semaphore(_OPENING_AT_ONCE)
        release = asyncio.Event()
        all_open = asyncio.Event()
        opened = 0
        failed = 0

        def settled() -> None:
            if opened + failed >= count:
                all_open.set()

        async def one() -> None:
            nonlocal opened, failed
            first = False
            try:
                async with gate:
                    resp = await control.post(target.chat_url, data=body, headers=headers)
                    head = b""
                    async for chunk in resp.content.iter_any():
                        head += chunk
                        if _FIRST_TOKEN.search(head):
                            first = True
                            break
                if not first:
                    resp.release()
                    return
                opened += 1
                settled()
                await release.wait()
                resp.close()
            except (aiohttp.ClientError, TimeoutError):
                pass
            finally:
                if not first:
                    failed += 1
                    settled()

        started = time.perf_counter()
        streams = asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_open.wait(), open_timeout)
            open_seconds = time.perf_counter() - started
            await asyncio.sleep(settle_seconds)
            rss_open = proxy.rss_bytes()
            sockets_open = proxy.tcp_connections()
            held = opened
        finally:
            release.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(streams, 15)
        # Leave the emulator clean: drop any stall faults not consumed.
        await _control(control, f"{emulator_root}/_emulator/reset", {})
    await asyncio.sleep(1.0)
    return HoldResult(
        requested=count,
        opened=held,
        failed=count - held,
        rss_before=rss_before,
        rss_open=rss_open,
        rss_after_close=proxy.rss_bytes(),
        open_seconds=open_seconds,
        sockets_before=sockets_before,
        sockets_open=sockets_open,
        sockets_after_close=proxy.tcp_connections(),
    )

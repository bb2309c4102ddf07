"""``python -m bench.passthrough``: the floor — a bare aiohttp pass-through proxy.

No auth, no policy, no usage tap, no logs: it forwards ``POST /v1/chat/completions`` to the
upstream with one keep-alive ``ClientSession`` and relays the answer (streams chunk by chunk).
Measured next to the gateway, it shows how much of the gateway's cost is aiohttp's HTTP
server + client machinery on this machine, and how much is the gateway's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Final

import aiohttp
from aiohttp import web

SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: Final = web.AppKey("upstream", str)
_KEY_ENV: Final = "CLIPIA_API_KEY"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {
        "Authorization": f"Bearer {os.environ[_KEY_ENV]}",
        "Content-Type": "application/json",
    }
    session = request.app[SESSION]
    async with session.post(request.app[UPSTREAM], data=body, headers=headers) as upstream:
        if upstream.content_type != "text/event-stream":
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def _serve(host: str, port: int, upstream: str) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/healthz", _healthz)
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION] = session
        app[UPSTREAM] = upstream.rstrip("/") + "/chat/completions"
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8090/v1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    coro = _serve(args.host, args.port, args.upstream)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop  # the gateway runs on uvloop too

            uvloop.run(coro)
        except ImportError:
            asyncio.run(coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

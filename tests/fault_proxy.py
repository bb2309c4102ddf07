"""A small asyncio TCP fault proxy for store tests (Redis today): latency, lost replies, refusal.

``FaultProxy(host, port)`` listens on an ephemeral loopback port and pipes every connection to
the target. Faults are set on the live object and apply to bytes flowing from then on:

- ``delay``: seconds to wait before forwarding each server→client chunk (a slow store);
- ``drop_replies``: the next N server→client chunks are swallowed and the client connection is
  reset instead — the request *was* applied by the server, its reply is lost;
- ``drop_only_after``: with it set, ``drop_replies`` counts only replies on a connection whose
  last client chunk contained these bytes (e.g. one script's SHA), so a background command of
  the client under test cannot take the fault meant for a request;
- ``refuse``: new connections are closed at once (the store is down).
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    """A TCP proxy in the test's event loop (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = 0.0
        self.drop_replies = 0
        self.refuse = False
        self.drop_only_after: bytes | None = None
        self.dropped = 0
        """Replies swallowed so far."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> int:
        """Listen on 127.0.0.1 and return the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        """A ``redis://`` URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cut_all(self) -> None:
        """Reset every open connection (both sides)."""
        for writer in list(self._writers):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        self.cut_all()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        sent = [b""]  # the last client→server chunk on this connection
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(reader, up_writer, replies=False, sent=sent))
                group.create_task(self._pipe(up_reader, writer, replies=True, sent=sent))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for side in (writer, up_writer):
                side.transport.abort()
                self._writers.discard(side)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        replies: bool,
        sent: list[bytes],
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.transport.abort()
                return
            if not replies:
                sent[0] = data
            else:
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                marker = self.drop_only_after
                if self.drop_replies > 0 and (marker is None or marker in sent[0]):
                    self.drop_replies -= 1
                    self.dropped += 1
                    writer.transport.abort()
                    return
            writer.write(data)
            await writer.drain()

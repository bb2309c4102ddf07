"""Memory back to the OS after a burst of hostile connections (``clipia_proxy.memtrim``).

600 hostile heads, a header line per read, left the gateway's heap 75 MiB larger after they
had all closed (reused, never returned); glibc's ``malloc_trim`` returns it. These tests check
that the C library's function is found where it exists (a loud failure, not a silent no-op,
if ctypes stops finding it), that a burst through the real data port trims once it is over,
and the counting rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform

import pytest

from clipia_proxy import memtrim
from clipia_proxy.memtrim import MemoryTrim
from tests.harness import Stack, wait_until
from tests.http_client import assert_envelope, assert_served, connection, read_reply


@pytest.mark.skipif(platform.system() != "Linux", reason="malloc_trim is glibc's")
def test_malloc_trim_is_found_on_glibc() -> None:
    """On Linux with glibc (this machine, the Docker image, CI) the trim must be there."""
    assert platform.libc_ver()[0] == "glibc", platform.libc_ver()
    assert memtrim.malloc_trim is not None
    assert memtrim.malloc_trim(0) in (0, 1)


async def _hostile_head(port: int) -> None:
    """A head past ``max_header_bytes``, a header line per write: answered 431 and closed."""
    async with connection(port) as (reader, writer):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError, OSError):
            for index in range(20):
                writer.write(b"X-Fill-%d: %s\r\n" % (index, b"a" * 4000))
                await writer.drain()
        assert_envelope(await read_reply(reader), 431, "request_header_fields_too_large")


async def test_a_burst_of_hostile_heads_trims_the_heap_once_it_is_over(stack: Stack) -> None:
    trim = stack.running.trim
    assert trim is not None
    for _ in range(5):  # served connections never count
        await assert_served(stack)
    before = trim.trims
    await asyncio.gather(*(_hostile_head(stack.running.port) for _ in range(80)))
    await wait_until(lambda: trim.trims == before + 1, what="one trim after the burst")
    await assert_served(stack)


async def test_a_trim_needs_a_burst_and_comes_once_per_burst() -> None:
    calls: list[int] = []

    def record(pad: int) -> int:
        calls.append(pad)
        return 1

    trim = MemoryTrim(burst=3, quiet_seconds=0.01, trim=record)
    trim.dropped()
    trim.dropped()
    await asyncio.sleep(0.05)
    assert calls == []  # two dropped connections are no burst
    trim.dropped()
    await wait_until(lambda: calls == [0], what="the trim")
    trim.dropped()
    trim.dropped()
    await asyncio.sleep(0.05)
    assert calls == [0]  # the count starts again after a trim
    assert trim.trims == 1
    trim.close()


async def test_without_malloc_trim_nothing_is_counted_or_scheduled() -> None:
    trim = MemoryTrim(burst=1, quiet_seconds=0.01, trim=None)
    for _ in range(5):
        trim.dropped()
    await asyncio.sleep(0.03)
    assert trim.trims == 0

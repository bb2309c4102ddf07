"""Load shedding is counted: what the ClipiaProxyLoadShedding alert reads.

A connection refused at a port's cap (503 ``overloaded``, closed before any handler runs) is
``clipia_proxy_connections_refused_total{port}``; a request shed because every upstream
connection is taken is ``clipia_proxy_rejections_total{team, reason="overloaded"}``. Both
through the running gateway; before this, neither moved.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable

import aiohttp

from clipia_proxy.emulator import Fault
from tests.harness import Stack, open_connections, wait_until
from tests.http_client import assert_envelope, closed_by_server, connection, read_reply

Factory = Callable[..., Awaitable[Stack]]


async def _sample(stack: Stack, name: str, labels: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.admin_url + "/metrics") as response,
    ):
        text = await response.text()
    match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{{{labels}}} is exported"
    return float(match[1])


async def test_a_connection_refused_at_the_cap_is_counted(stacks: Factory) -> None:
    stack = await stacks(server={"max_connections": 2, "header_timeout_seconds": 5})
    name = "clipia_proxy_connections_refused_total"
    assert await _sample(stack, name, 'port="data"') == 0
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(connection(stack.running.port))
        await wait_until(
            lambda: open_connections(stack.running) == 2, what="2 accepted connections"
        )
        for _ in range(3):
            async with connection(stack.running.port) as (reader, writer):
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                assert_envelope(await read_reply(reader), 503, "overloaded")
                assert await closed_by_server(reader)
        assert await _sample(stack, name, 'port="data"') == 3
        assert await _sample(stack, name, 'port="admin"') == 0


async def test_the_admin_ports_refusals_are_counted_apart(stacks: Factory) -> None:
    stack = await stacks(server={"admin_max_connections": 2, "header_timeout_seconds": 5})
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(connection(stack.running.admin_port))
        await wait_until(
            lambda: open_connections(stack.running, admin=True) == 2, what="2 admin connections"
        )
        async with connection(stack.running.admin_port) as (reader, _writer):
            assert_envelope(await read_reply(reader), 503, "overloaded")
    name = "clipia_proxy_connections_refused_total"
    assert await _sample(stack, name, 'port="admin"') == 1
    assert await _sample(stack, name, 'port="data"') == 0


async def test_a_request_shed_for_upstream_connections_is_counted_for_its_team(
    stacks: Factory,
) -> None:
    stack = await stacks(upstream={"max_connections": 2, "max_connections_per_team": 2})
    stack.emulator.push_fault(Fault(stall_after_chunks=1, times=2))
    name = "clipia_proxy_rejections_total"
    labels = 'reason="overloaded",team="research"'
    assert await _sample(stack, name, labels) == 0
    body = {"model": "gpt-5.5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as held:
        for _ in range(2):
            reply = await held.enter_async_context(
                session.post(
                    f"{stack.base_url}/chat/completions",
                    headers=stack.auth("search"),
                    json={**body, "stream": True},
                )
            )
            assert reply.status == 200
            await reply.content.readany()
        async with session.post(
            f"{stack.base_url}/chat/completions", headers=stack.auth("research"), json=body
        ) as shed:
            assert shed.status == 503
            assert b'"code":"overloaded"' in await shed.read()
        assert await _sample(stack, name, labels) == 1
        assert await _sample(stack, name, 'reason="overloaded",team="search"') == 0

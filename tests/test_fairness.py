"""Fairness through HTTP: slow bodies, RPM before the body, upstream shares, 503 overloaded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from clipia_proxy.emulator import Fault
from tests.conftest import Stack

Factory = Callable[..., Awaitable[Stack]]

TEAMS = """
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    limits: {limits}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""

BODY: dict[str, Any] = {
    "model": "gpt-5.5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def teams(limits: str = "{}") -> str:
    return TEAMS.replace("{limits}", limits.replace("{", "{{").replace("}", "}}"))


async def chat(
    stack: Stack, session: aiohttp.ClientSession, team: str = "search", data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        f"{stack.base_url}/chat/completions",
        headers={**stack.auth(team), "Content-Type": "application/json"},
        **({"data": data} if data is not None else {"json": BODY}),
    ) as reply:
        return reply.status, dict(reply.headers), await reply.read()


async def inflight(stack: Stack, session: aiohttp.ClientSession, team: str) -> float:
    async with session.get(f"{stack.admin_url}/metrics") as reply:
        text = await reply.text()
    prefix = f'clipia_proxy_inflight_requests{{team="{team}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def until_inflight(
    stack: Stack, session: aiohttp.ClientSession, team: str, count: int
) -> None:
    async with asyncio.timeout(10):
        while await inflight(stack, session, team) < count:  # noqa: ASYNC110 - a scrape
            await asyncio.sleep(0.01)


@asynccontextmanager
async def slow_body(stack: Stack, team: str = "search") -> AsyncIterator[None]:
    """A request whose headers arrived and whose body never finishes (until the exit)."""
    port = stack.running.port
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {stack.keys[team]}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        ).encode()
    )
    await writer.drain()
    try:
        yield
    finally:
        writer.close()
        await writer.wait_closed()


@asynccontextmanager
async def held_stream(
    stack: Stack, session: aiohttp.ClientSession, team: str = "search"
) -> AsyncIterator[None]:
    """A stream the emulator stalls after its first chunk, held open until the exit."""
    async with session.post(
        f"{stack.base_url}/chat/completions",
        headers=stack.auth(team),
        json={**BODY, "stream": True},
    ) as reply:
        assert reply.status == 200
        await reply.content.readany()
        yield


async def test_slow_bodies_count_against_the_teams_concurrency(stacks: Factory) -> None:
    stack = await stacks(teams=teams("{concurrency: 2}"))
    async with aiohttp.ClientSession() as session, AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(slow_body(stack))
        await until_inflight(stack, session, "search", 2)
        status, headers, body = await chat(stack, session)
        assert status == 429
        assert b"concurrency_limit_exceeded" in body
        assert headers["Retry-After"] == "1"
        assert (await chat(stack, session, team="research"))[0] == 200
    assert len(stack.chat_requests()) == 1


async def test_rpm_is_charged_before_the_body_is_parsed(stacks: Factory) -> None:
    stack = await stacks(teams=teams("{rpm: 3}"))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await chat(stack, session, data=b'{"model": '))[0] == 400
        # Three refused bodies used the three requests of the minute.
        status, headers, body = await chat(stack, session)
        assert status == 429
        assert b"rate_limit_exceeded" in body
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert (await chat(stack, session, data=b'{"model": '))[0] == 429
        assert (await chat(stack, session, team="research"))[0] == 200
    assert len(stack.chat_requests()) == 1


async def test_no_team_takes_more_than_its_share_of_upstream_connections(
    stacks: Factory,
) -> None:
    # 4 connections, 2 teams, no concurrency limit: each team may hold 2 at once.
    stack = await stacks(teams=teams(), upstream={"max_connections": 4})
    stack.emulator.push_fault(Fault(stall_after_chunks=1, times=2))
    async with aiohttp.ClientSession() as session, AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(held_stream(stack, session))
        status, _, body = await chat(stack, session)
        assert status == 429
        assert b"concurrency_limit_exceeded" in body
        for _ in range(4):
            assert (await chat(stack, session, team="research"))[0] == 200


async def test_every_connection_taken_is_503_overloaded_with_retry_after(
    stacks: Factory,
) -> None:
    stack = await stacks(
        teams=teams(), upstream={"max_connections": 2, "max_connections_per_team": 2}
    )
    stack.emulator.push_fault(Fault(stall_after_chunks=1, times=2))
    async with aiohttp.ClientSession() as session, AsyncExitStack() as held:
        for _ in range(2):
            await held.enter_async_context(held_stream(stack, session))
        status, headers, body = await chat(stack, session, team="research")
    assert status == 503
    assert b'"code":"overloaded"' in body
    assert headers["Retry-After"] == "1"
    assert len(stack.chat_requests()) == 2


def test_a_share_outside_the_pool_is_refused() -> None:
    from clipia_proxy.config import ConfigError, parse_config

    for share in (0, 513):
        text = f"upstream: {{max_connections: 512, max_connections_per_team: {share}}}\n"
        with pytest.raises(ConfigError, match=r"upstream\.max_connections_per_team"):
            parse_config(text, source="t.yaml", resolve_secrets=False)

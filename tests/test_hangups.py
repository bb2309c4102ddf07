"""Client hang-ups with the real openai SDK: the ledger equals Clipia's charge, to the micro-credit.

The default ``accounting.on_disconnect: cancel`` closes the upstream as soon as its id is known
and settles from ``/v1/generation``; the team's concurrency slot is freed when the gateway sees
the client gone, while the money stays reserved until the settlement. Each test goes through a
gateway's HTTP entry point on loopback with the emulator as the upstream and ends with the
ledger audit (tests/audit.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import openai
import pytest
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from clipia_proxy.emulator import Fault
from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.model import Outcome, UsageSource
from tests.audit import CHAT_PATH, Cluster, audit, emulator_served, start_cluster
from tests.conftest import Stack

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a long story"}]
EXACT = {UsageSource.RESPONSE.value, UsageSource.STREAM.value, UsageSource.GENERATION.value}
TEAMS = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 1000}}
    limits: {{concurrency: 1}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    made = await start_cluster(1, teams=TEAMS)
    try:
        yield made
    finally:
        await made.stop()


def sdk(gateway: Stack) -> openai.AsyncOpenAI:
    """The openai SDK with its defaults (2 retries), pointed at the gateway."""
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.keys["search"])


async def open_stream(
    client: openai.AsyncOpenAI, *, with_usage: bool = False
) -> tuple[str, AsyncStream[ChatCompletionChunk]]:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.5",
        messages=PROMPT,
        stream=True,
        max_tokens=40,
        stream_options={"include_usage": True} if with_usage else openai.omit,
    )
    parsed = raw.parse()
    assert isinstance(parsed, AsyncStream)
    return raw.headers["x-request-id"], parsed


async def read_until(
    stream: AsyncStream[ChatCompletionChunk], stop: Callable[[ChatCompletionChunk, int], bool]
) -> int:
    """Read chunks until ``stop(chunk, count)`` holds, then hang up; return the count read."""
    count = 0
    async for chunk in stream:
        count += 1
        if stop(chunk, count):
            break
    await stream.close()  # the SDK's own way to hang up: closes the HTTP response
    return count


async def hang_up_once_clipia_has_it(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    """Start a stream and hang up as soon as Clipia received it (before its first byte)."""
    async with asyncio.TaskGroup() as group:
        opening = group.create_task(open_stream(client))
        async with asyncio.timeout(10):
            while True:
                if [r for r in cluster.emulator.requests if r.path == CHAT_PATH]:
                    break
                await asyncio.sleep(0.01)
        opening.cancel()
    await client.close()  # the app gives up: its connection closes


async def before_first_byte(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    cluster.emulator.push_fault(Fault(first_byte_delay=0.5, chunk_gap=0.05))
    await hang_up_once_clipia_has_it(cluster, client)
    (received,) = [r for r in cluster.emulator.requests if r.path == CHAT_PATH]
    assert received.status == 0  # no byte of the answer yet


async def after_first_chunk(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    cluster.emulator.push_fault(Fault(chunk_gap=0.05))
    _, stream = await open_stream(client)
    assert await read_until(stream, lambda _chunk, count: count == 1) == 1


async def mid_stream(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    cluster.emulator.push_fault(Fault(chunk_gap=0.05))
    _, stream = await open_stream(client)
    assert await read_until(stream, lambda _chunk, count: count == 12) == 12


async def before_usage_chunk(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    cluster.emulator.push_fault(Fault(chunk_gap=0.05))
    _, stream = await open_stream(client, with_usage=True)

    def finished(chunk: ChatCompletionChunk, _count: int) -> bool:
        return any(choice.finish_reason for choice in chunk.choices)

    await read_until(stream, finished)


async def after_done(cluster: Cluster, client: openai.AsyncOpenAI) -> None:
    cluster.emulator.push_fault(Fault(chunk_gap=0.01))
    _, stream = await open_stream(client)
    await read_until(stream, lambda _chunk, _count: False)  # to the SDK's end: [DONE]


POINTS: dict[str, Callable[[Cluster, openai.AsyncOpenAI], Awaitable[None]]] = {
    "before_first_byte": before_first_byte,
    "after_first_chunk": after_first_chunk,
    "mid_stream": mid_stream,
    "before_usage_chunk": before_usage_chunk,
    "after_done": after_done,
}


@pytest.mark.parametrize("point", list(POINTS))
async def test_hang_up_is_billed_what_clipia_charged(cluster: Cluster, point: str) -> None:
    gateway = cluster.gateways[0]
    client = sdk(gateway)
    try:
        await POINTS[point](cluster, client)
    finally:
        await client.close()
    # The SDK never retried: one request reached Clipia, and it was billed.
    await asyncio.wait_for(_served(cluster), 5)
    (request_id,) = [r.request_id for r in cluster.emulator.requests if r.path == CHAT_PATH]
    assert request_id is not None
    bill = emulator_served(cluster.emulator)[request_id]
    records = await audit(cluster.gateways, cluster.emulator)
    (record,) = records
    assert record.request_id == request_id
    assert record.usage_source in EXACT, record
    assert (record.cost, record.prompt_tokens, record.completion_tokens) == (
        bill.cost,
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    if point != "after_done":
        assert record.outcome is Outcome.CLIENT_DISCONNECT
        # cancel: Clipia's stream was closed, not read to its end.
        (upstream,) = [r for r in cluster.emulator.requests if r.path == CHAT_PATH]
        assert not upstream.completed


async def _served(cluster: Cluster) -> None:
    while True:
        if emulator_served(cluster.emulator):
            return
        await asyncio.sleep(0.02)


async def test_hang_up_frees_the_teams_concurrency_slot_at_once(cluster: Cluster) -> None:
    """Concurrency 1: the next request is served while the abandoned stream would still run."""
    gateway = cluster.gateways[0]
    client = sdk(gateway)
    try:
        # A long answer: 40 chunks 0.25 s apart, ~10 s if read (or drained) to its end.
        cluster.emulator.push_fault(Fault(chunk_gap=0.25))
        _, stream = await open_stream(client)
        await read_until(stream, lambda _chunk, count: count == 1)
        # The gateway notices at its next write to the gone client; a request sent before it
        # does is refused with concurrency_limit_exceeded (the SDK is told not to retry here).
        next_client = client.with_options(max_retries=0)
        answer = None
        async with asyncio.timeout(5):
            while True:
                try:
                    answer = await next_client.chat.completions.create(
                        model="gpt-5.5", messages=PROMPT, max_tokens=5
                    )
                except openai.RateLimitError as exc:
                    refused = exc
                else:
                    break
                assert refused.code == "concurrency_limit_exceeded"
                await asyncio.sleep(0.05)
        assert answer is not None
        assert answer.choices
    finally:
        await client.close()
    await audit(cluster.gateways, cluster.emulator)
    quotas = gateway.running.app[QUOTAS]
    assert await quotas.store.dispatched() == []


async def test_hang_up_before_the_first_byte_frees_the_slot_while_clipia_computes(
    cluster: Cluster,
) -> None:
    """The client leaves while Clipia is still silent: the next request need not wait for it."""
    gateway = cluster.gateways[0]
    client = sdk(gateway)
    try:
        cluster.emulator.push_fault(Fault(first_byte_delay=4))
        await hang_up_once_clipia_has_it(cluster, client)
        (silent,) = [r for r in cluster.emulator.requests if r.path == CHAT_PATH]
        next_client = openai.AsyncOpenAI(
            base_url=gateway.base_url, api_key=gateway.keys["search"], max_retries=0
        )
        answer = None
        async with asyncio.timeout(10):
            while True:
                try:
                    answer = await next_client.chat.completions.create(
                        model="gpt-5.5", messages=PROMPT, max_tokens=5
                    )
                except openai.RateLimitError as exc:
                    refused = exc
                else:
                    break
                assert refused.code == "concurrency_limit_exceeded"
                await asyncio.sleep(0.05)
        await next_client.close()
        assert answer is not None
        # Served while the abandoned request was still waiting for its first byte.
        assert silent.status == 0
    finally:
        await client.close()
    await asyncio.wait_for(_all_answered(cluster), 10)
    await audit(cluster.gateways, cluster.emulator)


async def _all_answered(cluster: Cluster) -> None:
    while True:
        if all(r.status for r in cluster.emulator.requests if r.path == CHAT_PATH):
            return
        await asyncio.sleep(0.05)

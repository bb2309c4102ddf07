"""kill -9 mid-stream, restart: the ledger equals what the upstream charged, to the micro-credit.

A real ``clipia-proxy serve`` process (tests/test_crash.py's harness), the real openai SDK with
its defaults through the HTTP entry point, the emulator as the upstream. The stream's upstream
id is durable from its first chunk, so the restarted gateway settles the cut stream from
``/v1/generation`` — retried while the lookup lags, the money reserved meanwhile (no budget
hole) — instead of charging its worst-case reservation.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from clipia_proxy.emulator import Fault
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Outcome, RecordState, UsageSource
from tests.audit import emulator_served
from tests.harness import STORE_TIMEOUT, Served
from tests.test_crash import Harness, audited, crash_harness, spent

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with crash_harness(tmp_path) as made:
        yield made


async def cut_stream(harness: Harness, gateway: Served, chunks: int = 3) -> str:
    """Start a stream with the openai SDK, read ``chunks`` chunks, kill -9 the gateway."""
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=harness.team_key)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=PROMPT, stream=True
        )
        request_id = raw.headers["x-request-id"]
        parsed = raw.parse()
        assert isinstance(parsed, AsyncStream)
        stream: AsyncStream[ChatCompletionChunk] = parsed
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == chunks:
                break
        assert seen == chunks
        assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(openai.APIError):
            async for _chunk in stream:
                pass
    finally:
        await client.close()
    return request_id


async def key_view(harness: Harness, gateway: Served) -> dict[str, Decimal]:
    info = await harness.key_info(gateway)
    view = spent(info, settled=False)
    budgets = info["budgets"]
    assert isinstance(budgets, list)
    view["reserved"] = max(Decimal(str(b["reserved"])) for b in budgets)
    return view


@pytest.mark.parametrize("lag", [0, 2], ids=["generation-ready", "generation-lags"])
async def test_sigkill_mid_stream_settles_at_the_upstream_bill(harness: Harness, lag: int) -> None:
    emulator = harness.emulator
    gateway = await harness.start()
    emulator.push_fault(Fault(chunk_gap=0.05, generation_lag=lag))
    request_id = await cut_stream(harness, gateway)
    bill = emulator_served(emulator)[request_id].cost
    assert bill > 0

    restarted = await harness.start()
    if lag:
        # The lookup lags: the record waits with its money reserved (no budget hole).
        view = await key_view(harness, restarted)
        assert view["usage"] == 0
        assert view["reserved"] > Decimal(bill) / MICRO_PER_CREDIT
    async with asyncio.timeout(20):
        while True:
            view = await key_view(harness, restarted)
            if not view["reserved"]:
                break
            await asyncio.sleep(0.1)
    expected = Decimal(bill) / MICRO_PER_CREDIT
    assert view == {"usage": expected, "day": expected, "month": expected, "reserved": 0}
    assert await restarted.stop() == 0
    (record,) = await audited(harness)
    assert record.request_id == request_id
    assert record.state is RecordState.SETTLED
    assert (record.outcome, record.usage_source) == (Outcome.CRASHED, UsageSource.GENERATION)
    assert record.cost == bill
    assert record.cost < record.reserved


async def test_sigkill_mid_stream_on_a_shared_redis_store(
    tmp_path: Path, redis_url: str, ledger_section: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three replicas on one Redis, one killed mid-stream: a survivor settles it at the bill.

    Between the dead replica's lease end and the survivor's reconciliation, the money stays
    reserved: the team's budget never sees the spend vanish.
    """
    token = secrets.token_hex(6)
    env = f"CLIPIA_CRASH_REDIS_{token.upper()}"
    monkeypatch.setenv(env, redis_url)
    store = (
        f"{{backend: redis, redis_url_env: {env}, redis_key_prefix: crash-{token}, replicas: 3, "
        f"timeout_seconds: {STORE_TIMEOUT}}}"
        f"\n{ledger_section}"
    )
    async with crash_harness(tmp_path, store, {env: redis_url}) as harness:
        # Short leases so the survivors' reconciler (every lease / 2) reaches the dead one's record.
        harness.config_text = harness.config_text.replace(
            "api_key_env: TEST_CLIPIA_KEY}",
            "api_key_env: TEST_CLIPIA_KEY, first_byte_timeout_seconds: 1}\n"
            "accounting: {lease_seconds: 2}",
        )
        harness.config_path.write_text(harness.config_text)
        victim, *survivors = await asyncio.gather(*(harness.start() for _ in range(3)))
        harness.emulator.push_fault(Fault(chunk_gap=0.05))
        request_id = await cut_stream(harness, victim)
        bill = emulator_served(harness.emulator)[request_id].cost
        expected = Decimal(bill) / MICRO_PER_CREDIT
        async with asyncio.timeout(20):
            while True:
                view = await key_view(harness, survivors[0])
                if view["usage"]:
                    break
                # Not settled yet: the money must still be reserved (never a hole).
                assert view["reserved"] > expected
                await asyncio.sleep(0.05)
        assert view == {"usage": expected, "day": expected, "month": expected, "reserved": 0}
        for survivor in survivors:
            assert await survivor.stop() == 0
        (record,) = await audited(harness, redis_url=redis_url)
        assert (record.request_id, record.cost) == (request_id, bill)
        assert (record.outcome, record.usage_source) == (Outcome.CRASHED, UsageSource.GENERATION)

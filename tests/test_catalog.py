"""The model catalog: chat-only parsing, Decimal prices, TTL, single flight, stale-on-error.

``Catalog`` is driven directly with an injected clock and the real ``UpstreamClient`` against
the emulator on an ephemeral port; readiness is checked through the admin port.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web

from clipia_proxy.catalog import Catalog, parse_catalog
from clipia_proxy.config import CatalogConfig, Secret, UpstreamConfig
from clipia_proxy.emulator import CATALOG, EmulatorState
from clipia_proxy.errors import UpstreamUnavailable
from clipia_proxy.tasks import TaskRegistry
from clipia_proxy.upstream import UpstreamClient
from clipia_proxy.wire import decode_json, encode_json
from tests.harness import Clock, Stack, start_emulator

MEDIA_IDS = {"flux-2-pro", "veo-4", "nano-banana-3"}
TTL = 10.0
MAX_STALE = 100.0


@dataclass
class Harness:
    """A Catalog wired to a real UpstreamClient and a running emulator."""

    catalog: Catalog
    clock: Clock
    state: EmulatorState
    runner: web.AppRunner
    tasks: TaskRegistry
    upstream: UpstreamClient

    def model_fetches(self) -> int:
        return sum(1 for r in self.state.requests if r.path == "/v1/models")

    async def settle(self) -> None:
        """Wait (bounded) until no background refresh is running."""
        for _ in range(100):
            if len(self.tasks) == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the background refresh did not finish")


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    emulator = await start_emulator()
    upstream = UpstreamClient(
        UpstreamConfig(
            base_url=emulator.base_url,
            api_key_env=None,
            connect_timeout_seconds=1,
            first_byte_timeout_seconds=2,
            idle_timeout_seconds=2,
            retries=0,
        ),
        Secret(emulator.clipia_key),
    )
    await upstream.start()
    tasks = TaskRegistry()
    clock = Clock()
    catalog = Catalog(
        upstream,
        CatalogConfig(ttl_seconds=TTL, max_stale_seconds=MAX_STALE),
        tasks,
        clock=clock,
    )
    try:
        yield Harness(catalog, clock, emulator.state, emulator.runner, tasks, upstream)
    finally:
        await tasks.drain(2)
        await upstream.close()
        await emulator.stop()


# --------------------------------------------------------------------------------------------
# parse_catalog (pure)


def test_parse_keeps_only_chat_models() -> None:
    snapshot = parse_catalog(decode_json(encode_json({"data": list(CATALOG)})), fetched_at=5.0)
    chat_ids = {str(e["id"]) for e in CATALOG} - MEDIA_IDS
    assert set(snapshot.entries) == chat_ids
    assert not MEDIA_IDS & set(snapshot.entries)
    assert snapshot.fetched_at == 5.0
    for model_id, entry in snapshot.entries.items():
        assert entry.id == model_id
        assert entry.raw["id"] == model_id


def test_prices_are_exact_decimals_from_text() -> None:
    snapshot = parse_catalog(decode_json(encode_json({"data": list(CATALOG)})), fetched_at=0.0)
    opus = snapshot.entries["claude-opus-4-8"]
    assert isinstance(opus.prompt_price, Decimal)
    assert opus.prompt_price == Decimal("0.0004")
    assert str(opus.prompt_price) == "0.0004"
    assert opus.completion_price == Decimal("0.002")
    deepseek = snapshot.entries["deepseek-v4"]
    assert deepseek.prompt_price == Decimal("0.00003")
    assert deepseek.completion_price == Decimal("0.00011")
    for entry in snapshot.entries.values():
        raw_pricing = entry.raw["pricing"]
        assert isinstance(raw_pricing, dict)
        assert entry.prompt_price == Decimal(str(raw_pricing["prompt"]))


def _chat_entry(model_id: str, pricing: object) -> dict[str, object]:
    entry = copy.deepcopy(next(e for e in CATALOG if e["id"] == "gpt-5.5"))
    entry["id"] = model_id
    entry["pricing"] = pricing
    return entry


@pytest.mark.parametrize(
    ("pricing", "prompt"),
    [
        ({"prompt": "0.5", "completion": "1"}, Decimal("0.5")),
        ({"prompt": "1e-7", "completion": "1"}, Decimal("1e-7")),
        ({"prompt": 2, "completion": 1}, Decimal(2)),
        ({"prompt": "-1", "completion": "1"}, None),
        ({"prompt": "NaN", "completion": "1"}, None),
        ({"prompt": "Infinity", "completion": "1"}, None),
        ({"prompt": "abc", "completion": "1"}, None),
        ({"prompt": True, "completion": "1"}, None),
        ({"prompt": None, "completion": "1"}, None),
        ({"completion": "1"}, None),
        ("free", None),
        (None, None),
    ],
)
def test_price_parsing_fails_closed(pricing: object, prompt: Decimal | None) -> None:
    snapshot = parse_catalog({"data": [_chat_entry("m", pricing)]}, fetched_at=0.0)
    assert snapshot.entries["m"].prompt_price == prompt


def test_json_number_prices_stay_exact() -> None:
    """A price written as a JSON number decodes to Decimal (never through a float)."""
    body = b'{"data":[{"id":"m","architecture":{},"context_length":1,"pricing":{"prompt":0.0000003,"completion":0.1}}]}'
    entry = parse_catalog(decode_json(body), fetched_at=0.0).entries["m"]
    assert entry.prompt_price == Decimal("0.0000003")
    assert entry.completion_price == Decimal("0.1")


@pytest.mark.parametrize(
    "item",
    [
        "not-an-object",
        {"id": 5, "architecture": {}, "context_length": 1},
        {"id": "", "architecture": {}, "context_length": 1},
        {"id": "no-arch", "context_length": 1},
        {"id": "no-context", "architecture": {}},
        {"id": "arch-not-object", "architecture": "text", "context_length": 1},
    ],
)
def test_malformed_or_media_items_are_skipped(item: object) -> None:
    snapshot = parse_catalog({"data": [item, _chat_entry("ok", None)]}, fetched_at=0.0)
    assert set(snapshot.entries) == {"ok"}


@pytest.mark.parametrize("data", [None, [], "x", {}, {"data": {}}, {"data": "x"}])
def test_not_a_catalog_raises(data: object) -> None:
    with pytest.raises(ValueError, match="catalog"):
        parse_catalog(data, fetched_at=0.0)


# --------------------------------------------------------------------------------------------
# Freshness with an injected clock


async def test_cold_catalog_is_not_warm(harness: Harness) -> None:
    assert harness.catalog.is_warm() is False
    assert harness.catalog.age() is None
    snapshot = await harness.catalog.get()
    assert harness.catalog.is_warm() is True
    assert harness.catalog.age() == 0.0
    assert "gpt-5.5" in snapshot.entries
    assert not MEDIA_IDS & set(snapshot.entries)
    assert harness.model_fetches() == 1
    assert harness.catalog.refresh_results == {"success": 1, "error": 0}


async def test_within_ttl_no_refetch(harness: Harness) -> None:
    assert harness.catalog.fresh() is None  # cold
    first = await harness.catalog.get()
    for step in (1.0, 5.0, TTL):
        harness.clock.t = first.fetched_at + step
        assert await harness.catalog.get() is first
        assert harness.catalog.fresh() is first
    harness.clock.t = first.fetched_at + TTL + 0.001
    assert harness.catalog.fresh() is None  # due for a refresh: the caller must go to get()
    await harness.settle()
    assert harness.model_fetches() == 1


async def test_after_ttl_stale_served_and_one_background_refresh(harness: Harness) -> None:
    first = await harness.catalog.get()
    harness.clock.t = first.fetched_at + TTL + 1
    # Many callers past the TTL: each gets the stale snapshot at once, one refresh runs.
    results = [await harness.catalog.get() for _ in range(10)]
    assert all(result is first for result in results)
    await harness.settle()
    assert harness.model_fetches() == 2
    fresh = await harness.catalog.get()
    assert fresh is not first
    assert fresh.fetched_at == harness.clock.t
    assert harness.model_fetches() == 2
    assert harness.catalog.refresh_results == {"success": 2, "error": 0}


async def test_concurrent_cold_gets_single_flight(harness: Harness) -> None:
    results = await asyncio.gather(*(harness.catalog.get() for _ in range(20)))
    assert harness.model_fetches() == 1
    assert all(result is results[0] for result in results)


async def test_concurrent_stale_gets_single_flight(harness: Harness) -> None:
    first = await harness.catalog.get()
    harness.clock.t = first.fetched_at + TTL + 1
    results = await asyncio.gather(*(harness.catalog.get() for _ in range(20)))
    assert all(result is first for result in results)
    await harness.settle()
    assert harness.model_fetches() == 2


async def test_past_max_stale_callers_wait_for_refresh(harness: Harness) -> None:
    first = await harness.catalog.get()
    harness.clock.t = first.fetched_at + MAX_STALE + 1
    assert harness.catalog.is_warm() is False
    results = await asyncio.gather(*(harness.catalog.get() for _ in range(5)))
    assert all(result is results[0] for result in results)
    assert results[0] is not first
    assert harness.model_fetches() == 2
    assert harness.catalog.is_warm() is True


async def test_refresh_failure_keeps_old_snapshot_until_max_stale(harness: Harness) -> None:
    first = await harness.catalog.get()
    await harness.runner.cleanup()  # Clipia goes away
    harness.clock.t = first.fetched_at + TTL + 1
    assert await harness.catalog.get() is first
    await harness.settle()
    assert harness.catalog.refresh_results["error"] == 1
    assert harness.catalog.is_warm() is True
    harness.clock.t = first.fetched_at + MAX_STALE
    assert await harness.catalog.get() is first
    await harness.settle()
    assert harness.catalog.is_warm() is True
    harness.clock.t = first.fetched_at + MAX_STALE + 1
    assert harness.catalog.is_warm() is False
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.refresh()


async def test_cold_refresh_failure_raises(harness: Harness) -> None:
    await harness.runner.cleanup()
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    assert harness.catalog.is_warm() is False
    assert harness.catalog.refresh_results == {"success": 0, "error": 1}


async def test_failed_fetches_back_off(harness: Harness) -> None:
    await harness.runner.cleanup()  # Clipia is down from the start
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    # Moments later: 502 at once, no new fetch (1 s back-off after the first failure).
    harness.clock.advance(0.5)
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    assert harness.catalog.refresh_results["error"] == 1
    harness.clock.advance(0.6)
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    assert harness.catalog.refresh_results["error"] == 2
    # The second failure doubles the wait to 2 s.
    harness.clock.advance(1.5)
    with pytest.raises(UpstreamUnavailable):
        await harness.catalog.get()
    assert harness.catalog.refresh_results["error"] == 2


async def test_stale_catalog_waits_out_the_back_off(harness: Harness) -> None:
    first = await harness.catalog.get()
    await harness.runner.cleanup()
    harness.clock.t = first.fetched_at + TTL + 1
    assert await harness.catalog.get() is first
    await harness.settle()
    assert harness.catalog.refresh_results["error"] == 1
    harness.clock.advance(0.5)  # inside the back-off: served stale, no new background fetch
    assert await harness.catalog.get() is first
    assert harness.catalog.refresh_results["error"] == 1
    assert harness.tasks.pending("catalog-refresh") == 0


async def test_cancelled_caller_does_not_cancel_shared_refresh(harness: Harness) -> None:
    waiter = harness.tasks.spawn(harness.catalog.get(), name="impatient")
    await asyncio.sleep(0)
    waiter.cancel()
    snapshot = await harness.catalog.get()
    assert "gpt-5.5" in snapshot.entries
    assert harness.model_fetches() == 1


# --------------------------------------------------------------------------------------------
# Through HTTP


async def test_readyz_after_warm_up(stack: Stack) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{stack.admin_url}/readyz") as response:
            assert response.status == 200
            body = await response.json()
        assert body == {"status": "ready", "problems": []}
        models_fetched = [r for r in stack.emulator.requests if r.path == "/v1/models"]
        assert len(models_fetched) == 1
        async with session.get(f"{stack.base_url}/models", headers=stack.auth()) as response:
            assert response.status == 200
            listed = {m["id"] for m in (await response.json())["data"]}
        assert listed
        assert not MEDIA_IDS & listed
        # Served from the cache: no second upstream fetch.
        assert len([r for r in stack.emulator.requests if r.path == "/v1/models"]) == 1


async def test_media_model_is_not_served(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(
            f"{stack.base_url}/chat/completions",
            json={"model": "flux-2-pro", "messages": [{"role": "user", "content": "hi"}]},
            headers=stack.auth("research"),
        ) as response,
    ):
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "model_not_found"
    assert stack.chat_requests() == []

"""The drift check through the HTTP entry point: the ledger is corrected to Clipia's own cost.

A settlement whose cost did not come from the upstream (here: no usage in the answer and a
``/v1/generation`` that lags past the settlement's lookups, so the reservation is charged) is
always checked; with the lookup answering later, the record is corrected to the exact bill and
the metrics say so. A sampled settlement that agrees is counted ``match``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from clipia_proxy.emulator import Fault
from clipia_proxy.keys import DRIFT, QUOTAS
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, UsageSource
from tests.audit import Cluster, audit, emulator_served, start_cluster
from tests.test_ledger_audit import chat, record_of
from tests.test_metrics import scrape


@pytest.fixture
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    rate = getattr(request, "param", 0)
    made = await start_cluster(
        1, extra=f"accounting: {{drift_sample_rate: {rate}, drift_check_delay_seconds: 0}}"
    )
    try:
        yield made
    finally:
        await made.stop()


async def drift_done(cluster: Cluster, checks: int) -> None:
    """Wait (bounded) until the drift checker has run ``checks`` checks and has none queued."""
    app = cluster.gateways[0].running.app
    async with asyncio.timeout(15):
        while True:
            stats = await scrape(cluster.gateways[0])
            done = sum(stats.series("clipia_proxy_drift_checks_total").values())
            if done >= checks and not len(app[DRIFT]):
                return
            await asyncio.sleep(0.05)


async def test_a_settlement_charged_its_reservation_is_corrected_to_the_bill(
    cluster: Cluster,
) -> None:
    gateway = cluster.gateways[0]
    # No usage in the answer; /v1/generation lags past the settlement's 4 lookups.
    cluster.emulator.push_fault(Fault(no_usage=True, generation_lag=4))
    reply = await chat(gateway, stream=False)
    assert reply.status == 200
    await drift_done(cluster, 1)
    bill = emulator_served(cluster.emulator)[reply.request_id]
    record = await record_of(gateway, reply.request_id)
    assert record.usage_source == UsageSource.GENERATION
    assert (record.cost, record.prompt_tokens, record.completion_tokens) == (
        bill.cost,
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    await audit(cluster.gateways, cluster.emulator)
    # The budgets moved with it: spent is the bill, nothing reserved.
    usage = await gateway.running.app[QUOTAS].store.usage("search", ["total"], 0)
    assert (usage["total"].spent, usage["total"].reserved) == (bill.cost, 0)
    stats = await scrape(gateway)
    assert stats.by("clipia_proxy_drift_checks_total", "result") == {
        ("match",): 0,
        ("corrected",): 1,
        ("unavailable",): 0,
    }
    drift = stats.value("clipia_proxy_cost_drift_credits_total", team="search")
    assert drift is not None
    assert Decimal(str(drift)) == (Decimal(record.reserved) - bill.cost) / MICRO_PER_CREDIT


async def test_a_silent_generation_is_asked_again_before_giving_up(cluster: Cluster) -> None:
    gateway = cluster.gateways[0]
    # Lags past the settlement's 4 lookups and the drift check's first one.
    cluster.emulator.push_fault(Fault(no_usage=True, generation_lag=5))
    reply = await chat(gateway, stream=False)
    assert reply.status == 200
    await drift_done(cluster, 1)
    record = await record_of(gateway, reply.request_id)
    assert record.usage_source == UsageSource.GENERATION
    assert record.cost == emulator_served(cluster.emulator)[reply.request_id].cost
    stats = await scrape(gateway)
    assert stats.value("clipia_proxy_drift_checks_total", result="corrected") == 1
    assert stats.value("clipia_proxy_drift_checks_total", result="unavailable") == 0


@pytest.mark.parametrize("cluster", [1], indirect=True)
async def test_sampled_settlements_that_agree_are_counted_match(cluster: Cluster) -> None:
    gateway = cluster.gateways[0]
    for stream in (False, True):
        assert (await chat(gateway, stream=stream)).status == 200
    await drift_done(cluster, 2)
    stats = await scrape(gateway)
    assert stats.by("clipia_proxy_drift_checks_total", "result") == {
        ("match",): 2,
        ("corrected",): 0,
        ("unavailable",): 0,
    }
    assert stats.value("clipia_proxy_cost_drift_credits_total", team="search") is None
    await audit(cluster.gateways, cluster.emulator)

"""QuotaService over a MemoryStore with an injected clock: refusals, headers, shadow, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Config, parse_config
from clipia_proxy.errors import (
    BudgetExceeded,
    ConcurrencyLimited,
    QuotaStoreUnavailable,
    RateLimited,
)
from clipia_proxy.quotas.admission import Admission
from clipia_proxy.quotas.estimate import Estimate
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import (
    Counted,
    Micro,
    Outcome,
    Period,
    Reason,
    RecordState,
    ReserveRequest,
    Settlement,
)
from clipia_proxy.quotas.service import QuotaService, limits_of
from clipia_proxy.quotas.store import StoreUnavailable
from tests.harness import Clock

MSK = ZoneInfo("Europe/Moscow")
# 2026-11-25 21:30 in Moscow: 2 h 30 min before the day resets.
NOW = dt.datetime(2026, 11, 25, 21, 30, tzinfo=MSK).timestamp()
DAY_RESET = dt.datetime(2026, 11, 26, 0, 0, tzinfo=MSK).timestamp()
MONTH_RESET = dt.datetime(2026, 12, 1, 0, 0, tzinfo=MSK).timestamp()


def config(
    *,
    budget: str = "{}",
    limits: str = "{}",
    shadow: bool = False,
    on_error: str = "fail_closed",
    timeout: float = 0.2,
) -> Config:
    text = f"""
store: {{backend: memory, on_error: {on_error}, timeout_seconds: {timeout}}}
upstream: {{first_byte_timeout_seconds: 120}}
accounting: {{timezone: Europe/Moscow, lease_seconds: 600}}
teams:
  - id: search
    keys: [{{id: search-1, sha256: {hash_key(generate_key())}}}]
    budget: {budget}
    limits: {limits}
    shadow: {"true" if shadow else "false"}
"""
    return parse_config(text, source="test.yaml", resolve_secrets=False)


def worst(amount_credits: str = "0.6", prompt: int = 100, output: int = 400) -> Estimate:
    return Estimate(
        prompt_tokens=prompt,
        output_tokens=output,
        n=1,
        amount=Micro(int(Decimal(amount_credits) * 1_000_000)),
    )


def service(cfg: Config, clock: Clock | None = None) -> tuple[QuotaService, MemoryStore, Clock]:
    store = MemoryStore()
    clk = clock or Clock(NOW)
    return QuotaService(store, cfg, clock=clk), store, clk


_SEQ = iter(range(10**9))


async def admit(
    quotas: QuotaService, estimate: Estimate | None = None, rid: str | None = None
) -> Admission:
    return await quotas.admit(
        request_id=rid or f"req-{next(_SEQ)}",
        team="search",
        key_id="search-1",
        model="gpt-5.5",
        stream=False,
        estimate=estimate or worst(),
    )


def test_limits_of_converts_budgets_to_micro_credits() -> None:
    cfg = config(budget="{day: 1.5, month: 0.0000015, total: 100}", limits="{rpm: 5, tpm: 9}")
    limits = limits_of(cfg.teams[0])
    assert limits.budgets == {
        Period.DAY: 1_500_000,
        Period.MONTH: 2,  # rounds up
        Period.TOTAL: 100_000_000,
    }
    assert (limits.rpm, limits.tpm, limits.concurrency) == (5, 9, None)


async def test_admission_headers() -> None:
    quotas, store, _ = service(config(budget="{day: 1, month: 10}", limits="{rpm: 5, tpm: 10000}"))
    admission = await admit(quotas, worst("0.25", prompt=100, output=400))
    assert admission.reserved
    assert admission.would_reject is None
    assert admission.headers == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9500",
        "x-ratelimit-reset-tokens": "1m0s",
        "x-clipia-budget-remaining": "0.75",
        "x-clipia-budget-reset": "2026-11-25T21:00:00Z",
    }
    record = await store.record(admission.request_id)
    assert record is not None
    assert record.windows == {
        Period.DAY: "day:2026-11-25",
        Period.WEEK: "week:2026-W48",
        Period.MONTH: "month:2026-11",
        Period.TOTAL: "total",
    }
    assert record.lease_until == NOW + 600


async def test_no_limits_no_headers() -> None:
    quotas, _, _ = service(config())
    admission = await admit(quotas)
    assert admission.headers == {}


async def test_budget_exceeded_is_402_with_retry_after_to_the_reset() -> None:
    quotas, store, _ = service(config(budget="{day: 1, month: 10}"))
    await admit(quotas, worst("0.6"))
    with pytest.raises(BudgetExceeded) as caught:
        await admit(quotas, worst("0.5"), rid="refused")
    error = caught.value
    assert error.status == 402
    assert error.code == "budget_exceeded"
    assert error.retry_after == math.ceil(DAY_RESET - NOW) == 9000
    assert error.message == (
        "Team 'search' has used 0.6 of its 1 credits per day; this request may cost up to 0.5; "
        "resets in 2h30m."
    )
    assert quotas.rejections["search", "budget"] == 1
    assert await store.record("refused") is None


async def test_budget_exceeded_on_the_month() -> None:
    quotas, _, clock = service(config(budget="{day: 100, month: 1}"))
    clock.t = MONTH_RESET - 90.5
    with pytest.raises(BudgetExceeded) as caught:
        await admit(quotas, worst("1.000001"))
    assert caught.value.retry_after == 91
    assert "credits per month" in caught.value.message
    assert "resets in 1m31s" in caught.value.message


async def test_total_budget_never_resets() -> None:
    quotas, _, _ = service(config(budget="{total: 0.1}"))
    with pytest.raises(BudgetExceeded) as caught:
        await admit(quotas, worst("0.2"))
    assert caught.value.retry_after is None
    assert "resets" not in caught.value.message
    assert "credits per total" in caught.value.message


async def test_budget_is_per_day_and_resets_at_local_midnight() -> None:
    quotas, _, clock = service(config(budget="{day: 1}"))
    clock.t = DAY_RESET - 0.1  # admitted 23:59:59.9 Moscow time
    first = await admit(quotas, worst("1"))
    with pytest.raises(BudgetExceeded):
        await admit(quotas, worst("0.000001"))
    clock.t = DAY_RESET + 1
    # Settled after midnight: charged to the day it was admitted in.
    await quotas.settle(first.request_id, Settlement(cost=Micro(900_000), now=clock.t))
    usage = await quotas.store.usage("search", ["day:2026-11-25", "day:2026-11-26"], clock.t)
    assert usage["day:2026-11-25"].spent == 900_000
    assert usage["day:2026-11-26"].spent == 0
    assert (await admit(quotas, worst("1"))).reserved


async def test_rpm_is_429_with_retry_after() -> None:
    quotas, _, clock = service(config(limits="{rpm: 2}"))
    await admit(quotas)
    clock.t += 10
    await admit(quotas)
    clock.t += 10
    with pytest.raises(RateLimited) as caught:
        await admit(quotas)
    error = caught.value
    assert not isinstance(error, ConcurrencyLimited)
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert error.retry_after == 40
    assert error.message == "Team 'search' reached 2 requests per minute; retry in 40s."
    assert quotas.rejections["search", "rpm"] == 1
    clock.t += 40
    assert (await admit(quotas)).reserved


async def test_tpm_is_429_with_the_tokens_in_the_message() -> None:
    quotas, _, clock = service(config(limits="{tpm: 1000}"))
    await admit(quotas, worst(prompt=200, output=600))
    clock.t += 5.5
    with pytest.raises(RateLimited) as caught:
        await admit(quotas, worst(prompt=100, output=200))
    assert caught.value.retry_after == 55
    assert "1000 tokens per minute" in caught.value.message
    assert "may use 300" in caught.value.message
    assert quotas.rejections["search", "tpm"] == 1


async def test_concurrency_is_429() -> None:
    quotas, _, _ = service(config(limits="{concurrency: 1}"))
    first = await admit(quotas)
    with pytest.raises(ConcurrencyLimited) as caught:
        await admit(quotas)
    assert (caught.value.status, caught.value.code) == (429, "concurrency_limit_exceeded")
    assert caught.value.retry_after == 1
    assert "1 of 1 requests in flight" in caught.value.message
    await quotas.settle(first.request_id, Settlement(cost=Micro(5)))
    assert (await admit(quotas)).reserved


async def test_concurrency_retry_after_is_the_estimated_wait_for_a_slot() -> None:
    """Retry-After: 1 is a lie when the team's requests hold their slots for a minute."""
    quotas, _, clock = service(config(limits="{concurrency: 2}"))
    held = [await admit(quotas) for _ in range(2)]
    clock.t += 60
    quotas.slot_freed("search", held[0].admitted_at)  # it held its slot 60 s
    await quotas.settle(held[0].request_id, Settlement(cost=Micro(5)))
    await admit(quotas)
    with pytest.raises(ConcurrencyLimited) as caught:
        await admit(quotas)
    # Two slots busy with ~60 s requests at random stages: the first frees in ~60 / 3 s.
    assert caught.value.retry_after == 20
    assert caught.value.headers()["Retry-After"] == "20"


async def test_shadow_counts_would_reject_and_blocks_nothing() -> None:
    quotas, store, _ = service(config(budget="{day: 0.000001}", limits="{rpm: 1}", shadow=True))
    first = await admit(quotas, worst("0.5"))
    assert first.reserved
    assert first.would_reject is Reason.BUDGET
    second = await admit(quotas, worst("0.5"))
    assert second.would_reject is Reason.RPM
    assert quotas.would_reject == {("search", "budget"): 1, ("search", "rpm"): 1}
    assert sum(quotas.rejections.values()) == 0
    assert len(await store.dispatched()) == 2


class BrokenStore(MemoryStore):
    """A store whose ``reserve`` fails: down, slow, or applied with the reply lost."""

    is_remote = True  # its calls are bounded by store.timeout_seconds, like Redis's

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.settle_failures = 0
        self.cut_short = False
        """A slow call was cancelled by the service's store timeout (not waited out)."""

    async def reserve(self, request: ReserveRequest) -> Counted:
        if self.mode == "down":
            raise StoreUnavailable("down")
        if self.mode == "slow":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cut_short = True
                raise
        if self.mode == "lost_reply":
            await super().reserve(request)
            raise StoreUnavailable("reply lost")
        return await super().reserve(request)

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        if self.settle_failures > 0:
            self.settle_failures -= 1
            raise StoreUnavailable("flaky")
        return await super().settle(request_id, settlement)


@pytest.mark.parametrize("mode", ["down", "slow"])
async def test_store_failure_fail_closed(mode: str) -> None:
    cfg = config(on_error="fail_closed", timeout=0.1)
    store = BrokenStore(mode)
    quotas = QuotaService(store, cfg, clock=Clock(NOW))
    with pytest.raises(QuotaStoreUnavailable) as caught:
        await admit(quotas)
    assert store.cut_short is (mode == "slow")  # bounded by the store timeout
    assert (caught.value.status, caught.value.code) == (503, "quota_store_unavailable")
    assert caught.value.retry_after == 1
    assert quotas.store_errors == {"fail_closed": 1}
    assert quotas.rejections == {("search", "store_unavailable"): 1}


@pytest.mark.parametrize("mode", ["down", "slow"])
async def test_store_failure_fail_open(mode: str) -> None:
    cfg = config(on_error="fail_open", timeout=0.1, budget="{day: 0.000001}")
    quotas = QuotaService(BrokenStore(mode), cfg, clock=Clock(NOW))
    admission = await admit(quotas)
    assert admission.reserved is False
    assert admission.headers == {}
    assert quotas.store_errors == {"fail_open": 1}
    assert sum(quotas.rejections.values()) == 0


async def test_fail_closed_after_a_lost_reply_leaves_no_charge() -> None:
    store = BrokenStore("lost_reply")
    quotas = QuotaService(store, config(on_error="fail_closed"), clock=Clock(NOW))
    with pytest.raises(QuotaStoreUnavailable):
        await admit(quotas, rid="lost")
    record = await store.record("lost")
    assert record is None or (record.state is RecordState.SETTLED and record.cost == 0)


async def test_settle_retries_while_the_store_fails() -> None:
    store = BrokenStore("ok")
    quotas = QuotaService(store, config(), clock=Clock(NOW))
    admission = await admit(quotas, worst("0.5"))
    store.settle_failures = 2
    settled = await quotas.settle(
        admission.request_id,
        Settlement(cost=Micro(123), outcome=Outcome.COMPLETED, now=NOW),
    )
    assert settled
    record = await store.record(admission.request_id)
    assert record is not None
    assert record.cost == 123
    assert not await quotas.settle(admission.request_id, Settlement(cost=Micro(999)))


async def test_budgets_for_the_key_endpoint() -> None:
    quotas, _, _ = service(config(budget="{day: 1, month: 10, total: 1000}"))
    first = await admit(quotas, worst("0.25"))
    await admit(quotas, worst("0.125"))
    await quotas.settle(first.request_id, Settlement(cost=Micro(100_000)))
    budgets = {b["period"]: b for b in await quotas.budgets("search")}
    assert budgets["day"] == {
        "period": "day",
        "limit": Decimal(1),
        "spent": Decimal("0.1"),
        "reserved": Decimal("0.125"),
        "remaining": Decimal("0.775"),
        "resets_at": "2026-11-25T21:00:00Z",
    }
    assert budgets["month"]["resets_at"] == "2026-11-30T21:00:00Z"
    assert budgets["total"]["resets_at"] is None
    assert budgets["total"]["remaining"] == Decimal("999.775")
    assert set(budgets) == {"day", "month", "total"}
    assert await quotas.spent_total("search") == Decimal("0.1")


async def test_budgets_remaining_never_negative() -> None:
    quotas, _, _ = service(config(budget="{day: 1}"))
    first = await admit(quotas, worst("1"))
    await quotas.settle(first.request_id, Settlement(cost=Micro(3_000_000)))
    (day,) = await quotas.budgets("search")
    assert day["spent"] == Decimal(3)
    assert day["remaining"] == Decimal(0)

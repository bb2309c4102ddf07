"""The outage journal on its own: a real file, a real store; bounded, durable, idempotent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import parse_config
from clipia_proxy.errors import QuotaStoreUnavailable
from clipia_proxy.quotas.estimate import Estimate
from clipia_proxy.quotas.journal import Journal, JournalEntry, JournalFull
from clipia_proxy.quotas.memory import MemoryStore
from clipia_proxy.quotas.model import (
    Counted,
    Micro,
    Outcome,
    Period,
    RecordState,
    ReserveRequest,
    Settlement,
    TeamLimits,
    UsageSource,
)
from clipia_proxy.quotas.service import QuotaService
from clipia_proxy.quotas.store import StoreUnavailable
from tests.harness import decided

NOW = 1_790_000_000.0
PERIODS = {Period.DAY: "day:2026-09-21", Period.TOTAL: "total"}


def request(request_id: str, amount: int = 5_000) -> ReserveRequest:
    return ReserveRequest(
        request_id=request_id,
        team="search",
        amount=Micro(amount),
        tokens=100,
        periods=PERIODS,
        now=NOW,
        lease_seconds=600,
        limits=TeamLimits(),
        model="gpt-5.5",
        key_id="search-1",
        stream=True,
    )


def settled(cost: int) -> Settlement:
    return Settlement(
        cost=Micro(cost),
        prompt_tokens=10,
        completion_tokens=20,
        usage_source=UsageSource.STREAM,
        outcome=Outcome.COMPLETED,
        upstream_id="chatcmpl-0123456789ab",
        now=NOW + 1,
    )


async def test_replay_writes_records_once_and_counts_their_spend(tmp_path: Path) -> None:
    path = tmp_path / "outage.jsonl"
    journal = Journal(path, max_bytes=1 << 20)
    await journal.start()
    journal.append(journal.reserve_entry(request("a")))
    journal.append(journal.reserve_entry(request("b")))
    journal.append(journal.settle_entry("a", settled(1_234)))
    journal.append(journal.void_entry("never-sent", NOW))
    await journal.flush()
    assert len(path.read_bytes().splitlines()) == 4  # on disk (fsync'd) before any replay

    store = MemoryStore()
    # "b" is still in flight in this process: it stays in the journal.
    assert await journal.replay(store, now=NOW + 2) == 2
    record = await store.record("a")
    assert record is not None
    assert (record.state, record.cost, record.upstream_id) == (
        RecordState.SETTLED,
        1_234,
        "chatcmpl-0123456789ab",
    )
    assert await store.record("b") is None
    assert (await store.usage("search", ["total"], NOW + 2))["total"].spent == 1_234
    assert journal.pending == 1

    journal.append(journal.settle_entry("b", settled(766)))
    # A second process replaying the same file again (as after a crash mid-replay) changes
    # nothing for "a": idempotent by request id.
    again = Journal(path, max_bytes=1 << 20)
    await journal.flush()
    await again.start()
    assert await again.replay(store, now=NOW + 3) == 1
    assert (await store.usage("search", ["total"], NOW + 3))["total"].spent == 2_000
    assert path.read_bytes() == b""


async def test_a_request_journaled_by_a_dead_process_is_left_to_the_reconciler(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outage.jsonl"
    first = Journal(path, max_bytes=1 << 20)
    await first.start()
    first.append(first.reserve_entry(request("cut")))
    await first.flush()
    restarted = Journal(path, max_bytes=1 << 20)
    await restarted.start()
    store = MemoryStore()
    assert await restarted.replay(store, now=NOW) == 1
    (record,) = await store.dispatched()  # its money reserved until the reconciler settles it
    assert record.request_id == "cut"
    assert (await store.usage("search", ["total"], NOW))["total"].reserved == 5_000


class AppendingStore(MemoryStore):
    """A store during whose writes a settlement reaches the journal (its retries gave up)."""

    def __init__(self, journal: Journal, entry: JournalEntry) -> None:
        super().__init__()
        self._journal = journal
        self._entry: JournalEntry | None = entry

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        if self._entry is not None:
            self._journal.append(self._entry)
            self._entry = None
        return await super().settle(request_id, settlement)


async def test_an_entry_journaled_during_a_replay_is_replayed_next(tmp_path: Path) -> None:
    """Replays run while something is pending: an entry appended mid-replay stays pending."""
    path = tmp_path / "outage.jsonl"
    journal = Journal(path, max_bytes=1 << 20)
    await journal.start()
    journal.append(journal.reserve_entry(request("served")))
    journal.append(journal.settle_entry("served", settled(1_000)))
    store = AppendingStore(journal, journal.settle_entry("late", settled(234)))
    await decided(store, request("late"))  # reserved while the store was up
    assert await journal.replay(store, now=NOW + 2) == 1
    assert journal.pending == 1  # "late"'s settlement, appended while "served" was written
    assert await journal.replay(store, now=NOW + 3) == 1
    assert journal.pending == 0
    usage = (await store.usage("search", ["total"], NOW + 3))["total"]
    assert (usage.spent, usage.reserved) == (1_234, 0)
    await journal.flush()
    assert path.read_bytes() == b""


class DownStore(MemoryStore):
    async def reserve(self, request: ReserveRequest) -> Counted:
        raise StoreUnavailable("down")


async def test_a_full_journal_makes_fail_open_refuse(tmp_path: Path) -> None:
    config = parse_config(
        f"""
store: {{backend: memory, on_error: fail_open}}
teams:
  - id: search
    keys: [{{id: search-1, sha256: {hash_key(generate_key())}}}]
""",
        source="t.yaml",
        resolve_secrets=False,
    )
    quotas = QuotaService(DownStore(), config, clock=time.time)
    quotas.journal = Journal(tmp_path / "outage.jsonl", max_bytes=4096)
    await quotas.journal.start()
    estimate = Estimate(prompt_tokens=10, output_tokens=10, n=1, amount=Micro(100))

    async def admit(index: int) -> bool:
        admission = await quotas.admit(
            request_id=f"r{index}",
            team="search",
            key_id="search-1",
            model="gpt-5.5",
            stream=False,
            estimate=estimate,
        )
        return admission.journaled

    served = 0
    while served < 100:
        try:
            assert await admit(served)
        except QuotaStoreUnavailable:
            break
        served += 1
    assert 0 < served < 100  # served while the journal had room, then refused
    assert not quotas.journal.has_room()
    await quotas.journal.flush()
    assert (tmp_path / "outage.jsonl").stat().st_size <= 4096
    big = Journal(tmp_path / "tiny.jsonl", max_bytes=100)
    with pytest.raises(JournalFull):
        big.append(big.reserve_entry(request("more")))

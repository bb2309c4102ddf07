"""The ledger audit that ends every fault and load test.

:func:`audit` checks, after settlement, five rules:

1. nothing is left ``dispatched``, and every request id the emulator served (billed) has
   exactly one settled ledger record;
2. a request the emulator never served is charged nothing (except the bounded crash points:
   a kill between the write-ahead record and the first byte);
3. exact usage sources match the emulator's bill to the micro-credit, and bounded ones
   (counted, reserved) never undercharge;
4. requests the test saw refused reached neither the upstream nor the ledger;
5. per team, the sum of settled costs equals the store's spent counters, and no reservation
   is left open.

:func:`audit_stores` is the same check over bare stores (a gateway process that is gone, whose
SQLite file is reopened in the test). The gateways themselves come from tests/harness.py
(:func:`start_cluster`, re-exported here).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

import pytest

from clipia_proxy.config import Config
from clipia_proxy.emulator import EmulatorState
from clipia_proxy.keys import QUOTAS, TASKS
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Outcome, RecordState, UsageSource
from clipia_proxy.quotas.service import QuotaService
from clipia_proxy.quotas.store import LedgerRecord, Store
from tests.conftest import fresh_postgres_schema_sync
from tests.harness import Cluster, Stack, start_cluster

__all__ = [
    "AuditError",
    "Cluster",
    "audit",
    "audit_stores",
    "emulator_served",
    "redis_store",
    "start_cluster",
]

CHAT_PATH: Final = "/v1/chat/completions"
_EXACT_SOURCES: Final = frozenset(
    {UsageSource.RESPONSE.value, UsageSource.STREAM.value, UsageSource.GENERATION.value}
)
_BOUNDED_SOURCES: Final = frozenset({UsageSource.COUNTED.value, UsageSource.RESERVED.value})


class AuditError(AssertionError):
    """The ledger and the emulator disagree; the message lists every problem found."""


@dataclass(frozen=True)
class Served:
    """What the emulator billed for one gateway request id (attempts summed)."""

    request_id: str
    cost: int
    """Micro-credits."""
    prompt_tokens: int
    completion_tokens: int
    generations: tuple[str, ...]


def emulator_served(emulator: EmulatorState) -> dict[str, Served]:
    """Return E: every request id the emulator served a chat generation for (billed)."""
    attempts: dict[str, list[str]] = defaultdict(list)
    for recorded in emulator.requests:
        if recorded.path != CHAT_PATH or recorded.request_id is None:
            continue
        if recorded.generation_id is not None:
            attempts[recorded.request_id].append(recorded.generation_id)
    served: dict[str, Served] = {}
    for request_id, generations in attempts.items():
        bills = [emulator.bills[g] for g in generations]
        cost = sum((b.cost for b in bills), Decimal(0)) * MICRO_PER_CREDIT
        assert cost == cost.to_integral_value(), f"bill of {request_id} is not whole micro"
        served[request_id] = Served(
            request_id=request_id,
            cost=int(cost),
            prompt_tokens=sum(b.prompt_tokens for b in bills),
            completion_tokens=sum(b.completion_tokens for b in bills),
            generations=tuple(generations),
        )
    return served


def _describe(record: LedgerRecord) -> str:
    return (
        f"{record.request_id} (team {record.team}, {record.state.value}, cost {record.cost}, "
        f"reserved {record.reserved}, source {record.usage_source}, "
        f"outcome {record.outcome.value if record.outcome else None})"
    )


async def audit_stores(
    stores: Iterable[tuple[Store, Config]],
    emulator: EmulatorState,
    *,
    refused: Collection[str] = (),
    crash_points: int = 0,
) -> list[LedgerRecord]:
    """Run the module's rules 1-5 over distinct stores; raise :class:`AuditError`.

    ``stores`` must be distinct (a store shared by several gateways appears once).
    ``refused`` are gateway request ids the test saw refused before dispatch (rule 4).
    ``crash_points`` bounds the records charged ``crashed``/``reserved`` that the emulator
    never saw (rule 2: a kill between write-ahead and the first byte). Returns the records.
    """
    problems: list[str] = []
    served = emulator_served(emulator)
    received = {
        r.request_id for r in emulator.requests if r.path == CHAT_PATH and r.request_id is not None
    }
    everything: list[LedgerRecord] = []
    by_id: dict[str, LedgerRecord] = {}
    teams: dict[str, tuple[QuotaService, Store]] = {}
    for store, config in stores:
        quotas = QuotaService(store, config)
        # Rule 1: nothing left dispatched.
        problems.extend(f"left dispatched: {_describe(r)}" for r in await store.dispatched())
        records = await store.records(since=0, until=1e12)
        everything.extend(records)
        for record in records:
            if record.state is not RecordState.SETTLED:
                problems.append(f"not settled: {_describe(record)}")
            if record.request_id in by_id:
                problems.append(f"id twice in the ledger: {_describe(record)}")
            by_id[record.request_id] = record
        for team in config.teams:
            if team.id in teams:
                problems.append(f"team {team.id} appears in two stores")
            teams[team.id] = (quotas, store)

    # Rule 1: every id the emulator served has exactly one settled record.
    problems.extend(
        f"served by the emulator but not in the ledger: {request_id} ({s.generations})"
        for request_id, s in served.items()
        if request_id not in by_id
    )
    unseen_charged = 0
    for record in everything:
        bill = served.get(record.request_id)
        source = record.usage_source
        if bill is None:
            # Rule 2: never served → nothing charged, unless charged blind after a kill or a
            # first-byte timeout ("maybe charged": the reservation).
            if record.cost == 0:
                continue
            if source == UsageSource.RESERVED.value and record.outcome in (
                Outcome.CRASHED,
                Outcome.TIMEOUT,
            ):
                if record.request_id not in received:
                    unseen_charged += 1
                continue
            problems.append(f"charged but never served: {_describe(record)}")
            continue
        # Rule 3: exact sources match the bill; bounded ones never undercharge.
        if source in _EXACT_SOURCES:
            if (record.cost, record.prompt_tokens, record.completion_tokens) != (
                bill.cost,
                bill.prompt_tokens,
                bill.completion_tokens,
            ):
                problems.append(
                    f"differs from the bill ({bill.cost} micro, {bill.prompt_tokens}+"
                    f"{bill.completion_tokens} tokens; got {record.prompt_tokens}+"
                    f"{record.completion_tokens}): {_describe(record)}"
                )
        elif source in _BOUNDED_SOURCES:
            if record.cost < bill.cost:
                problems.append(f"undercharged (bill {bill.cost}): {_describe(record)}")
            if record.prompt_tokens <= 0:
                problems.append(f"charged with 0 prompt tokens: {_describe(record)}")
        else:
            problems.append(f"served but settled from {source!r}: {_describe(record)}")
    if unseen_charged > crash_points:
        problems.append(
            f"{unseen_charged} records charged blind for requests the emulator never saw "
            f"(at most {crash_points} kill points)"
        )

    # Rule 4: refused requests reached neither the upstream nor the ledger.
    for request_id in refused:
        if request_id in received:
            problems.append(f"refused request reached the upstream: {request_id}")
        if request_id in by_id:
            problems.append(f"refused request has a ledger record: {_describe(by_id[request_id])}")

    # Rule 5: per team, Σ settled cost == the store's spent; no reservation left open.
    for team_id, (quotas, store) in teams.items():
        now = quotas.now()
        settled_cost = sum(
            r.cost for r in everything if r.team == team_id and r.state is RecordState.SETTLED
        )
        keys = [window.key for window in quotas.windows(now).values()]
        usage = await store.usage(team_id, keys, now)
        if usage["total"].spent != settled_cost:
            problems.append(
                f"team {team_id}: store spent {usage['total'].spent} != Σ ledger {settled_cost}"
            )
        problems.extend(
            f"team {team_id}: {used.reserved} still reserved in {key}"
            for key, used in usage.items()
            if used.reserved != 0
        )
        # Windows created now hold at most the total (records could predate today).
        problems.extend(
            f"team {team_id}: {key} spent {used.spent} > total {usage['total'].spent}"
            for key, used in usage.items()
            if used.spent > usage["total"].spent
        )
    if problems:
        raise AuditError("ledger audit failed:\n  " + "\n  ".join(problems))
    return everything


def _store_identity(config: Config, stack: Stack) -> tuple[str, ...]:
    store = config.store
    if store.backend == "redis":
        return ("redis", store.redis_url_env, store.redis_key_prefix)
    if store.backend == "sqlite":
        return ("sqlite", store.sqlite_path)
    return ("memory", str(id(stack)))


async def settle_all(stacks: Iterable[Stack], *, within: float = 10.0) -> None:
    """Wait (bounded) until no gateway has a settlement task running or a record open.

    Handlers still draining a stream settle later, so open records are waited for too; past
    ``within`` the audit goes on and reports whatever is still open.
    """
    try:
        async with asyncio.timeout(within):
            for stack in stacks:
                app = stack.running.app
                while True:
                    busy = app[TASKS].pending("settle-") or app[TASKS].pending("lease-renew")
                    if not busy and not await app[QUOTAS].store.dispatched():
                        break
                    await asyncio.sleep(0.01)
    except TimeoutError:
        return


async def audit(
    stacks: list[Stack],
    emulator: EmulatorState,
    *,
    refused: Collection[str] = (),
    crash_points: int = 0,
) -> list[LedgerRecord]:
    """Wait for settlement on every gateway, then run :func:`audit_stores` once per store."""
    await settle_all(stacks)
    seen: set[tuple[str, ...]] = set()
    stores: list[tuple[Store, Config]] = []
    for stack in stacks:
        identity = _store_identity(stack.config, stack)
        if identity in seen:
            continue
        seen.add(identity)
        stores.append((stack.running.app[QUOTAS].store, stack.config))
    return await audit_stores(stores, emulator, refused=refused, crash_points=crash_points)


def redis_store(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    postgres_dsn: str,
    replicas: int = 3,
    label: str = "audit",
) -> str:
    """Return ``store:`` and ``ledger:`` sections for gateways sharing one Redis and one ledger.

    Redis under a fresh key prefix; the ledger in a fresh PostgreSQL schema.

    The URL and the DSN reach the gateways through fresh environment variables (set for this
    test only).
    """
    token = secrets.token_hex(6)
    env = f"CLIPIA_{label.upper()}_REDIS_{token.upper()}"
    dsn_env = f"CLIPIA_{label.upper()}_DSN_{token.upper()}"
    monkeypatch.setenv(env, redis_url)
    monkeypatch.setenv(dsn_env, fresh_postgres_schema_sync(postgres_dsn))
    return (
        f"{{backend: redis, redis_url_env: {env}, redis_key_prefix: {label}-{token}, "
        f"replicas: {replicas}}}\nledger: {{backend: postgres, postgres_dsn_env: {dsn_env}}}"
    )

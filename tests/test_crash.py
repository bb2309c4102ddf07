"""SIGKILL / SIGTERM with real ``python -m clipia_proxy serve`` processes.

The emulator runs in the test's loop; each gateway is a subprocess on loopback ports read from
its "listening" log line. After a kill, the restarted gateway reconciles the records left
``dispatched`` before it listens; the audit (tests/audit.py) then runs over the same store,
opened in the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Config, parse_config
from clipia_proxy.emulator import Fault
from clipia_proxy.ledgers.postgres import PostgresLedger
from clipia_proxy.quotas.model import MICRO_PER_CREDIT, Outcome, RecordState, UsageSource
from clipia_proxy.quotas.redis import RedisStore
from clipia_proxy.quotas.sqlite import SqliteStore
from clipia_proxy.quotas.store import LedgerRecord, Store
from clipia_proxy.wire import decode_json
from tests.audit import audit_stores, emulator_served
from tests.harness import STORE_TIMEOUT, Emulator, Served, serve, start_emulator

BODY: dict[str, object] = {
    "model": "gpt-5.5",
    "messages": [{"role": "user", "content": "tell me a long story"}],
    "max_tokens": 40,
}


class Harness:
    """The emulator in this loop, gateway processes, their config file and keys."""

    def __init__(self, emulator: Emulator, tmp: Path, store: str, env: dict[str, str]) -> None:
        self.emulator = emulator.state
        self.tmp = tmp
        self.env = {**env, "TEST_CLIPIA_KEY": emulator.clipia_key}
        self.team_key = generate_key()
        self.config_path = tmp / "config.yaml"
        self.config_text = f"""
server: {{host: 127.0.0.1, port: 0, admin_port: 0, shutdown_grace_seconds: 2}}
upstream: {{base_url: "{emulator.base_url}", api_key_env: TEST_CLIPIA_KEY}}
store: {store}
teams:
  - id: search
    keys: [{{id: k, sha256: {hash_key(self.team_key)}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 1000, month: 10000}}
"""
        self.config_path.write_text(self.config_text)
        self.gateways: list[Served] = []

    def config(self) -> Config:
        return parse_config(self.config_text, source="config.yaml", resolve_secrets=False)

    async def start(self) -> Served:
        """Start one more ``clipia-proxy serve`` process on this config; wait until it listens."""
        log = self.tmp / f"gateway-{secrets.token_hex(4)}.log"
        gateway = await serve(self.config_path, env=self.env, log=log)
        self.gateways.append(gateway)
        return gateway

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.team_key}"}

    async def key_info(self, gateway: Served) -> dict[str, object]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway.base_url}/key", headers=self.auth()) as response,
        ):
            assert response.status == 200
            data = decode_json(await response.read())
        assert isinstance(data, dict)
        info = data["data"]
        assert isinstance(info, dict)
        return info

    async def chat(self, gateway: Served, *, stream: bool) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{gateway.base_url}/chat/completions",
                json={**BODY, "stream": stream},
                headers=self.auth(),
            ) as response,
        ):
            assert response.status == 200
            await response.read()
            return response.headers["X-Request-Id"]

    async def close(self) -> None:
        for gateway in self.gateways:
            if gateway.process.returncode is None:
                gateway.process.kill()
                await gateway.process.wait()


def spent(info: dict[str, object], *, settled: bool = True) -> dict[str, Decimal]:
    """Return ``{"usage": …, "day": …, "month": …}`` from a ``GET /v1/key`` answer.

    With ``settled``, also check that nothing is reserved any more.
    """
    budgets = info["budgets"]
    assert isinstance(budgets, list)
    out = {"usage": Decimal(str(info["usage"]))}
    for budget in budgets:
        out[budget["period"]] = Decimal(str(budget["spent"]))
        if settled:
            assert Decimal(str(budget["reserved"])) == 0
    return out


async def open_store(harness: Harness, config: Config, redis_url: str | None = None) -> Store:
    store: Store
    if config.store.backend == "sqlite":
        store = SqliteStore(config.store.sqlite_path, clock=time.time)
    else:
        ledger = PostgresLedger.from_config(config.ledger, timeout=STORE_TIMEOUT)
        store = RedisStore.from_config(config.store, ledger, url=redis_url)
    await store.start()
    return store


async def audited(
    harness: Harness, *, redis_url: str | None = None, crash_points: int = 0
) -> list[LedgerRecord]:
    """Run the ledger audit over the gateways' store, opened in this process."""
    config = await asyncio.to_thread(harness.config)
    store = await open_store(harness, config, redis_url)
    try:
        return await audit_stores([(store, config)], harness.emulator, crash_points=crash_points)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def crash_harness(
    tmp_path: Path, store: str | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Harness]:
    """An emulator and a :class:`Harness` on ``store`` (default: SQLite in ``tmp_path``)."""
    emulator = await start_emulator(rpm=100_000)
    made = Harness(
        emulator,
        tmp_path,
        store or f'{{backend: sqlite, sqlite_path: "{tmp_path}/ledger.db"}}',
        env or {},
    )
    try:
        yield made
    finally:
        await made.close()
        await emulator.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with crash_harness(tmp_path) as made:
        yield made


async def test_sigkill_mid_stream_is_reconciled_at_restart(harness: Harness) -> None:
    emulator = harness.emulator
    gateway = await harness.start()
    emulator.push_fault(Fault(chunk_gap=0.05))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{gateway.base_url}/chat/completions",
            json={**BODY, "stream": True},
            headers=harness.auth(),
        )
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        first = await response.content.readany()
        assert first.startswith(b"data: ")
        assert await gateway.stop(signal.SIGKILL) == -signal.SIGKILL
        with pytest.raises(aiohttp.ClientError):
            await response.content.read()
        response.release()
    assert request_id in emulator_served(emulator)

    restarted = await harness.start()
    log = restarted.log_text()
    assert "reconciled" in log
    info = await harness.key_info(restarted)
    records = await audited(harness)
    (record,) = records
    assert record.request_id == request_id
    assert record.state is RecordState.SETTLED
    assert record.outcome is Outcome.CRASHED
    assert record.usage_source in (UsageSource.RESERVED, UsageSource.GENERATION)
    bill = emulator_served(emulator)[request_id].cost
    assert record.cost >= bill
    if record.usage_source == UsageSource.RESERVED:
        assert record.cost == record.reserved
    expected = Decimal(record.cost) / MICRO_PER_CREDIT
    assert spent(info) == {"usage": expected, "day": expected, "month": expected}
    # Served on after the restart, and settled normally.
    await harness.chat(restarted, stream=False)
    assert await restarted.stop() == 0
    assert len(await audited(harness)) == 2


async def test_spend_survives_a_plain_restart(harness: Harness) -> None:
    first = await harness.start()
    await harness.chat(first, stream=False)
    await harness.chat(first, stream=True)
    before = spent(await harness.key_info(first))
    assert before["usage"] > 0
    assert await first.stop() == 0
    assert "reconciled" not in first.log_text()
    second = await harness.start()
    assert spent(await harness.key_info(second)) == before
    assert await second.stop() == 0
    records = await audited(harness)
    assert len(records) == 2
    assert {r.outcome for r in records} == {Outcome.COMPLETED}
    assert Decimal(sum(r.cost for r in records)) / MICRO_PER_CREDIT == before["usage"]


async def test_redis_gateways_share_spend(
    tmp_path: Path, redis_url: str, ledger_section: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = secrets.token_hex(6)
    env = f"CLIPIA_CRASH_REDIS_{token.upper()}"
    monkeypatch.setenv(env, redis_url)
    store = (
        f"{{backend: redis, redis_url_env: {env}, redis_key_prefix: crash-{token}, replicas: 2, "
        f"timeout_seconds: {STORE_TIMEOUT}}}"
        f"\n{ledger_section}"
    )
    async with crash_harness(tmp_path, store, {env: redis_url}) as harness:
        a, b = await asyncio.gather(harness.start(), harness.start())
        assert a.port != b.port
        assert spent(await harness.key_info(b))["usage"] == 0
        await harness.chat(a, stream=True)
        # Settlement runs after the reply: wait (bounded) until B sees what A charged.
        async with asyncio.timeout(5):
            while True:
                # /v1/key reads budgets and usage separately: wait for a settled, steady view.
                info = await harness.key_info(b)
                through_b = spent(info, settled=False)
                reserved = [Decimal(str(x["reserved"])) for x in info["budgets"]]  # type: ignore[attr-defined]
                if through_b["usage"] > 0 and set(through_b.values()) == {through_b["usage"]}:
                    assert reserved == [0, 0]
                    break
                await asyncio.sleep(0.02)
        assert spent(await harness.key_info(b)) == through_b
        assert spent(await harness.key_info(a)) == through_b
        await harness.chat(b, stream=False)
        assert await a.stop() == 0
        assert await b.stop() == 0
        records = await audited(harness, redis_url=redis_url)
        assert len(records) == 2
        total = Decimal(sum(r.cost for r in records)) / MICRO_PER_CREDIT
        assert total > through_b["usage"]

"""Hot reload under load, broken files, and restart-only settings.

A valid change takes effect without a failed request; a broken file changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Secret, load_config, parse_config
from clipia_proxy.emulator import EmulatorState, Fault
from clipia_proxy.keys import LIVE, METRICS, QUOTAS
from clipia_proxy.reload import restart_only_changes
from clipia_proxy.server import Running, start
from tests.harness import start_emulator, wait_until

BASE = """
server: {{host: 127.0.0.1, port: 0, admin_port: 0, shutdown_grace_seconds: 2}}
upstream: {{base_url: "{url}", api_key_env: null}}
store: {{backend: sqlite, sqlite_path: "{db}"}}
teams:
  - id: search
    keys: [{{id: s, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]{aliases}}}
    budget: {{day: {budget}}}
  - id: research
    keys: [{{id: r, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""


@dataclass
class Reloadable:
    running: Running
    emulator: EmulatorState
    path: Path
    keys: dict[str, str]
    url: str
    db: Path

    def write(self, *, aliases: str = "", budget: str = "100", drop_research: bool = False) -> None:
        text = BASE.format(
            url=self.url,
            db=self.db,
            search=hash_key(self.keys["search"]),
            research=hash_key(self.keys["research"]),
            aliases=aliases,
            budget=budget,
        )
        if drop_research:
            text = text[: text.index("  - id: research")]
        self.path.write_text(text)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.running.port}/v1"

    def auth(self, team: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}


@pytest.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator[Reloadable]:
    emulator = await start_emulator(rpm=100_000)
    made = Reloadable(
        running=None,  # type: ignore[arg-type]  # set just below, once the file exists
        emulator=emulator.state,
        path=tmp_path / "config.yaml",
        keys={"search": generate_key(), "research": generate_key()},
        url=emulator.base_url,
        db=tmp_path / "ledger.db",
    )
    made.write()
    config = await asyncio.to_thread(load_config, made.path, resolve_secrets=False)
    made.running = await start(config, api_key=Secret(emulator.clipia_key), config_path=made.path)
    try:
        yield made
    finally:
        await made.running.stop()
        await emulator.stop()


def in_flight(gw: Reloadable, team: str) -> float:
    """The gateway's ``clipia_proxy_inflight_requests`` for ``team``."""
    return sum(
        sample.value
        for family in gw.running.app[METRICS].registry.collect()
        if family.name == "clipia_proxy_inflight_requests"
        for sample in family.samples
        if sample.labels["team"] == team
    )


async def _chat(
    session: aiohttp.ClientSession, gw: Reloadable, team: str, model: str, *, stream: bool = False
) -> tuple[int, bytes]:
    async with session.post(
        f"{gw.base}/chat/completions",
        headers=gw.auth(team),
        json={
            "model": model,
            "stream": stream,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ) as reply:
        return reply.status, await reply.read()


async def test_valid_change_under_load_fails_no_request(reloadable: Reloadable) -> None:
    gw = reloadable
    reloader = gw.running.reloader
    assert reloader is not None
    failures: list[tuple[int, bytes]] = []
    done = asyncio.Event()

    async def load(session: aiohttp.ClientSession, stream: bool) -> int:
        count = 0
        while not done.is_set():
            status, body = await _chat(session, gw, "search", "gpt-5.5", stream=stream)
            if status != 200 or (stream and not body.endswith(b"data: [DONE]\n\n")):
                failures.append((status, body[:200]))
            count += 1
        return count

    async with aiohttp.ClientSession() as session:
        # A slow stream that starts under the old config and must finish under it.
        gw.emulator.push_fault(Fault(chunk_gap=0.02))
        async with asyncio.TaskGroup() as group:
            slow = group.create_task(_chat(session, gw, "research", "gpt-5.5", stream=True))
            workers = [group.create_task(load(session, stream)) for stream in (False, True) * 3]
            try:
                await asyncio.sleep(0.1)
                assert (await _chat(session, gw, "search", "quick"))[0] == 403  # no alias yet
                gw.write(aliases=", aliases: {quick: gpt-5.5}", drop_research=True)
                assert await reloader.reload() is True
                # The new policy and the revoked team apply to new requests at once.
                status, _ = await _chat(session, gw, "search", "quick")
                assert status == 200
                assert (await _chat(session, gw, "research", "gpt-5.5"))[0] == 401
                await asyncio.sleep(0.1)
            finally:
                done.set()
        counts = [worker.result() for worker in workers]
        slow_status, slow_body = slow.result()
    assert failures == []
    assert sum(counts) > 10
    assert slow_status == 200
    assert slow_body.endswith(b"data: [DONE]\n\n")
    assert (
        gw.running.app[METRICS].registry.get_sample_value(
            "clipia_proxy_config_reloads_total", {"result": "success"}
        )
        == 1
    )


async def test_broken_file_changes_nothing(reloadable: Reloadable) -> None:
    gw = reloadable
    reloader = gw.running.reloader
    assert reloader is not None
    before = gw.running.app[LIVE].config
    gw.path.write_text("server: {port: lots}\nteams: nonsense\n")
    assert await reloader.reload() is False
    assert gw.running.app[LIVE].config is before
    async with aiohttp.ClientSession() as session:
        assert (await _chat(session, gw, "search", "gpt-5.5"))[0] == 200
        assert (await _chat(session, gw, "research", "gpt-5.5"))[0] == 200
    assert (
        gw.running.app[METRICS].registry.get_sample_value(
            "clipia_proxy_config_reloads_total", {"result": "error"}
        )
        == 1
    )


async def test_lowered_budget_applies_and_spend_is_kept(reloadable: Reloadable) -> None:
    gw = reloadable
    reloader = gw.running.reloader
    assert reloader is not None
    async with aiohttp.ClientSession() as session:
        assert (await _chat(session, gw, "search", "gpt-5.5"))[0] == 200
        gw.write(budget="0.000001")
        assert await reloader.reload() is True
        status, body = await _chat(session, gw, "search", "gpt-5.5")
    assert status == 402, body
    quotas = gw.running.app[QUOTAS]
    assert quotas.limits("search").budgets  # the new (tiny) budget is in force
    assert len(gw.emulator.bills) == 1  # the spend before the reload is still counted


async def test_file_change_is_picked_up_by_the_watcher(reloadable: Reloadable) -> None:
    gw = reloadable
    gw.write(aliases=", aliases: {quick: gpt-5.5}")
    for _ in range(200):  # the watcher polls every 2 s; bounded at 10 s
        if "quick" in gw.running.app[LIVE].policies["search"].aliases:
            break
        await asyncio.sleep(0.05)
    assert "quick" in gw.running.app[LIVE].policies["search"].aliases


def test_restart_only_changes_are_named() -> None:
    old = parse_config("server: {port: 8080}\n", resolve_secrets=False)
    new = parse_config(
        "server: {port: 8081}\nstore: {backend: memory}\ncatalog: {ttl_seconds: 10, max_stale_seconds: 20}\n",
        resolve_secrets=False,
    )
    assert restart_only_changes(old, new) == ["server.port", "store.backend"]


async def test_a_request_whose_team_is_removed_mid_body_finishes_under_its_config(
    reloadable: Reloadable,
) -> None:
    gw = reloadable
    reloader = gw.running.reloader
    assert reloader is not None
    body = msgspec.json.encode(
        {"model": "gpt-5.5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    )
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:10]
        halfway.set()
        await go_on.wait()
        yield body[10:]

    async with aiohttp.ClientSession() as session:

        async def send() -> tuple[int, bytes]:
            async with session.post(
                f"{gw.base}/chat/completions",
                headers={
                    **gw.auth("research"),
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                },
                data=slow_body(),
            ) as reply:
                return reply.status, await reply.read()

        async with asyncio.TaskGroup() as group:
            sending = group.create_task(send())
            await asyncio.wait_for(halfway.wait(), 5)
            # Authenticated and in flight: the gateway is now waiting for the rest of the body.
            await wait_until(lambda: in_flight(gw, "research") == 1, what="the request in flight")
            gw.write(drop_research=True)
            assert await reloader.reload() is True
            go_on.set()
        status, answer = sending.result()
        assert status == 200, answer  # served under the config it started with
        assert (await _chat(session, gw, "research", "gpt-5.5"))[0] == 401  # new requests: gone
    # The in-flight gauge of the removed team went with it (no series left at -1).
    inflight = {
        sample.labels["team"]: sample.value
        for family in gw.running.app[METRICS].registry.collect()
        if family.name == "clipia_proxy_inflight_requests"
        for sample in family.samples
    }
    assert inflight == {"search": 0.0}

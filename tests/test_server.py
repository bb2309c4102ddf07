"""A real `clipia-proxy serve` process: it starts, serves, and drains gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Secret
from clipia_proxy.emulator import EmulatorState, Fault
from clipia_proxy.server import GC_YOUNG_THRESHOLD, Running, serve, start, tuned_gc
from tests.harness import make_config, start_emulator
from tests.harness import serve as serve_process


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[EmulatorState, str, str]]:
    made = await start_emulator()
    try:
        yield made.state, made.base_url, made.clipia_key
    finally:
        await made.stop()


def _serve_config(
    tmp_path: Path, base_url: str, team_key: str, grace: float, extra: str = ""
) -> str:
    return f"""
server: {{host: 127.0.0.1, port: 0, admin_port: 0, shutdown_grace_seconds: {grace}}}
upstream: {{base_url: "{base_url}", api_key_env: TEST_CLIPIA_KEY}}
store: {{backend: sqlite, sqlite_path: "{tmp_path / "ledger.db"}"}}
teams:
  - id: search
    keys: [{{id: k, sha256: {hash_key(team_key)}}}]
    models: {{allow: ["*"]}}
{extra}
"""


async def _start_serve(
    tmp_path: Path,
    base_url: str,
    clipia_key: str,
    team_key: str,
    grace: float,
    *,
    extra: str = "",
    args: tuple[str, ...] = (),
) -> tuple[asyncio.subprocess.Process, int, int, list[str]]:
    config = tmp_path / "config.yaml"
    config.write_text(_serve_config(tmp_path, base_url, team_key, grace, extra))
    served = await serve_process(config, env={"TEST_CLIPIA_KEY": clipia_key}, args=args)
    return served.process, served.port, served.admin_port, served.lines


async def test_sigterm_lets_streams_finish_and_exits_zero(
    tmp_path: Path, emulator: tuple[EmulatorState, str, str]
) -> None:
    state, base_url, clipia_key = emulator
    team_key = generate_key()
    process, port, admin_port, lines = await _start_serve(
        tmp_path, base_url, clipia_key, team_key, grace=10
    )
    try:
        chat_url = f"http://127.0.0.1:{port}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {team_key}"}
        plain = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]}
        # A second client with an idle keep-alive connection, used again after SIGTERM.
        other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with other.post(chat_url, headers=auth, json=plain) as warm:
            assert warm.status == 200
        # A stream that needs about a second: 0.05 s between events.
        state.push_fault(Fault(chunk_gap=0.05))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                assert ready.status == 200
            stream = await session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {team_key}"},
                json={
                    "model": "gpt-5.5",
                    "stream": True,
                    "messages": [{"role": "user", "content": "tell me a long story"}],
                },
            )
            assert stream.status == 200
            first = await stream.content.readany()
            assert first.startswith(b"data: ")
            process.send_signal(signal.SIGTERM)
            # Readiness turns off while the stream is still running.
            async with asyncio.timeout(5):
                while True:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                        if ready.status == 503:
                            assert "draining" in (await ready.json())["problems"]
                            break
                    await asyncio.sleep(0.02)
            # New work is refused cleanly while the stream finishes: 503 draining (and the
            # connection closed), on a kept-alive connection and on a new one alike.
            try:
                async with other.post(chat_url, headers=auth, json=plain) as late:
                    assert late.status == 503
                    assert late.headers["Connection"] == "close"
                    assert (await late.json())["error"]["code"] == "draining"
            finally:
                await other.close()
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.post(chat_url, headers=auth, json=plain) as late,
            ):
                assert late.status == 503
                assert (await late.json())["error"]["code"] == "draining"
            rest = await stream.content.read()
            body = first + rest
            assert body.endswith(b"data: [DONE]\n\n")
            assert b'"error"' not in body
        assert process.stderr is not None
        async with asyncio.timeout(15):
            code = await process.wait()
            tail = (await process.stderr.read()).decode()
        assert code == 0, tail
        assert "clipia-proxy stopped" in tail
        assert clipia_key not in "".join(lines) + tail
        # Every request that reached Clipia is settled in the ledger, exactly once.
        rows = await asyncio.to_thread(_ledger_rows, tmp_path / "ledger.db")
        assert sorted(rows) == [("settled", "completed"), ("settled", "completed")]
        assert len(state.bills) == 2
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_streams_past_the_grace_period_end_cleanly_and_are_settled(
    tmp_path: Path, emulator: tuple[EmulatorState, str, str]
) -> None:
    state, base_url, clipia_key = emulator
    team_key = generate_key()
    process, port, _admin_port, _lines = await _start_serve(
        tmp_path, base_url, clipia_key, team_key, grace=1.5
    )
    try:
        # About six seconds of stream: far longer than the 1.5 s grace period.
        state.push_fault(Fault(chunk_gap=0.2))
        async with aiohttp.ClientSession() as session:
            stream = await session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {team_key}"},
                json={
                    "model": "gpt-5.5",
                    "stream": True,
                    "messages": [{"role": "user", "content": "tell me a very long story"}],
                },
            )
            assert stream.status == 200
            first = await stream.content.readany()
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                body = first + await stream.content.read()
        assert b"data: [DONE]" not in body
        assert body.rstrip().endswith(b"}")
        assert b'"code":"draining"' in body
        async with asyncio.timeout(15):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    rows = await asyncio.to_thread(_ledger_rows, tmp_path / "ledger.db")
    assert rows == [("settled", "timeout")]


def _ledger_rows(path: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return [(str(a), str(b)) for a, b in db.execute("SELECT state, outcome FROM ledger")]


async def _say_hi(port: int, team_key: str) -> int:
    """POST one small chat completion to a gateway on ``port``; return the status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "gpt-5.5", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {team_key}"},
        ) as response,
    ):
        await response.read()
        return response.status


async def test_serve_tunes_the_collector_while_serving_and_restores_it(
    emulator: tuple[EmulatorState, str, str],
) -> None:
    """`serve` collects cyclic garbage every 20,000 allocations with start-up state frozen."""
    _, base_url, clipia_key = emulator
    team_key = generate_key()
    keys = {"search": team_key, "research": generate_key()}
    config = make_config(base_url.removesuffix("/v1"), keys)
    before = gc.get_threshold()
    seen: list[tuple[tuple[int, ...], int, int]] = []

    async def on_ready(running: Running) -> None:
        status = await _say_hi(running.port, team_key)
        seen.append((gc.get_threshold(), gc.get_freeze_count(), status))
        signal.raise_signal(signal.SIGTERM)

    async with asyncio.timeout(20):
        await serve(config, api_key=Secret(clipia_key), on_ready=on_ready)
    assert seen == [((GC_YOUNG_THRESHOLD, before[1], before[2]), seen[0][1], 200)]
    assert seen[0][1] > 0  # start-up objects frozen
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_tuned_gc_restores_the_settings_after_an_error() -> None:
    before = gc.get_threshold()
    inside: list[int] = []

    def fail() -> None:
        with tuned_gc():
            inside.append(gc.get_threshold()[0])
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert inside == [GC_YOUNG_THRESHOLD]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("pinned", [False, True], ids=["config", "log-level-flag"])
async def test_a_reload_applies_logging_at_once_and_the_flag_keeps_its_level(
    tmp_path: Path, emulator: tuple[EmulatorState, str, str], pinned: bool
) -> None:
    """logging.* is applied by a reload; `serve --log-level` still wins over logging.level."""
    _, base_url, clipia_key = emulator
    team_key = generate_key()
    process, port, _, lines = await _start_serve(
        tmp_path,
        base_url,
        clipia_key,
        team_key,
        grace=1,
        extra="logging: {level: INFO, format: json}",
        args=("--log-level", "INFO") if pinned else (),
    )
    config = tmp_path / "config.yaml"
    assert process.stderr is not None
    stderr = process.stderr

    async def reload(grace: float) -> list[str]:
        """Rewrite the file (WARNING, text) with a restart-only change, SIGHUP; lines to its warning."""
        text = _serve_config(
            tmp_path, base_url, team_key, grace, "logging: {level: WARNING, format: text}"
        )
        config.write_text(text)
        process.send_signal(signal.SIGHUP)
        seen: list[str] = []
        async with asyncio.timeout(10):
            while "wait for a restart" not in (seen[-1] if seen else ""):
                line = (await stderr.readline()).decode()
                assert line, "serve exited: " + "".join(lines + seen)
                seen.append(line)
        return seen

    try:
        first = await reload(grace=2)
        assert not first[-1].startswith("{")  # the warning already has the text format
        assert "server.shutdown_grace_seconds" in first[-1]
        assert await _say_hi(port, team_key) == 200
        between = await reload(grace=3)
        access = [line for line in between if "access" in line and "chat/completions" in line]
        # WARNING from the file hides the INFO access line, unless --log-level pins INFO.
        assert len(access) == (1 if pinned else 0), between
        assert all(not line.startswith("{") for line in between)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.wait()


async def test_admin_host_opens_the_admin_port_alone(
    emulator: tuple[EmulatorState, str, str],
) -> None:
    """server.admin_host: the admin port on all addresses, the API still on 127.0.0.1 only."""
    _, base_url, clipia_key = emulator
    keys = {"search": generate_key(), "research": generate_key()}
    everywhere = "0.0.0.0"  # noqa: S104
    config = make_config(base_url.removesuffix("/v1"), keys, server={"admin_host": everywhere})
    running = await start(config, api_key=Secret(clipia_key))
    try:
        assert [address[0] for address in running.data_runner.addresses] == ["127.0.0.1"]
        assert [address[0] for address in running.admin_runner.addresses] == ["0.0.0.0"]  # noqa: S104
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{running.admin_port}/readyz") as ready,
        ):
            assert ready.status == 200
    finally:
        await running.stop()

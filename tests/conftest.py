"""Shared fixtures: a real emulator and a real gateway on loopback sockets.

``stack`` runs both in the test's own event loop (for aiohttp-client tests); ``thread_stack``
runs them in a background thread with its own loop, for the synchronous ``openai`` SDK and
LangChain. Each stack has fresh canary secrets: a Clipia key the emulator accepts and one team
key per team.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Config, Secret, parse_config
from clipia_proxy.emulator import EmulatorState, create_emulator_app
from clipia_proxy.server import Running, start

TEAMS_YAML = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models:
      allow: ["claude-sonnet-*", "gpt-5.5"]
      deny: ["claude-sonnet-4-5"]
      aliases: {{fast: claude-sonnet-4-6}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models:
      allow: ["*"]
      deny: ["claude-opus-*"]
      aliases: {{smart: gpt-5.5}}
    caps: {{max_tokens: 1000, n: 2}}
"""


@dataclass
class Stack:
    """A running emulator + gateway pair and the secrets to talk to them."""

    emulator: EmulatorState
    emulator_url: str
    running: Running
    clipia_key: str
    keys: dict[str, str]
    config: Config
    runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.running.port}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def auth(self, team: str = "search") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}

    def chat_requests(self) -> list[Any]:
        return [r for r in self.emulator.requests if r.path == "/v1/chat/completions"]


def make_config(
    emulator_url: str,
    keys: dict[str, str],
    *,
    extra: str = "",
    teams: str | None = None,
    store: str | None = None,
    upstream: Mapping[str, object] | None = None,
    base_url: str | None = None,
) -> Config:
    """Return a gateway config for tests: ephemeral ports, the emulator upstream.

    ``store`` is the ``store:`` section (default: sqlite in a fresh temporary directory);
    ``upstream`` overrides ``upstream:`` settings; ``base_url`` points elsewhere than the emulator.
    """
    if store is None:
        store = (
            f"{{backend: sqlite, sqlite_path: {tempfile.mkdtemp(prefix='clipia-test-')}/ledger.db}}"
        )
    if "journal_path" not in store:
        # The outage journal in a fresh temporary directory too (never the working directory).
        journal = f"{tempfile.mkdtemp(prefix='clipia-test-')}/outage.jsonl"
        mapping, newline, rest = store.partition("\n")  # a ledger: section may follow
        mapping = mapping.rstrip().removesuffix("}") + f", journal_path: {journal}}}"
        store = mapping + newline + rest
    teams_yaml = (teams or TEAMS_YAML).format(**{team: hash_key(key) for team, key in keys.items()})
    settings: dict[str, object] = {
        "base_url": base_url or f"{emulator_url}/v1",
        "api_key_env": "null",
        "connect_timeout_seconds": 2,
        "first_byte_timeout_seconds": 5,
        "idle_timeout_seconds": 5,
        "max_retry_wait_seconds": 0.5,
        **(upstream or {}),
    }
    upstream_yaml = "\n".join(f"  {name}: {value}" for name, value in settings.items())
    text = f"""
server: {{host: 127.0.0.1, port: 0, admin_port: 0, shutdown_grace_seconds: 2}}
upstream:
{upstream_yaml}
store: {store}
{extra}
{teams_yaml}
"""
    return parse_config(text, source="test.yaml", resolve_secrets=False)


async def start_stack(
    *,
    extra: str = "",
    teams: str | None = None,
    seed: int = 0,
    store: str | None = None,
    upstream: Mapping[str, object] | None = None,
    base_url: str | None = None,
) -> Stack:
    """Start an emulator and a gateway in the running loop."""
    # base64url, not hex: an 8-character piece of it cannot match a hex id or a digit run.
    clipia_key = "clipia_live_" + secrets.token_urlsafe(24)
    state = EmulatorState(seed=seed, keys={clipia_key})
    emulator_runner = web.AppRunner(create_emulator_app(state), access_log=None)
    await emulator_runner.setup()
    site = web.TCPSite(emulator_runner, "127.0.0.1", 0)
    await site.start()
    port = emulator_runner.addresses[0][1]
    emulator_url = f"http://127.0.0.1:{port}"
    keys = {"search": generate_key(), "research": generate_key()}
    config = make_config(
        emulator_url,
        keys,
        extra=extra,
        teams=teams,
        store=store,
        upstream=upstream,
        base_url=base_url,
    )
    running = await start(config, api_key=Secret(clipia_key))
    return Stack(
        emulator=state,
        emulator_url=emulator_url,
        running=running,
        clipia_key=clipia_key,
        keys=keys,
        config=config,
        runners=[emulator_runner],
    )


async def stop_stack(stack: Stack) -> None:
    await stack.running.stop()
    for runner in stack.runners:
        await runner.cleanup()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """An emulator and a gateway in the test's loop."""
    running = await start_stack()
    try:
        yield running
    finally:
        await stop_stack(running)


@pytest.fixture
async def stacks() -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Start stacks with custom config (keywords of ``start_stack``); all are stopped after."""
    started: list[Stack] = []

    async def factory(**kwargs: Any) -> Stack:
        made = await start_stack(**kwargs)
        started.append(made)
        return made

    try:
        yield factory
    finally:
        for made in started:
            await stop_stack(made)


class ThreadStack:
    """A stack running in a background thread's event loop (for synchronous clients)."""

    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.stack: Stack = self.call(start_stack(**kwargs))

    def call(self, coro: Awaitable[Any]) -> Any:
        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def close(self) -> None:
        self.call(stop_stack(self.stack))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture(scope="module")
def thread_stack() -> Iterator[Stack]:
    """An emulator and a gateway in a background thread, shared by one test module."""
    threaded = ThreadStack()
    try:
        yield threaded.stack
    finally:
        threaded.close()


@pytest.fixture
def log_capture() -> Iterator[list[str]]:
    """Capture every log line the gateway writes (formatted and redacted as in production)."""
    from clipia_proxy.logs import JsonFormatter, RedactingFilter

    lines: list[str] = []

    class _ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = _ListHandler(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def wait_settled(stack: Stack, *, within: float = 10.0) -> None:
    """Wait (bounded) until the gateway has no settlement task running and no open record."""
    from clipia_proxy.keys import QUOTAS, TASKS

    app = stack.running.app
    async with asyncio.timeout(within):
        while True:
            if not app[TASKS].pending("settle-") and not await app[QUOTAS].store.dispatched():
                return
            await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole session (see tests/redis_server.py)."""
    from tests.redis_server import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A real PostgreSQL for the whole session (see tests/pg_server.py); fails if none starts."""
    from tests.pg_server import postgres_server

    with postgres_server() as dsn:
        yield dsn


async def fresh_postgres_schema(dsn: str) -> str:
    """Create an empty schema in the test server; return a DSN whose search_path is it."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return f"{dsn}?search_path={name}"


def fresh_postgres_schema_sync(dsn: str) -> str:
    """``fresh_postgres_schema`` from synchronous code (a fixture, a helper of a running test)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fresh_postgres_schema(dsn)).result()


@pytest.fixture
def ledger_section(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``ledger:`` section naming a fresh PostgreSQL schema (DSN in a fresh env var)."""
    env = f"CLIPIA_TEST_DSN_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(env, fresh_postgres_schema_sync(postgres_dsn))
    return f"ledger: {{backend: postgres, postgres_dsn_env: {env}}}"


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Fail any test in which clipia_proxy blocks the event loop (file, socket, sqlite, sleep)."""
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx("clipia_proxy") as busters:
        # Loading a config reads files (YAML, key file, time zone data) on purpose: it runs
        # once, before serving (the CLI), never while requests are in flight.
        for function in busters.functions.values():
            function.can_block_in(
                "clipia_proxy/config.py", {"parse_config", "load_config", "read_api_key"}
            )
            # asyncpg looks for ~/.pgpass and ~/.postgresql certificates: once per new pooled
            # connection (a pool of ledger.pool_size), never per request.
            function.can_block_in("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"})
        yield

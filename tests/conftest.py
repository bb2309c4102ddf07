"""Shared fixtures: a real emulator and a real gateway on loopback sockets.

The builders live in tests/harness.py (re-exported here for older imports); this module turns
them into fixtures. ``stack`` runs both in the test's own event loop (for aiohttp-client
tests); ``thread_stack`` runs them in a background thread with its own loop, for the
synchronous ``openai`` SDK and LangChain. Each stack has fresh canary secrets: a Clipia key the
emulator accepts and one team key per team.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.harness import TEAMS_YAML as TEAMS_YAML
from tests.harness import Cluster, ClusterFactory, start_cluster
from tests.harness import Stack as Stack
from tests.harness import make_config as make_config
from tests.harness import start_stack as start_stack
from tests.harness import stop_stack as stop_stack
from tests.harness import wait_settled as wait_settled


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


@pytest.fixture
async def clusters() -> AsyncIterator[ClusterFactory]:
    """Start clusters (arguments of ``start_cluster``, one replica by default); all stopped after."""
    started: list[Cluster] = []

    async def factory(replicas: int = 1, **kwargs: Any) -> Cluster:
        made = await start_cluster(replicas, **kwargs)
        started.append(made)
        return made

    try:
        yield factory
    finally:
        for made in started:
            await made.stop()


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


@pytest.fixture(params=["memory", "sqlite", "redis"])
def counters(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The ``store:`` section of each counters backend, for ``stacks(store=...)``.

    ``None`` is the default (SQLite); Redis counters come with a fresh PostgreSQL ledger.
    """
    if request.param == "memory":
        return "{backend: memory}"
    if request.param == "sqlite":
        return None
    env = f"CLIPIA_TEST_REDIS_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(env, request.getfixturevalue("redis_url"))
    ledger: str = request.getfixturevalue("ledger_section")
    prefix = f"k-{uuid.uuid4().hex[:8]}"
    return f"{{backend: redis, redis_url_env: {env}, redis_key_prefix: {prefix}}}\n{ledger}"


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

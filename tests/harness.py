"""The one test harness: an emulator, gateways in front of it, a fake clock, a CLI runner.

Every test that needs "emulator + gateway" builds it here, so that a change to how the gateway
starts (a new required setting, a new ``start`` argument) is made once:

- :func:`start_emulator` serves the emulator on a free loopback port, with a fresh canary
  Clipia key it accepts (:class:`Emulator`).
- :func:`make_config` writes a gateway config for tests: ephemeral ports, the emulator as
  upstream, a fresh SQLite ledger and outage journal unless ``store`` says otherwise; the
  ``server``, ``upstream``, ``store``, ``ledger`` (inside ``store``) and ``teams`` sections
  can each be changed.
- :func:`start_gateway` starts ``server.start`` (the code ``clipia-proxy serve`` runs) in the
  running loop in front of an emulator; :func:`start_stack` starts both (a :class:`Stack`) and
  :func:`start_cluster` one emulator and N gateways sharing a store (a :class:`Cluster`).
- :func:`serve` starts a real ``python -m clipia_proxy serve`` process and waits for its
  "listening" line; :func:`run_report` runs ``clipia-proxy report --format json``.
- :class:`Clock` is the one fake clock: the code under test takes a ``clock`` callable and
  the test moves time by hand (:meth:`Clock.advance`), so no test waits for real time to pass.

tests/conftest.py turns these into fixtures (``stack``, ``stacks``, ``thread_stack``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
from aiohttp import web

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.config import Config, Secret, parse_config
from clipia_proxy.emulator import EmulatorState, create_emulator_app
from clipia_proxy.quotas.decision import decide
from clipia_proxy.quotas.model import ReserveRequest, ReserveResult
from clipia_proxy.quotas.store import Store
from clipia_proxy.server import Running, start

TEAMS_YAML: Final = """
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
"""The default teams: ``{search}`` and ``{research}`` are replaced by the keys' hashes."""

TEAMS: Final = ("search", "research")

BOUND: Final = 30.0
"""Seconds a test waits for something that must happen: a bound on a regression (the test
fails instead of hanging), never a speed requirement (speed is measured by bench/)."""

STORE_TIMEOUT: Final = 30.0
"""``store.timeout_seconds`` of a test gateway unless its ``store`` names one. A test about
store timeouts sets its own; for the others the product's 2 s would fire under load (200
concurrent requests on 2 busy cores) and turn a healthy Redis or PostgreSQL into a refusal."""

UPSTREAM_TIMEOUT: Final = 30.0
"""``upstream`` connect, first-byte and idle timeouts of a test gateway unless the test sets
them (the tests about those timeouts do): a stalled-on-purpose stream stays held, and a busy
machine never turns a healthy emulator into a 504."""

LISTENING: Final = re.compile(r"listening on [^:]+:(\d+) \(admin (\d+)\)")
"""The log line ``clipia-proxy serve`` writes once both ports accept connections."""


# --------------------------------------------------------------------------- time


class Clock:
    """The fake clock: a callable returning ``t``, which only the test moves.

    Pass it where the code under test takes a ``clock``/``monotonic``/``now`` callable.
    """

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; return the new time."""
        self.t += seconds
        return self.t


async def wait_until(
    check: Callable[[], object | Awaitable[object]],
    *,
    within: float = 10.0,
    every: float = 0.01,
    what: str = "the condition",
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that.

    ``within`` only bounds a regression (the test fails instead of hanging); it is never a
    speed requirement, so it is generous.
    """
    try:
        async with asyncio.timeout(within):
            while True:
                found = check()
                if asyncio.iscoroutine(found):
                    found = await found
                if found:
                    return found
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {within} s") from None


# --------------------------------------------------------------------------- the emulator


def canary_key(kind: str = "live") -> str:
    """A fresh Clipia key (``clipia_live_…`` or ``clipia_test_…``).

    base64url, not hex: an 8-character piece of it cannot match a hex id or a digit run, so a
    scan for the key in logs or bodies has no false hits.
    """
    return f"clipia_{kind}_" + secrets.token_urlsafe(24)


@dataclass
class Emulator:
    """A running emulator: its state (requests seen, bills, faults), address and key."""

    state: EmulatorState
    runner: web.AppRunner
    clipia_key: str
    scheme: str = "http"
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        port: int = self.runner.addresses[0][1]
        return port

    @property
    def url(self) -> str:
        """The root URL (no ``/v1``)."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (``…/v1``), as ``upstream.base_url`` takes it."""
        return f"{self.url}/v1"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_emulator(
    *,
    seed: int = 0,
    rpm: int = 120,
    keys: Iterable[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    **state: Any,
) -> Emulator:
    """Serve the emulator on a free loopback port.

    It accepts a fresh ``clipia_live_…`` key (``Emulator.clipia_key``) and ``keys``. With
    ``ssl_context`` it serves HTTPS, addressed as ``localhost``. ``state`` goes to
    :class:`EmulatorState` (``key_limits``, ``now``, ``monotonic``).
    """
    clipia_key = canary_key()
    emulator_state = EmulatorState(seed=seed, keys={clipia_key, *keys}, rpm=rpm, **state)
    runner = web.AppRunner(create_emulator_app(emulator_state), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    if ssl_context is not None:
        return Emulator(emulator_state, runner, clipia_key, scheme="https", host="localhost")
    return Emulator(emulator_state, runner, clipia_key)


# --------------------------------------------------------------------------- the gateway


def _yaml_fields(fields: Mapping[str, object] | str | None) -> dict[str, object]:
    """Settings given as a mapping, or as YAML lines ``name: value`` (one per line)."""
    if fields is None:
        return {}
    if isinstance(fields, str):
        parsed: dict[str, object] = {}
        for line in fields.strip().splitlines():
            name, _, value = line.strip().partition(":")
            parsed[name.strip()] = value.strip()
        return parsed
    return dict(fields)


def _flow(fields: Mapping[str, object]) -> str:
    return "{" + ", ".join(f"{name}: {value}" for name, value in fields.items()) + "}"


def make_config(
    emulator_url: str,
    keys: Mapping[str, str],
    *,
    extra: str = "",
    teams: str | None = None,
    store: str | None = None,
    upstream: Mapping[str, object] | str | None = None,
    base_url: str | None = None,
    server: Mapping[str, object] | None = None,
    grace: float = 2.0,
) -> Config:
    """Return a gateway config for tests: ephemeral ports, the emulator (root URL) upstream.

    - ``store`` is the ``store:`` section, optionally followed by a ``ledger:`` line (default:
      SQLite in a fresh temporary directory); the outage journal goes to a fresh temporary
      directory unless ``store`` names one (never the working directory), and
      ``timeout_seconds`` is :data:`STORE_TIMEOUT` unless ``store`` names one.
    - ``upstream`` and ``server`` override single settings of those sections (``upstream``
      also as YAML lines); ``grace`` is ``server.shutdown_grace_seconds``.
    - ``teams`` is the ``teams:`` section with ``{team}`` placeholders for the keys' hashes
      (default :data:`TEAMS_YAML`); ``extra`` is appended as it is (other sections).
    - ``base_url`` points the gateway elsewhere than the emulator.
    """
    if store is None:
        store = (
            f"{{backend: sqlite, sqlite_path: {tempfile.mkdtemp(prefix='clipia-test-')}/ledger.db}}"
        )
    mapping, newline, rest = store.partition("\n")  # a ledger: section may follow
    if "journal_path" not in mapping:
        journal = f"{tempfile.mkdtemp(prefix='clipia-test-')}/outage.jsonl"
        mapping = mapping.rstrip().removesuffix("}") + f", journal_path: {journal}}}"
    if "timeout_seconds" not in mapping:
        mapping = mapping.rstrip().removesuffix("}") + f", timeout_seconds: {STORE_TIMEOUT}}}"
    store = mapping + newline + rest
    teams_yaml = (teams or TEAMS_YAML).format(**{team: hash_key(key) for team, key in keys.items()})
    upstream_fields: dict[str, object] = {
        "base_url": base_url or f"{emulator_url}/v1",
        "api_key_env": "null",
        "connect_timeout_seconds": UPSTREAM_TIMEOUT,
        "first_byte_timeout_seconds": UPSTREAM_TIMEOUT,
        "idle_timeout_seconds": UPSTREAM_TIMEOUT,
        "max_retry_wait_seconds": 0.5,
        **_yaml_fields(upstream),
    }
    upstream_yaml = "\n".join(f"  {name}: {value}" for name, value in upstream_fields.items())
    server_fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "shutdown_grace_seconds": grace,
        **(server or {}),
    }
    text = f"""
server: {_flow(server_fields)}
upstream:
{upstream_yaml}
store: {store}
{extra}
{teams_yaml}
"""
    return parse_config(text, source="test.yaml", resolve_secrets=False)


@dataclass
class Stack:
    """A running gateway, the emulator behind it, and the secrets to talk to them."""

    emulator: EmulatorState
    emulator_url: str
    running: Running
    clipia_key: str
    keys: dict[str, str]
    config: Config
    runners: list[web.AppRunner] = field(default_factory=list)
    """The emulator's runner when this stack owns it (:func:`stop_stack` stops it)."""
    test_key: str | None = None
    """The ``clipia_test_…`` key the gateway holds, when started with one."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.running.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.running.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def auth(self, team: str = "search") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}

    def chat_requests(self) -> list[Any]:
        return [r for r in self.emulator.requests if r.path == "/v1/chat/completions"]


def team_keys(teams: Iterable[str] = TEAMS) -> dict[str, str]:
    """One fresh gateway key per team."""
    return {team: generate_key() for team in teams}


async def start_gateway(
    emulator: Emulator,
    keys: Mapping[str, str],
    *,
    test_key: str | None = None,
    **config: Any,
) -> Stack:
    """Start a gateway (``server.start``) in the running loop in front of ``emulator``.

    ``config`` holds the keywords of :func:`make_config`. With ``test_key`` the gateway also
    holds that ``clipia_test_…`` key (``upstream.test_api_key_env`` is set for it). The stack
    does not own the emulator: :func:`stop_stack` leaves it running.
    """
    if test_key is not None:
        config["upstream"] = {
            "test_api_key_env": "CLIPIA_TEST_API_KEY",
            **_yaml_fields(config.get("upstream")),
        }
    # Off the loop: parsing may read time-zone files, and blockbuster watches the loop.
    parsed = await asyncio.to_thread(functools.partial(make_config, emulator.url, keys, **config))
    running = await start(
        parsed,
        api_key=Secret(emulator.clipia_key),
        test_api_key=Secret(test_key) if test_key is not None else None,
    )
    return Stack(
        emulator=emulator.state,
        emulator_url=emulator.url,
        running=running,
        clipia_key=emulator.clipia_key,
        keys=dict(keys),
        config=parsed,
        test_key=test_key,
    )


async def start_stack(
    *,
    seed: int = 0,
    emulator_rpm: int = 120,
    team_ids: Iterable[str] = TEAMS,
    test_key: bool = False,
    **config: Any,
) -> Stack:
    """Start an emulator and a gateway in front of it, in the running loop.

    ``team_ids`` get one fresh key each (``Stack.keys``); ``config`` holds the keywords of
    :func:`make_config` (``extra``, ``teams``, ``store``, ``upstream``, ``base_url``,
    ``server``, ``grace``). With ``test_key`` the emulator accepts, and the gateway holds, a
    ``clipia_test_…`` key as well (``Stack.test_key``).
    """
    sandbox_key = canary_key("test") if test_key else None
    emulator = await start_emulator(
        seed=seed, rpm=emulator_rpm, keys=[sandbox_key] if sandbox_key else []
    )
    try:
        stack = await start_gateway(emulator, team_keys(team_ids), test_key=sandbox_key, **config)
    except BaseException:
        await emulator.stop()
        raise
    stack.runners.append(emulator.runner)
    return stack


async def stop_stack(stack: Stack) -> None:
    """Stop the gateway, then the emulator if the stack owns it."""
    await stack.running.stop()
    for runner in stack.runners:
        await runner.cleanup()


def with_server(config: Config, **fields: object) -> Config:
    """``config`` with ``server`` fields replaced after validation (for values no file holds)."""
    server = msgspec.structs.replace(config.server, **fields)
    return msgspec.structs.replace(config, server=server)


@dataclass
class Cluster:
    """One emulator and N gateways (same teams, keys and store section)."""

    emulator: EmulatorState
    emulator_url: str
    gateways: list[Stack]
    keys: dict[str, str]
    runner: web.AppRunner
    stopped: list[Stack] = field(default_factory=list)

    async def stop(self) -> None:
        """Stop every gateway, then the emulator."""
        for gateway in self.gateways:
            if gateway not in self.stopped:
                self.stopped.append(gateway)
                await stop_stack(gateway)
        await self.runner.cleanup()


async def start_cluster(replicas: int, *, emulator_rpm: int = 100_000, **config: Any) -> Cluster:
    """Start one emulator and ``replicas`` gateways in the running loop (loopback only).

    ``config`` holds the keywords of :func:`make_config`; every gateway gets the same config
    (so a ``store`` naming Redis and PostgreSQL makes them share one quota state and ledger).
    """
    emulator = await start_emulator(rpm=emulator_rpm)
    keys = team_keys()
    cluster = Cluster(
        emulator=emulator.state,
        emulator_url=emulator.url,
        gateways=[],
        keys=keys,
        runner=emulator.runner,
    )
    try:
        for _ in range(replicas):
            cluster.gateways.append(await start_gateway(emulator, keys, **config))
    except BaseException:
        await cluster.stop()
        raise
    return cluster


StackFactory = Callable[..., Awaitable[Stack]]
"""The ``stacks`` fixture: :func:`start_stack`'s keywords in, a running stack out."""

ClusterFactory = Callable[..., Awaitable[Cluster]]
"""The ``clusters`` fixture: :func:`start_cluster`'s arguments in, a running cluster out."""


def open_connections(running: Running, *, admin: bool = False) -> int:
    """Connections a port of the gateway has accepted and counts against its cap."""
    from clipia_proxy.connections import GatewayServer

    server = (running.admin_runner if admin else running.data_runner).server
    assert isinstance(server, GatewayServer)
    return server.open_connections


async def wait_settled(stack: Stack, *, within: float = 10.0) -> None:
    """Wait (bounded) until the gateway has no settlement task running and no open record."""
    from clipia_proxy.keys import QUOTAS, TASKS

    app = stack.running.app

    async def settled() -> bool:
        return not app[TASKS].pending("settle-") and not await app[QUOTAS].store.dispatched()

    await wait_until(settled, within=within, what="settlement")


# --------------------------------------------------------------------------- processes


@dataclass
class Served:
    """One ``python -m clipia_proxy serve`` process, its ports and its output.

    The output is in the file ``log``, or (``log`` None) on ``process.stderr``, a pipe the test
    reads on from where :func:`serve` stopped; ``lines`` holds what :func:`serve` read there.
    """

    process: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path | None
    lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_text(self) -> str:
        if self.log is None:
            return "".join(self.lines)
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def stop(self, signum: int = 15, *, within: float = 30.0) -> int:
        """Send ``signum`` (SIGTERM by default) if it still runs; wait for the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(within):
            return await self.process.wait()


async def serve(
    config: Path,
    *,
    env: Mapping[str, str],
    log: Path | None = None,
    args: Iterable[str] = (),
    within: float = 20.0,
    **spawn: Any,
) -> Served:
    """Start ``python -m clipia_proxy serve --config config`` and wait for its listening line.

    stdout and stderr go to the file ``log``; without one, stderr is a pipe (``Served.lines``
    and ``process.stderr``). ``env`` is added to this process's environment; ``spawn`` goes to
    :func:`asyncio.create_subprocess_exec` (``preexec_fn``).
    """
    command = (sys.executable, "-m", "clipia_proxy", "serve", "--config", str(config), *args)
    environment = {**os.environ, **env}
    if log is None:
        process = await asyncio.create_subprocess_exec(
            *command, env=environment, stderr=asyncio.subprocess.PIPE, **spawn
        )
    else:
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *command, env=environment, stdout=sink, stderr=sink, **spawn
            )
    lines: list[str] = []

    async def listening() -> re.Match[str] | None:
        if log is not None:
            text = await asyncio.to_thread(log.read_text, errors="replace")
            assert process.returncode is None, "serve exited before listening:\n" + text
            return LISTENING.search(text)
        assert process.stderr is not None
        line = (await process.stderr.readline()).decode()
        assert line, "serve exited before listening:\n" + "".join(lines)
        lines.append(line)
        return LISTENING.search(line)

    try:
        # A file is polled; a pipe's readline already waits for the next line.
        every = 0.05 if log is not None else 0.0
        match = await wait_until(listening, within=within, every=every, what="serve listening")
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return Served(process, int(match[1]), int(match[2]), log, lines)


async def run_cli(
    *args: str, env: Mapping[str, str] | None = None, within: float = 30.0
) -> tuple[int, bytes, bytes]:
    """Run ``python -m clipia_proxy *args``; return (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipia_proxy",
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, out, err


async def run_report(
    config: Path, *args: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``clipia-proxy report --config config --format json *args``; the decoded document."""
    code, out, err = await run_cli(
        "report", "--config", str(config), "--format", "json", *args, env=env
    )
    assert code == 0, err.decode()
    doc: dict[str, Any] = msgspec.json.decode(out)
    return doc


def sqlite_report_config(tmp_path: Path, db: Path | str) -> Path:
    """A config file that only names the SQLite ledger ``db`` (enough for ``report``)."""
    config = tmp_path / "report.yaml"
    config.write_text(f"store: {{backend: sqlite, sqlite_path: {db}}}\n")
    return config


async def decided(store: Store, request: ReserveRequest) -> ReserveResult:
    """Reserve ``request`` on ``store`` and return the quota service's decision on it."""
    return decide(request, await store.reserve(request))

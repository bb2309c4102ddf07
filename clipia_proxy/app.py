"""The application factory: the only module that knows every other one.

``create_app(config)`` returns the data-port application (the team-facing OpenAI-compatible
API); ``create_admin_app(app)`` returns the admin-port application that shares its state.
Tests swap the world through keyword-only overrides instead of patching.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from . import handlers, mcp_http
from .attribution import Attributor, hash_key_from
from .auth import Refusal
from .catalog import Catalog
from .config import (
    Config,
    Secret,
    StoreConfig,
    read_admin_token,
    read_api_key,
    read_test_api_key,
)
from .drift import DriftChecker
from .errors import (
    Draining,
    ExpectationFailed,
    InternalError,
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    RateLimited,
    RequestTooLarge,
)
from .hangups import HangupWatch
from .health import Health
from .health import create_admin_app as _create_admin_app
from .ids import new_request_id
from .key_usage import snapshot_forever
from .keys import (
    ATTRIBUTION,
    CATALOG,
    DRIFT,
    GENERATIONS,
    HANGUPS,
    HEALTH,
    INFO,
    KEY_SCAN,
    LEDGER,
    LIVE,
    METRICS,
    PRINCIPAL,
    QUOTAS,
    STREAMS,
    TASKS,
    UPSTREAM,
    UPSTREAMS,
)
from .ledger import Ledger
from .live import Live
from .logs import log_access
from .metrics import BudgetSnapshot, Metrics
from .quotas.journal import Journal
from .quotas.memory import MemoryStore
from .quotas.service import QuotaService
from .quotas.sqlite import SqliteStore
from .quotas.store import Store, StoreUnavailable
from .record import GenerationOwners, RequestInfo
from .redact import KeyScanner
from .sandbox import Upstreams
from .streaming import OpenStreams
from .tasks import TaskRegistry
from .upstream import Transport, UpstreamClient
from .version import __version__

__all__ = ["apply_config", "create_admin_app", "create_app"]

_LOGGER: Final = logging.getLogger(__name__)
_GENERATION_OWNERS: Final = 100_000
"""Bound on remembered generation ids (about 10 MiB); the oldest are forgotten first."""

_BUDGET_GAUGE_SECONDS: Final = 5.0
"""How often budget gauges are re-read from the store (a scrape never waits on the store)."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CLIENT_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A client's ``X-Request-Id`` kept and echoed: up to 128 characters of a safe set."""
_UNMATCHED: Final = "unmatched"
"""The name of the catch-all route (and the ``route`` label of what it answers)."""


def _rate_limit_headers(app: web.Application, team: str, error: RateLimited) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the gateway's own 429 (what the SDKs read)."""
    limits = app[QUOTAS].limits(team)
    minutes, seconds = divmod(max(error.retry_after or 1, 1), 60)
    reset = f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
    rpm, tpm = limits.rpm, limits.tpm
    if error.limit is not None:  # a key's own limit refused it: that limit, not the team's
        rpm = tpm = error.limit
    if error.reason == "tpm" and tpm is not None:
        return {
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": reset,
        }
    if error.reason == "rpm" and rpm is not None:
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": reset,
        }
    return {"x-ratelimit-reset-requests": reset}


_OTHER_OPENAI_ROUTES: Final = (
    "/v1/responses",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/images",
    "/v1/audio",
    "/v1/moderations",
    "/v1/files",
    "/v1/batches",
    "/v1/assistants",
    "/v1/threads",
    "/v1/realtime",
    "/v1/fine_tuning",
    "/v1/vector_stores",
    "/v1/uploads",
)
"""OpenAI API routes a client may try: their 404 says what the gateway does serve."""


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """No route matched: 405 when another method of the path exists, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name == _UNMATCHED:
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise MethodNotAllowed(f"The method {request.method[:16]} is not allowed on this route.")
    path = request.raw_path.partition("?")[0]
    for route in _OTHER_OPENAI_ROUTES:
        if path == route or path.startswith(route + "/"):
            raise NotFound(
                f"This gateway serves chat completions only (POST /v1/chat/completions, plus "
                f"/v1/models, /v1/key and /v1/generation); {route} is not available here."
            )
    raise NotFound("Unknown route.")


def create_app(
    config: Config,
    *,
    api_key: Secret | None = None,
    test_api_key: Secret | None = None,
    today: Callable[[], dt.date] | None = None,
    store: Store | None = None,
    clock: Callable[[], float] | None = None,
    upstream_transport: Transport | None = None,
) -> web.Application:
    """Build the data-port application for ``config``.

    ``api_key`` overrides the Clipia key named by the config (the demo and tests use it);
    ``test_api_key`` the sandbox key named by ``upstream.test_api_key_env``;
    ``today`` the date used for key expiry; ``store`` the quota store (else built from
    ``config.store``); ``clock`` the quota clock (epoch s); ``upstream_transport`` how requests
    reach Clipia (default: an ``aiohttp.ClientSession``; tests may pass a ``MockTransport``).
    """
    key = api_key if api_key is not None else read_api_key(config.upstream)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        # One middleware (each layer costs a coroutine per request): request id, draining,
        # identity, every error as an OpenAI envelope, metrics and the access line.
        middlewares=[_gateway_middleware],
    )
    tasks = TaskRegistry()
    attempts: list[Callable[[str], None]] = []  # filled below, once metrics exist
    upstream = UpstreamClient(
        config.upstream,
        key,
        on_attempt=lambda code: attempts[0](code) if attempts else None,
        transport=upstream_transport,
    )
    test_key = test_api_key if test_api_key is not None else read_test_api_key(config.upstream)
    upstreams = Upstreams(
        upstream,
        UpstreamClient(
            config.upstream,
            test_key,
            on_attempt=lambda code: attempts[0](code) if attempts else None,
            transport=upstream.transport,  # one pool of connections to Clipia, two keys
        )
        if test_key is not None
        else None,
    )
    upstreams.apply(config.teams)
    catalog = Catalog(upstream, config.catalog, tasks)
    quota_clock = clock or time.time
    quotas = QuotaService(
        store if store is not None else build_store(config, clock=quota_clock),
        config,
        clock=quota_clock,
    )
    quotas.journal = Journal(
        journal_path(config.store),
        max_bytes=config.store.journal_max_bytes,
        lease_seconds=config.accounting.lease_seconds,
        timeout=config.store.timeout_seconds if quotas.store.is_remote else None,
    )
    ledger = Ledger(
        quotas,
        upstream,
        rubles_per_credit=config.accounting.rubles_per_credit,
        spawn=lambda coro, name: tasks.spawn(coro, name=name),
        upstream_for=upstreams.for_team,
    )
    metrics = Metrics(
        [team.id for team in config.teams],
        version=__version__,
        catalog_age=catalog.age,
        catalog_refreshes=lambda: catalog.refresh_results,
        usage_sources=lambda: ledger.usage_sources,
        implausible_costs=lambda: ledger.implausible_costs,
        store_errors=lambda: quotas.store_errors,
        counters_health=lambda: _counters_health(quotas.store),
        models=catalog.model_ids,
        allows=lambda team, model: _allows(app, team, model),
        environment=upstreams.environment,
    )
    catalog.on_change = metrics.set_models
    attempts.append(metrics.record_upstream_attempt)
    app[METRICS] = metrics
    drift = DriftChecker(
        ledger,
        sample_rate=config.accounting.drift_sample_rate,
        delay=config.accounting.drift_check_delay_seconds,
        clock=time.monotonic,
        record=metrics.record_drift_check,
    )
    ledger.on_settled = drift.offer
    app[DRIFT] = drift
    app[STREAMS] = OpenStreams()
    app[QUOTAS] = quotas
    app[LEDGER] = ledger
    app[LIVE] = Live(config, today=today)
    app[TASKS] = tasks
    app[UPSTREAM] = upstream
    app[UPSTREAMS] = upstreams
    app[ATTRIBUTION] = Attributor(config.attribution, _end_user_hash_key(config, key))
    app[CATALOG] = catalog
    app[GENERATIONS] = GenerationOwners(_GENERATION_OWNERS)
    app[HANGUPS] = HangupWatch()
    app[KEY_SCAN] = KeyScanner(key.reveal(), *([test_key.reveal()] if test_key else []))
    app[HEALTH] = Health(
        catalog_is_warm=catalog.is_warm,
        store_is_reachable=lambda: quotas.fail_open or quotas.store_reachable,
        # fail_open serves while the store cannot admit: then its reasons are warnings only.
        store_problems=lambda: [] if quotas.fail_open else _store_says(quotas.store, "problems"),
        store_warnings=lambda: (
            _store_says(quotas.store, "warnings")
            + (_store_says(quotas.store, "problems") if quotas.fail_open else [])
        ),
    )

    router = app.router
    # Every route defers ``Expect`` to the middleware and the handler: ``100 Continue`` only
    # after authentication (aiohttp's default answers it before any middleware runs).
    router.add_post(
        "/v1/chat/completions", handlers.chat_completions, expect_handler=handlers.defer_expectation
    )
    for path, handler in (
        ("/v1/models", handlers.list_models),
        ("/v1/models/{model_id}", handlers.retrieve_model),
        ("/v1/key", handlers.key_info),
        ("/v1/generation", handlers.generation),
    ):
        router.add_get(path, handler, allow_head=False, expect_handler=handlers.defer_expectation)
    mcp_http.add_routes(router)  # the MCP chat tool: same keys, same chat path
    # Last: whatever no route above matches (the 404/405 of the middleware, after identity).
    router.add_route(
        "*", "/{path:.*}", _unmatched, name=_UNMATCHED, expect_handler=handlers.defer_expectation
    )

    # One cleanup context per resource, in dependency order (released in reverse): background
    # work (settlements) is drained while the store and the upstream client are still open.
    app.cleanup_ctx.append(_tasks_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_drain_ctx)
    app.cleanup_ctx.append(_reconcile_ctx)
    app.cleanup_ctx.append(_catalog_ctx)
    app.cleanup_ctx.append(_budget_gauges_ctx)
    app.cleanup_ctx.append(_drift_ctx)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_stop_hangup_watch)
    return app


def _allows(app: web.Application, team: str, model: str) -> bool:
    """Whether ``team``'s policy in force allows the canonical ``model`` (metrics' series)."""
    policy = app[LIVE].policies.get(team) if LIVE in app else None
    return policy is not None and policy.allows(model)


def _end_user_hash_key(config: Config, api_key: Secret) -> bytes:
    """The end-user hash key: from ``attribution.end_user_hash_key_env``, else the Clipia key."""
    name = config.attribution.end_user_hash_key_env
    named = os.environ.get(name, "").strip() if name else ""
    return hash_key_from(named or api_key.reveal())


def apply_config(app: web.Application, config: Config) -> None:
    """Swap in a reloaded config for new requests (see ``reload``); counters and streams stay."""
    app[LIVE].apply(config)
    app[DRIFT].sample_rate = config.accounting.drift_sample_rate
    app[DRIFT].delay = config.accounting.drift_check_delay_seconds
    app[UPSTREAMS].apply(config.teams)
    app[ATTRIBUTION].apply(config.attribution)
    app[QUOTAS].apply(config)
    app[CATALOG].apply(config.catalog)
    app[METRICS].set_teams(team.id for team in config.teams)


def create_admin_app(app: web.Application, *, admin_token: Secret | None = None) -> web.Application:
    """Build the admin-port application (``/metrics``, ``/healthz``, ``/readyz``) for a data app.

    With a token (``admin_token``, else the one ``server.admin_token_env`` names) ``/metrics``
    answers only ``Authorization: Bearer <token>``; the probes stay open.
    """
    scrape = make_aiohttp_handler(app[METRICS].registry)
    token = admin_token or read_admin_token(app[LIVE].config.server)
    expected = token.reveal().encode() if token is not None else None

    async def metrics_route(request: web.Request) -> web.StreamResponse:
        if expected is not None:
            presented = request.headers.get("Authorization", "")
            scheme, _, credential = presented.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode("utf-8", "surrogateescape"), expected
            ):
                error = InvalidApiKey(
                    "/metrics needs the admin token: 'Authorization: Bearer <token>'."
                )
                return web.Response(
                    status=error.status,
                    body=error.body(),
                    content_type="application/json",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await scrape(request)

    return _create_admin_app(app[HEALTH], [web.get("/metrics", metrics_route, allow_head=False)])


async def refresh_budget_gauges(app: web.Application) -> None:
    """Read every team's budget numbers from the store into the metrics snapshot."""
    quotas, metrics = app[QUOTAS], app[METRICS]
    snapshot: dict[tuple[str, str], BudgetSnapshot] = {}
    for team in app[LIVE].config.teams:
        for budget in await quotas.budgets(team.id):
            resets_at = budget["resets_at"]
            snapshot[team.id, str(budget["period"])] = BudgetSnapshot(
                limit=Decimal(str(budget["limit"])),
                spent=Decimal(str(budget["spent"])),
                reserved=Decimal(str(budget["reserved"])),
                remaining=Decimal(str(budget["remaining"])),
                resets_at=(
                    dt.datetime.fromisoformat(str(resets_at)).timestamp() if resets_at else None
                ),
            )
    metrics.set_budgets(snapshot)


async def _budget_gauges_ctx(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            try:
                await refresh_budget_gauges(app)
            except StoreUnavailable as exc:
                _LOGGER.debug("budget gauges not refreshed: %s", exc)
            if await app[HEALTH].pause(_BUDGET_GAUGE_SECONDS):
                return

    _ = app[TASKS].spawn(loop(), name="budget-gauges")
    yield


async def _tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[TASKS].drain(app[LIVE].config.server.shutdown_grace_seconds)


def _store_says(store: Store, what: str) -> list[str]:
    """The store's own ``problems`` or ``warnings`` (Redis counters), else nothing."""
    return list(getattr(store, what, ()))


def _counters_health(store: Store) -> tuple[int, int]:
    """(unsafe Redis settings, counter rebuilds) of a Redis store; (0, 0) for the others."""
    return len(getattr(store, "warnings", ())), int(getattr(store, "rebuilds", 0))


def build_store(config: Config, *, clock: Callable[[], float]) -> Store:
    """Return the store ``config.store.backend`` names over ``config.ledger`` (not started)."""
    backend = config.store.backend
    if config.ledger.backend == "postgres":
        from .ledgers.postgres import PostgresLedger

        ledger = PostgresLedger.from_config(config.ledger, timeout=config.store.timeout_seconds)
        if backend == "redis":
            from .quotas.redis import RedisStore

            return RedisStore.from_config(config.store, ledger)
        from .quotas.ledgered import EngineStore

        return EngineStore(ledger, clock=clock)
    if backend == "memory":
        return MemoryStore()
    if backend == "sqlite":
        return SqliteStore(config.store.sqlite_path, clock=clock)
    # check-config refuses redis counters without the PostgreSQL ledger
    raise StoreUnavailable("store.backend redis needs ledger.backend: postgres")


def journal_path(store: StoreConfig) -> Path:
    """Return the outage journal's file (``store.journal_path``, else next to the SQLite file)."""
    if store.journal_path:
        return Path(store.journal_path)
    return Path(store.sqlite_path).parent / "clipia-proxy-outage.jsonl"


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    quotas = app[QUOTAS]
    try:
        await quotas.store.start()
    except StoreUnavailable as exc:
        # Keep serving what can be served: requests follow store.on_error, /readyz says why.
        quotas.store_reachable = False
        _LOGGER.error("quota store unavailable at start-up: %s", exc)  # noqa: TRY400 - no traceback needed
    journal = quotas.journal
    if journal is not None:
        await journal.start()
        _ = app[TASKS].spawn(_replay_journal(app, journal), name="journal-replay")
    yield
    if journal is not None:
        await journal.flush()
    await quotas.store.close()


async def _drift_ctx(app: web.Application) -> AsyncIterator[None]:
    _ = app[TASKS].spawn(app[DRIFT].run(app[HEALTH].pause), name="drift-check")
    config = app[LIVE].config
    every = config.accounting.key_usage_snapshot_seconds
    if every > 0:
        _ = app[TASKS].spawn(
            snapshot_forever(
                app[UPSTREAM],
                key_usage_path(config),
                every=every,
                clock=time.time,
                pause=app[HEALTH].pause,
            ),
            name="key-usage",
        )
    yield


def key_usage_path(config: Config) -> Path:
    """Return where ``GET /v1/key`` usage snapshots go (see ``clipia_proxy.key_usage``)."""
    if config.accounting.key_usage_path:
        return Path(config.accounting.key_usage_path)
    return Path(config.store.sqlite_path).parent / "clipia-proxy-key-usage.jsonl"


async def _replay_journal(app: web.Application, journal: Journal) -> None:
    """Write what the outage journal holds into the store once it answers.

    Tried 1 s apart, backing off to 10 s while the store stays down.
    """
    wait = 1.0
    while True:
        wait = 1.0 if await _replay_once(app) else min(wait * 2, 5.0)
        if await app[HEALTH].pause(wait):
            return


async def _replay_once(app: web.Application) -> bool:
    """Replay the outage journal if it holds anything; return False if the store is down."""
    quotas = app[QUOTAS]
    journal = quotas.journal
    if journal is None or not journal.pending:
        return True
    try:
        await journal.replay(quotas.store, now=quotas.now())
    except (StoreUnavailable, TimeoutError) as exc:
        _LOGGER.info("journal not replayed yet: store unavailable (%s)", exc)
        return False
    quotas.store_reachable = True
    return True


async def _reconcile_ctx(app: web.Application) -> AsyncIterator[None]:
    # One replica (sqlite/memory): every unsettled record belongs to a dead process. Shared
    # stores: only expired leases, then periodically, for records of crashed replicas.
    shared = app[LIVE].config.store.backend == "redis"
    started = app[QUOTAS].now()
    created_before = None if shared else started
    ledger = app[LEDGER]
    try:
        await _replay_once(app)  # what a previous process journaled goes in first
        settled = await ledger.reconcile(only_expired=shared, created_before=created_before)
    except StoreUnavailable as exc:
        _LOGGER.warning("reconciliation postponed: quota store unavailable (%s)", exc)
        settled = 0
    if settled:
        _LOGGER.warning("reconciled %d ledger record(s) left unsettled by a crash", settled)
    if shared:
        _ = app[TASKS].spawn(_reconcile_forever(app), name="ledger-reconciler")
    elif ledger.postponed:
        _ = app[TASKS].spawn(_reconcile_postponed(app, started), name="ledger-reconciler")
    yield


async def _reconcile_postponed(app: web.Application, started: float) -> None:
    """Retry (1 s, 2 s, … 60 s apart) what the start-up pass left for ``/v1/generation``."""
    ledger, wait = app[LEDGER], 1.0
    while ledger.postponed and not await app[HEALTH].pause(wait):
        try:
            await ledger.reconcile(only_expired=False, created_before=started)
        except StoreUnavailable as exc:
            _LOGGER.warning("reconciler: store unavailable (%s)", exc)
        wait = min(wait * 2, 60.0)


async def _reconcile_forever(app: web.Application) -> None:
    interval = app[LIVE].config.accounting.lease_seconds / 2
    # health.pause wakes at once when draining starts, so shutdown never waits on this loop.
    while not await app[HEALTH].pause(interval):
        # The journal first: a void or settlement waiting there must win over a blind charge.
        if not await _replay_once(app):
            continue
        try:
            await app[LEDGER].reconcile(only_expired=True)
        except StoreUnavailable as exc:
            _LOGGER.warning("reconciler: store unavailable (%s)", exc)


async def _drain_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # Handlers cancelled at the end of the grace period spawn their settlements now.
    await app[TASKS].drain(app[LIVE].config.server.shutdown_grace_seconds)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    clients = app[UPSTREAMS].clients()
    for client in clients:
        await client.start()
    yield
    for client in clients:
        await client.close()


async def _catalog_ctx(app: web.Application) -> AsyncIterator[None]:
    try:
        await app[CATALOG].refresh()
    except ProxyError:
        _LOGGER.warning("catalog not loaded at start-up; /readyz stays not ready until it is")
    yield


async def _stop_hangup_watch(app: web.Application) -> None:
    app[HANGUPS].close()


async def _on_shutdown(app: web.Application) -> None:
    app[HEALTH].is_draining = True
    await app[TASKS].drain(app[LIVE].config.server.shutdown_grace_seconds)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None or resource.name == _UNMATCHED:
        return _UNMATCHED
    return resource.canonical


@web.middleware
async def _gateway_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Wrap every request: id, draining, identity, errors, metrics, access line.

    In order: an id; refused while draining (before auth: cheap); identity from the headers
    and the socket peer alone, before any body is read; the handler; every failure as an
    OpenAI error envelope; metrics and the access line.
    """
    info = RequestInfo(request_id=new_request_id(), started=time.perf_counter())
    client_id = request.headers.get("X-Request-Id")
    if client_id is not None and _CLIENT_REQUEST_ID.fullmatch(client_id):
        info.client_request_id = client_id
    request[INFO] = info
    app = request.app
    response: web.StreamResponse
    rejection: str | None = None
    try:
        health = app[HEALTH]
        if health.is_draining:
            raise Draining(  # noqa: TRY301 - rendered like every other refusal, just below
                "The gateway is shutting down; retry on another replica.", retry_after=1
            )
        health.enter()
        try:
            live = app[LIVE]
            if "Origin" in request.headers and request.path == mcp_http.PATH:
                # Before identity: a page that may not call /mcp learns nothing more.
                mcp_http.check_origin(
                    request.headers.getall("Origin"), live.config.mcp.allowed_origins
                )
            authenticator = live.authenticator
            peer = _peer(request) if authenticator.needs_peer else None
            principal = authenticator.authenticate(request.headers, peer)
            if "Expect" in request.headers:
                _check_expectation(request)
            request[PRINCIPAL] = principal
            info.team = principal.team
            info.key_id = principal.key_id
            ended = app[METRICS].record_request_started(principal.team)
            try:
                response = await handler(request)
            finally:
                ended()  # the same series, even if a reload dropped the team meanwhile
        finally:
            health.leave()
    except ProxyError as exc:
        response = _render(exc)
        rejection = exc.reason
        if isinstance(exc, Refusal):
            _LOGGER.info("identity refused: %s", exc.detail)
        elif isinstance(exc, RateLimited) and PRINCIPAL in request:
            response.headers.update(_rate_limit_headers(app, request[PRINCIPAL].team, exc))
    except web.HTTPException as exc:
        # aiohttp's own routing errors: 404 for unknown routes, 405 for a wrong method.
        if exc.status == 405:
            error: ProxyError = MethodNotAllowed(
                f"The method {request.method[:16]} is not allowed on this route."
            )
        elif exc.status == 404:
            error = NotFound("Unknown route.")
        else:
            error = _status_error(exc.status)
        response = _render(error)
    except Exception:
        _LOGGER.exception("unexpected error in request %s", info.request_id)
        response = _render(
            InternalError(f"Internal error. Quote request id {info.request_id} when reporting it.")
        )
    if not response.prepared:
        response.headers.update(info.id_headers())
    info.status = response.status
    route = _route_name(request)
    _observe(request, info, route, rejection)
    log_access(info, route=route, method=request.method)
    return response


def _check_expectation(request: web.Request) -> None:
    """Refuse an ``Expect`` other than ``100-continue`` (417); the handler answers that one."""
    if request.headers.getone("Expect").strip().lower() != "100-continue":
        raise ExpectationFailed(
            "The only expectation this gateway meets is 'Expect: 100-continue'."
        )


def _peer(request: web.Request) -> str | None:
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    return peername[0] if isinstance(peername, tuple) and peername else None


def _observe(request: web.Request, info: RequestInfo, route: str, rejection: str | None) -> None:
    """Metrics for one finished request (labels bounded by Metrics)."""
    metrics = request.app[METRICS]
    now = time.perf_counter()
    metrics.record_request(
        team=info.team,
        model=info.model,
        route=route,
        code=info.status,
        stream=info.stream,
        duration=now - info.started,
    )
    if rejection is not None:
        metrics.record_rejection(info.team, rejection)
    if info.upstream_sent is not None:
        after = now - info.upstream_done if info.upstream_done is not None else 0.0
        metrics.record_overhead(route, info.upstream_sent - info.started + after)
    if info.ttft is not None and info.model is not None:
        metrics.record_ttft(info.team, info.model, info.ttft)


def _status_error(status: int) -> ProxyError:
    if status == 413:
        return RequestTooLarge("The body is larger than this gateway accepts.")
    if 400 <= status < 500:
        return InvalidRequest("The request could not be understood.")
    return InternalError("The request could not be served.")


def _render(error: ProxyError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers(),
    )

"""Thin route handlers; ``chat_completions`` reads like docs/architecture.md §3, in order.

Identity is settled by a middleware before any handler runs (``request[PRINCIPAL]``); errors
are raised as :class:`~clipia_proxy.errors.ProxyError` and rendered by the error middleware.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from decimal import Decimal
from typing import Final

import aiohttp
import msgspec
from aiohttp import web

from .catalog import CatalogSnapshot
from .config import Config
from .errors import (
    BudgetExceeded,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    Overloaded,
    QuotaStoreUnavailable,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from .keys import (
    ATTRIBUTION,
    CATALOG,
    GENERATIONS,
    HANGUPS,
    INFO,
    KEY_SCAN,
    LEDGER,
    LIVE,
    METRICS,
    PRINCIPAL,
    QUOTAS,
    STREAMS,
    TASKS,
    UPSTREAMS,
)
from .policy import ModelPolicy, apply_caps, bound_output
from .quotas.estimate import PriceUnknown, estimate
from .quotas.model import Outcome, RecordState, Settlement, UsageSource, credits
from .quotas.store import LedgerRecord, StoreUnavailable
from .record import RequestInfo
from .sse import UsageTap
from .streaming import StreamResult, relay_stream
from .upstream import (
    SHOULD_RETRY,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamNotSent,
    UpstreamRefused,
    UpstreamResponse,
    read_body,
)
from .wire import (
    ChatRequest,
    Usage,
    answer_summary,
    decode_json,
    encode_json,
    parse_chat_request,
)

__all__ = [
    "chat_completions",
    "complete_chat",
    "defer_expectation",
    "generation",
    "key_data",
    "key_info",
    "list_models",
    "read_json_body",
    "retrieve_model",
    "team_model",
    "team_models",
]

_LOGGER: Final = logging.getLogger(__name__)
_MAX_UPSTREAM_BODY: Final = 64 * 1024 * 1024
"""Bound on a non-streaming upstream answer held in memory (streams are never held)."""
_MAX_ERROR_BODY: Final = 64 * 1024
_JSON: Final = "application/json"
_PASSED_THROUGH_ERROR_HEADERS: Final = ("Retry-After",)
_WITHHELD_MESSAGE: Final = (
    "The upstream AI gateway's answer quoted the gateway's own credentials and was withheld."
)
_CODE_BY_STATUS: Final = {
    400: ("invalid_request_error", "invalid_request"),
    402: ("insufficient_quota", "insufficient_credits"),
    404: ("invalid_request_error", "not_found"),
    409: ("invalid_request_error", "conflict"),
    422: ("invalid_request_error", "model_input_invalid"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("api_error", "service_unavailable"),
}


async def defer_expectation(_request: web.Request) -> None:
    """A route's ``expect_handler``: answer no ``Expect`` before the middleware ran.

    aiohttp's default sends ``100 Continue`` before any middleware, so before authentication;
    :func:`read_json_body` sends it once the request passed identity and the 415/413 checks.
    """


async def read_json_body(request: web.Request, limit: int, deadline: float | None = None) -> bytes:
    """Return the raw body after the media-type and size checks (415, 413) — in that order.

    The body is not read at all when the headers already condemn it; a client that asked
    ``Expect: 100-continue`` gets ``100 Continue`` only here, after authentication and these
    checks. The body must arrive whole within ``deadline`` seconds (else 408; by default
    ``server.body_timeout_seconds``).
    """
    content_type = request.headers.get("Content-Type", "")
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != _JSON:
        raise UnsupportedMediaType(
            "The body must be JSON sent as 'Content-Type: application/json'."
        )
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in {
            "utf-8",
            "utf8",
        }:
            raise UnsupportedMediaType("JSON bodies must be UTF-8.")
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType("Compressed request bodies are not accepted.")
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"The body is larger than this gateway's limit of {limit} bytes.")
    content = request.content
    if content.is_eof() and content.exception() is None:
        # The whole body arrived with the headers (the usual case): take it as is, without
        # request.read()'s loop of reads into a bytearray. The same cap as request.read().
        data = content.read_nowait()
        if len(data) > limit:
            raise RequestTooLarge(f"The body is larger than this gateway's limit of {limit} bytes.")
        return data
    if deadline is None:
        deadline = request.app[LIVE].config.server.body_timeout_seconds
    await _continue(request)
    try:
        async with asyncio.timeout(deadline):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestTooLarge(
            f"The body is larger than this gateway's limit of {limit} bytes."
        ) from exc
    except TimeoutError as exc:
        raise RequestTimeout(
            f"The body did not arrive within {deadline:g} seconds of the request's headers."
        ) from exc


async def _continue(request: web.Request) -> None:
    """Answer ``Expect: 100-continue`` (the middleware refused any other expectation)."""
    if request.version >= aiohttp.HttpVersion11 and "Expect" in request.headers:
        writer = request.writer
        await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.output_size = 0  # the answer itself has not started


def _policy(request: web.Request) -> ModelPolicy:
    return request.app[LIVE].policies[request[PRINCIPAL].team]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: check, admit, forward, relay, settle."""
    # The config in force when identity was settled (same turn of the loop), kept for the
    # whole request: a reload while the body arrives does not change it midway. (``Live`` is
    # updated in place by a reload: its parts are taken now, not after the body.)
    app, team = request.app, request[PRINCIPAL].team
    live = app[LIVE]
    config, policy = live.config, live.policies[team]
    # 1b. The team's place in the gateway is taken before its body is read: a slow body
    # counts against its concurrency, and a refused one against its RPM.
    quotas = app[QUOTAS]
    quotas.enter(team)
    try:
        # 2. Read and parse strictly.
        server = config.server
        raw = await read_json_body(request, server.max_body_bytes, server.body_timeout_seconds)
        return await _complete_chat(request, parse_chat_request(raw), config, policy)
    finally:
        info = request[INFO]
        if not quotas.left_early(info.request_id):  # a client gone left already
            quotas.leave(team, counted=info.upstream_sent is not None, request_id=info.request_id)


async def complete_chat(
    request: web.Request,
    chat: ChatRequest,
    config: Config | None = None,
    policy: ModelPolicy | None = None,
) -> web.StreamResponse:
    """Steps 3-8 for a parsed chat request: policy, caps, admission, forwarding, settlement.

    The one path for every chat channel (``/v1/chat/completions`` and the MCP ``chat``
    tool): the same decision and the same accounting. ``config`` and ``policy`` are the ones
    in force when the request arrived (default: now). Refusals raise :class:`ProxyError`; an
    upstream error status comes back as the (relayed) response.
    """
    quotas, team = request.app[QUOTAS], request[PRINCIPAL].team
    if config is None or policy is None:
        live = request.app[LIVE]
        config, policy = live.config, live.policies[team]
    quotas.enter(team)
    try:
        return await _complete_chat(request, chat, config, policy)
    finally:
        if not quotas.left_early(request[INFO].request_id):  # a client gone left already
            info = request[INFO]
            quotas.leave(team, counted=info.upstream_sent is not None, request_id=info.request_id)


async def _complete_chat(
    request: web.Request, chat: ChatRequest, config: Config, policy: ModelPolicy
) -> web.StreamResponse:
    app = request.app
    info = request[INFO]
    info.stream = chat.stream
    # 3. Policy: alias -> canonical id, allow/deny, catalog, caps.
    catalog = app[CATALOG]
    snapshot = catalog.fresh() or await catalog.get()
    try:
        canonical_model = policy.resolve(chat.requested_model, snapshot.entries)
    except ModelNotAllowed:
        denied = policy.canonical(chat.requested_model)
        if denied in snapshot.entries:  # a catalog id: bounded, safe for metrics and logs
            info.model = denied
        raise
    info.model = canonical_model
    team = policy.team
    apply_caps(chat.body, team.caps)
    body = chat.body
    entry = snapshot.entries[canonical_model]
    context_length = entry.raw.get("context_length")
    if not isinstance(context_length, int):
        context_length = None
    # A budget is a bound: the upstream may write no more than the reservation counts.
    output_bound = bound_output(
        body,
        cap=team.caps.max_tokens,
        budgeted=policy.budgeted,
        default_reserve=config.accounting.default_output_reserve_tokens,
        context_length=context_length,
    )
    body["model"] = canonical_model
    drop_usage_chunk = chat.stream and not chat.client_wants_usage
    if drop_usage_chunk:
        options = body.get("stream_options")
        body["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    payload = encode_json(body)
    # 4-5. Admit: estimate the worst case, reserve it and write the ledger record.
    try:
        worst_case = estimate(
            raw_body=payload,
            body=body,
            prompt_price=entry.prompt_price,
            completion_price=entry.completion_price,
            context_length=context_length,
            team_max_tokens=team.caps.max_tokens,
            default_output_tokens=config.accounting.default_output_reserve_tokens,
            image_reserve_tokens=config.accounting.image_reserve_tokens,
            rubles_per_credit=config.accounting.rubles_per_credit,
            ceiling=team.caps.max_request_credits,
        )
    except PriceUnknown as exc:
        raise BudgetExceeded(
            f"The model {canonical_model!r} has no price in the catalog, so its cost cannot be "
            "bounded; the platform team can set caps.max_request_credits for it.",
            param="model",
        ) from exc
    # Refused before any reservation if a test team has no sandbox key to go with.
    _ = app[UPSTREAMS].for_team(team.id)
    app[METRICS].record_reservation(team.id, credits(worst_case.amount))
    attributor = app[ATTRIBUTION]
    attribution = attributor.of(request.headers, body)
    admission = await app[QUOTAS].admit(
        request_id=info.request_id,
        team=team.id,
        key_id=info.key_id,
        model=canonical_model,
        stream=chat.stream,
        estimate=worst_case,
        environment=team.environment,
        tags=attribution.tags,
        end_user=attribution.end_user,
    )
    if admission.would_reject is not None:
        app[METRICS].record_shadow_rejection(team.id, admission.would_reject.value)
    info.admitted(
        admission,
        prompt_price=entry.prompt_price,
        completion_price=entry.completion_price,
        metric_tags=attributor.metric_tags(attribution.tags),
    )
    try:
        return await _forward(
            request,
            info,
            payload,
            chat.stream,
            drop_usage_chunk,
            None if output_bound is None else worst_case.n * worst_case.output_tokens,
        )
    finally:
        # 8. Settle exactly once.
        _settle(app, info)


def _settle(app: web.Application, info: RequestInfo) -> None:
    """Step 8, the one entry point: settle the admitted request and count its spend; never raises.

    At once when nothing needs waiting for (a local store, no ``/v1/generation`` lookup), else
    in a registered task; both survive the handler's cancellation.
    """
    try:
        settlement = app[LEDGER].settle_now(info)
    except Exception:  # a bug here must not turn a served request into an error
        _LOGGER.exception("settling %s at once failed", info.request_id)
        settlement = None
    if settlement is None:
        name = f"settle-{info.request_id}"
        _ = app[TASKS].spawn(_settle_later(app, info), name=name)
    else:
        _count_settlement(app, info, settlement)


async def _settle_later(app: web.Application, info: RequestInfo) -> None:
    """Settle in the ledger (a lookup or a remote store to wait for), then count the spend."""
    _count_settlement(app, info, await app[LEDGER].settle(info))


def _count_settlement(app: web.Application, info: RequestInfo, settlement: Settlement) -> None:
    admission, model = info.require_admission(), info.model
    assert model is not None, "an admitted request has its canonical model"
    app[METRICS].record_settlement(
        team=admission.team,
        model=model,
        cost=credits(settlement.cost),
        prompt_tokens=settlement.prompt_tokens,
        completion_tokens=settlement.completion_tokens,
    )
    if info.metric_tags:
        app[METRICS].record_tag_spend(admission.team, info.metric_tags, credits(settlement.cost))


async def _forward(
    request: web.Request,
    info: RequestInfo,
    payload: bytes,
    stream: bool,
    drop_usage_chunk: bool,
    output_limit: int | None,
) -> web.StreamResponse:
    """Steps 6-7: send to Clipia and relay; record what was learnt on the request's record."""
    app = request.app
    response = await _send(request, info, payload, stream)
    try:
        info.upstream_status = response.status
        if response.status != 200:
            info.outcome = Outcome.UPSTREAM_ERROR
            return await _pass_through_error(app, response)
        content_type = response.headers.get("Content-Type", _JSON)
        if app[KEY_SCAN].header_mentions_key(content_type):
            _withhold(app, "key_echo")
            content_type = "text/event-stream" if stream else _JSON
        if stream and content_type.startswith("text/event-stream"):
            return await _relay(
                request, info, response, content_type, drop_usage_chunk, output_limit
            )
        return await _answer(request, info, response, content_type)
    except aiohttp.ClientError as exc:
        info.outcome = Outcome.UPSTREAM_ERROR
        raise _upstream_broke() from exc
    except TimeoutError as exc:
        info.outcome = Outcome.TIMEOUT
        raise _upstream_broke() from exc
    finally:
        response.release()


async def _send(
    request: web.Request, info: RequestInfo, payload: bytes, stream: bool
) -> UpstreamResponse:
    """Step 6: send the request to Clipia; return its answer at the headers.

    A failure sets the request's outcome (``not_sent`` only when Clipia certainly never got
    the request) and is raised for the error middleware.
    """
    app = request.app
    try:
        upstream = app[UPSTREAMS].for_team(info.require_admission().team)  # test teams: sandbox key
    except UpstreamUnavailable:
        info.outcome = Outcome.NOT_SENT  # a reload removed the sandbox key meanwhile
        raise
    info.upstream_sent = time.perf_counter()
    # While Clipia computes, a client that hangs up gives its team's slot back (once a second).
    watch = app[HANGUPS].watch(request, lambda: app[LEDGER].release_slot(info))
    try:
        return await upstream.send(
            "POST",
            "/chat/completions",
            request_id=info.request_id,
            body=payload,
            accept="text/event-stream" if stream else _JSON,
        )
    except UpstreamNotSent as exc:
        info.outcome = Outcome.NOT_SENT
        if isinstance(exc, UpstreamBusy):
            raise _overloaded(exc) from exc
        raise
    except UpstreamRefused as exc:
        info.upstream_status = exc.upstream_status
        info.outcome = Outcome.UPSTREAM_ERROR
        raise
    except UpstreamTimeout:
        info.outcome = Outcome.TIMEOUT
        raise
    except UpstreamUnavailable:
        info.outcome = Outcome.UPSTREAM_ERROR
        raise
    except BaseException:
        info.outcome = Outcome.CLIENT_DISCONNECT  # cancelled while waiting for Clipia
        raise
    finally:
        watch.cancel()


async def _relay(
    request: web.Request,
    info: RequestInfo,
    response: UpstreamResponse,
    content_type: str,
    drop_usage_chunk: bool,
    output_limit: int | None,
) -> web.StreamResponse:
    """Step 7 for a stream: relay it byte for byte; the record learns what the tap saw."""
    app = request.app
    config = app[LIVE].config
    quotas, request_id = app[QUOTAS], info.request_id
    lease = config.accounting.lease_seconds

    def renew() -> None:
        _ = app[TASKS].spawn(
            quotas.store.renew(request_id, quotas.now(), lease), name="lease-renew"
        )

    result = StreamResult(UsageTap())
    ledger = app[LEDGER]
    finished = False
    token = app[STREAMS].add(response, result)
    try:
        relayed, _ = await relay_stream(
            request,
            response,
            record=info,
            headers={
                **info.require_admission().headers,
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **info.id_headers(),
            },
            drop_usage_chunk=drop_usage_chunk,
            on_disconnect=config.accounting.on_disconnect,
            drain_timeout=config.accounting.drain_timeout_seconds,
            renew=renew,
            renew_every=lease / 3,
            result=result,
            output_limit=output_limit,
            on_upstream_id=lambda upstream_id: ledger.note_upstream_id(info, upstream_id),
            on_client_gone=lambda: ledger.release_slot(info),
            scan=app[KEY_SCAN].stream(),
        )
        finished = True
    finally:
        app[STREAMS].discard(token)
        if not finished:
            # Cancelled: the shutdown grace period ran out mid-stream.
            info.outcome = Outcome.TIMEOUT
        # Even when cancelled, settle with what the tap saw so far.
        tap = result.tap
        info.record_usage(tap.usage, UsageSource.STREAM)
        info.upstream_id = tap.upstream_id
        info.upstream_done = result.upstream_done_at
        outcome = info.outcome
        assert outcome is not None, "admission set it; the relay only changes it"
        app[METRICS].record_stream_end(info.team, outcome.value)
        if result.cut_for_secret:
            _withhold(app, "key_echo")
    if result.first_byte_at is not None:
        info.ttft = result.first_byte_at - info.started
    _remember_generation(app, info, tap.upstream_id)
    return relayed


async def _answer(
    request: web.Request, info: RequestInfo, response: UpstreamResponse, content_type: str
) -> web.Response:
    """Step 7 without a stream: Clipia's body as is, once it is known to be a chat completion."""
    app = request.app
    try:
        data = await read_body(response, _MAX_UPSTREAM_BODY)
    except BaseException:
        info.outcome = Outcome.UPSTREAM_ERROR
        raise
    if len(data) > _MAX_UPSTREAM_BODY:
        # Clipia answered more than any chat completion needs: not relayed, not parsed.
        info.outcome = Outcome.UPSTREAM_ERROR
        raise UpstreamUnavailable("The upstream AI gateway sent an oversized answer.")
    info.upstream_done = time.perf_counter()
    info.ttft = info.upstream_done - info.started
    is_sse = content_type.startswith("text/event-stream")
    summary = _summary(data, is_sse)
    if summary is not None:
        upstream_id, usage = summary
        info.record_usage(usage, UsageSource.RESPONSE)
        if upstream_id is not None:
            if usage is None or usage.cost is None:
                # Its cost will be asked of /v1/generation: durable now, in case of a crash.
                app[LEDGER].note_upstream_id(info, upstream_id)
            info.upstream_id = upstream_id
            _remember_generation(app, info, upstream_id)
    if summary is None or is_sse:
        _withhold(app, "invalid_response")
        info.outcome = Outcome.UPSTREAM_ERROR
        raise UpstreamInvalidResponse(
            "The upstream AI gateway answered 200 with a body that is not a chat completion "
            "(not JSON, or an event stream for a request without stream: true)."
        )
    if app[KEY_SCAN].mentions_key(data):
        _withhold(app, "key_echo")
        info.outcome = Outcome.UPSTREAM_ERROR
        raise UpstreamInvalidResponse(_WITHHELD_MESSAGE)
    return web.Response(
        body=data, status=200, content_type=_JSON, headers=info.require_admission().headers
    )


def _summary(data: bytes, is_sse: bool) -> tuple[str | None, Usage | None] | None:
    """Return a non-streamed answer's upstream id and usage (``None``: not a chat completion).

    SSE for a request that did not ask for a stream is not relayed; its usage (if the stream
    carried one) and upstream id still settle the request.
    """
    if not is_sse:
        return answer_summary(data)
    tap = UsageTap()
    tap.feed(data)
    tap.close()
    return tap.upstream_id, tap.usage


def _overloaded(exc: UpstreamBusy) -> Overloaded:
    """Shed with 503 ``overloaded`` (SDKs retry a 502 at once; a 503 after ``Retry-After``)."""
    return Overloaded(exc.message, retry_after=exc.retry_after or 1)


def _upstream_broke() -> UpstreamUnavailable:
    return UpstreamBroken("The upstream AI gateway broke off its answer.")


def _withhold(app: web.Application, reason: str) -> None:
    app[METRICS].record_withheld(reason)
    if reason == "key_echo":
        _LOGGER.warning("an upstream answer quoted the gateway's Clipia key; it was not relayed")


async def _pass_through_error(app: web.Application, response: UpstreamResponse) -> web.Response:
    """Relay an upstream error about the request: its status and a clean envelope.

    Only the envelope's four fields are kept; a non-JSON body, or one that mentions our key
    (whole, in part or escaped), is replaced by an envelope of our own with the same status.
    A relayed header that mentions it is dropped.
    """
    status = response.status
    raw = await read_body(response, _MAX_ERROR_BODY)
    type_, code = _CODE_BY_STATUS.get(status, ("api_error", "upstream_error"))
    body = error_body(f"The upstream AI gateway answered {status}.", type_=type_, code=code)
    scan = app[KEY_SCAN]
    if scan.mentions_key(raw):
        _withhold(app, "key_echo")
    else:
        try:
            decoded = decode_json(raw)
        except (msgspec.DecodeError, ValueError):
            decoded = None
        error = decoded.get("error") if isinstance(decoded, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            body = encode_json(
                {
                    "error": {
                        name: error.get(name) if isinstance(error.get(name), str) else None
                        for name in ("message", "type", "param", "code")
                    }
                }
            )
    headers: dict[str, str] = {}
    for name in _PASSED_THROUGH_ERROR_HEADERS:
        value = response.headers.get(name)
        if value is None:
            continue
        if scan.header_mentions_key(value):
            _withhold(app, "key_echo")
        else:
            headers[name] = value
    if response.gave_up:  # the gateway already retried this status (upstream.retry_on_status)
        headers[SHOULD_RETRY] = "false"
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _remember_generation(app: web.Application, info: RequestInfo, upstream_id: str | None) -> None:
    if upstream_id:
        app[GENERATIONS].remember(upstream_id, info.team, info.request_id)


def _visible_entries(policy: ModelPolicy, snapshot: CatalogSnapshot) -> list[dict[str, object]]:
    entries = snapshot.entries
    listed: list[dict[str, object]] = []
    for listed_id, canonical in policy.visible(entries, list(entries)):
        raw = entries[canonical].raw
        listed.append(raw if listed_id == canonical else {**raw, "id": listed_id})
    return listed


async def team_models(request: web.Request) -> list[dict[str, object]]:
    """Return the chat models (and aliases) the calling team may use, as catalog entries."""
    snapshot = await request.app[CATALOG].get()
    return _visible_entries(_policy(request), snapshot)


async def team_model(request: web.Request, model_id: str) -> dict[str, object]:
    """Return one model (or alias) the team may use; raise 404 otherwise (denied or unknown)."""
    for entry in await team_models(request):
        if entry["id"] == model_id:
            return entry
    raise ModelNotFound(f"The model {model_id[:80]!r} does not exist.", param="model")


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the chat models (and aliases) the team may use."""
    data = await team_models(request)
    return web.Response(body=encode_json({"object": "list", "data": data}), content_type=_JSON)


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: one model the team may use; 404 otherwise (denied or unknown)."""
    entry = await team_model(request, request.match_info["model_id"])
    return web.Response(body=encode_json(entry), content_type=_JSON)


def _remaining(budget: dict[str, Decimal | str | None]) -> Decimal:
    value = budget["remaining"]
    return value if isinstance(value, Decimal) else Decimal(0)


async def key_info(request: web.Request) -> web.Response:
    """``GET /v1/key``: the calling team's view (never the gateway's Clipia key)."""
    return web.Response(body=encode_json({"data": await key_data(request)}), content_type=_JSON)


async def key_data(request: web.Request) -> dict[str, object]:
    """Return the calling team's key, limits and budgets (``/v1/key``'s ``data``)."""
    principal = request[PRINCIPAL]
    policy = _policy(request)
    team = policy.team
    quotas = request.app[QUOTAS]
    limits = quotas.limits(team.id)
    key_id = principal.key_id
    try:
        budgets = await quotas.call(quotas.budgets(team.id))
        own = await quotas.call(quotas.budgets(team.id, key_id)) if key_id is not None else []
        spent_total = await quotas.call(quotas.spent_total(team.id))
    except (StoreUnavailable, TimeoutError) as exc:
        raise QuotaStoreUnavailable(
            "The quota store is unavailable; budgets cannot be read now.", retry_after=1
        ) from exc
    # The tightest period of the team's budgets and of this key's own.
    tightest = min([*budgets, *own], key=_remaining, default=None)
    key_limits = quotas.key_limits(team.id, key_id) if key_id is not None else None
    data: dict[str, object] = {
        "label": team.label or team.id,
        "team": team.id,
        "key_id": principal.key_id,
        "usage": spent_total,
        "limit": tightest["limit"] if tightest else None,
        "limit_remaining": tightest["remaining"] if tightest else None,
        "rate_limit": (
            {"requests": limits.rpm, "tokens": limits.tpm, "interval": "1m"}
            if limits.rpm is not None or limits.tpm is not None
            else None
        ),
        "concurrency": limits.concurrency,
        "budgets": budgets,
        "key": (
            {
                "budgets": own,
                "rate_limit": (
                    {"requests": key_limits.rpm, "tokens": key_limits.tpm, "interval": "1m"}
                    if key_limits is not None
                    and (key_limits.rpm is not None or key_limits.tpm is not None)
                    else None
                ),
                "concurrency": key_limits.concurrency if key_limits is not None else None,
            }
            if own or key_limits is not None
            else None
        ),
        "shadow": team.shadow,
        "models": {
            "allow": list(policy.allow),
            "deny": list(policy.deny),
            "aliases": dict(policy.aliases),
        },
        "caps": {
            "max_tokens": team.caps.max_tokens,
            "n": team.caps.n,
            "on_exceed": team.caps.on_exceed,
        },
    }
    return data


async def generation(request: web.Request) -> web.Response:
    """``GET /v1/generation?id=``: for an id this team created, else 404; counts in its RPM.

    Answered from the ledger when its record holds the upstream's own settled cost (no call
    to Clipia); otherwise proxied.
    """
    ids = request.query.getall("id", [])
    team = request[PRINCIPAL].team
    quotas = request.app[QUOTAS]
    await quotas.count_lookup(team)
    generations = request.app[GENERATIONS]
    owner = generations.get(ids[0]) if len(ids) == 1 else None
    if owner is None and len(ids) == 1 and len(ids[0]) <= 128:
        owner = await quotas.store.owner_of(ids[0])
    if len(ids) != 1 or owner != team:
        raise NotFound("No generation with that id was created by this team.", param="id")
    request_id = generations.request_id(ids[0])
    if request_id is not None:
        record = await quotas.store.record(request_id)
        if (
            record is not None
            and record.team == team
            and record.state is RecordState.SETTLED
            and record.usage_source in _UPSTREAM_SOURCES
        ):
            return web.Response(body=_generation_from_ledger(ids[0], record), content_type=_JSON)
    upstream = request.app[UPSTREAMS].for_team(team)  # test teams: the sandbox key
    try:
        response = await upstream.send(
            "GET", "/generation", request_id=request[INFO].request_id, query={"id": ids[0]}
        )
    except UpstreamBusy as exc:
        raise _overloaded(exc) from exc
    try:
        if response.status != 200:
            return await _pass_through_error(request.app, response)
        payload = await read_body(response, _MAX_ERROR_BODY)
        if len(payload) > _MAX_ERROR_BODY:
            raise UpstreamUnavailable("The upstream AI gateway sent an oversized answer.")
        if request.app[KEY_SCAN].mentions_key(payload):
            _withhold(request.app, "key_echo")
            raise UpstreamInvalidResponse(_WITHHELD_MESSAGE)
        return web.Response(body=payload, content_type=_JSON)
    finally:
        response.release()


_UPSTREAM_SOURCES: Final = frozenset(
    {UsageSource.RESPONSE.value, UsageSource.STREAM.value, UsageSource.GENERATION.value}
)
"""A ledger cost that is Clipia's own figure (not counted from tokens, not the reservation)."""


def _generation_from_ledger(upstream_id: str, record: LedgerRecord) -> bytes:
    """Return a ``/v1/generation`` answer built from a settled ledger record."""
    created = dt.datetime.fromtimestamp(record.created_at, dt.UTC)
    return encode_json(
        {
            "data": {
                "id": upstream_id,
                "model": record.model,
                "streamed": record.stream,
                "total_cost": credits(record.cost),
                "tokens_prompt": record.prompt_tokens,
                "tokens_completion": record.completion_tokens,
                "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
    )

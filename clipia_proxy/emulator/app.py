"""The emulated Clipia as a real aiohttp application: routes, auth, limits, faults, recording.

Routes (``/v1/*`` as Clipia serves them, ``/_emulator/*`` to control a separate process):

- ``GET /v1/models``, ``GET /v1/models/{id}``: the catalog, no key needed.
- ``POST /v1/chat/completions``: stream or not, tools, JSON output; billed once generating.
- ``GET /v1/generation?id=…``, ``GET /v1/key``: what a generation cost, what a key used.
- ``POST /_emulator/faults``, ``GET /_emulator/requests``, ``GET /_emulator/bills``,
  ``POST /_emulator/reset``: script faults and read records (no auth, not recorded).
- anything else: 404 in Clipia's envelope.

A chat request goes: fault taken → ``first_byte_delay`` → redirect/status fault → auth →
validation → RPM → credit limit → bill → ``state.hold`` → response (stream faults here).
Every ``/v1`` request is recorded; every response carries ``Set-Cookie: clipia_session=…`` and,
once a key authenticated, ``RateLimit-*`` headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, TypeGuard

import msgspec
from aiohttp import web

from clipia_proxy.emulator.catalog import (
    CATALOG,
    ChatPrice,
    catalog_entry,
    chat_price,
    cost_credits,
)
from clipia_proxy.emulator.faults import Fault, error_body
from clipia_proxy.emulator.responses import (
    StreamPlan,
    completion_body,
    stream_plan,
    usage_object,
)
from clipia_proxy.emulator.state import Bill, EmulatorState, RecordedRequest
from clipia_proxy.emulator.text import GeneratedChoice, generate_choices, prompt_tokens
from clipia_proxy.wire import decode_json, encode_json

__all__ = ["STATE_KEY", "create_emulator_app", "run_emulator"]

STATE_KEY: Final = web.AppKey("clipia_emulator_state", EmulatorState)
"""Set by :func:`create_emulator_app`; the state every handler reads and writes."""

_RECORD_KEY: Final = web.RequestKey("clipia_emulator_record", RecordedRequest)
"""Set by ``_record`` for each ``/v1`` request; handlers fill in its response fields."""

_NO_FAULT: Final = Fault()
_MAX_BODY: Final = 32 * 1024 * 1024
_POLL_SECONDS: Final = 0.02
"""How often a stall checks whether the client left (so tests never wait for it)."""
_MAX_CHOICES: Final = 16

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(
    status: int, message: str | None = None, *, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message),
        content_type="application/json",
        headers=headers,
    )


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode_json(obj), content_type="application/json")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _presented_key(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in {"bearer", "key"} and value.strip():
            return value.strip()
    api_key = request.headers.get("X-Api-Key")
    return api_key.strip() if api_key is not None and api_key.strip() else None


def _authenticate(request: web.Request) -> str | None:
    """Return the accepted key of ``request`` and record it, or ``None``."""
    key = _presented_key(request)
    if key is None or not request.app[STATE_KEY].is_accepted_key(key):
        return None
    record = request.get(_RECORD_KEY)
    if record is not None:
        record.key = key
    return key


def _decode(body: bytes) -> object | None:
    if not body:
        return None
    try:
        return decode_json(body)
    except (msgspec.DecodeError, ValueError):
        return None


@web.middleware
async def _record(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Record every non-control request before its handler runs."""
    if request.path.startswith("/_emulator/"):
        return await handler(request)
    body = await request.read()
    record = RecordedRequest(
        method=request.method,
        path=request.path,
        query_string=request.query_string,
        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
        body=body,
        json=_decode(body),
        request_id=request.headers.get("X-Request-Id"),
    )
    request.app[STATE_KEY].requests.append(record)
    request[_RECORD_KEY] = record
    return await handler(request)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Add Clipia's extra headers and note the status (and a non-stream body) in the record."""
    session = hashlib.sha256(f"{id(request)}:{request.path}".encode()).hexdigest()[:24]
    response.headers.add("Set-Cookie", f"clipia_session={session}; Path=/; HttpOnly; Secure")
    record = request.get(_RECORD_KEY)
    if record is None:
        return
    record.status = response.status
    if record.key is not None and "RateLimit-Limit" not in response.headers:
        rate = request.app[STATE_KEY].peek_rate(record.key)
        response.headers["RateLimit-Limit"] = str(rate.limit)
        response.headers["RateLimit-Remaining"] = str(rate.remaining)
        response.headers["RateLimit-Reset"] = str(rate.reset_seconds)
    if not record.stream and isinstance(response, web.Response):
        body = response.body
        if isinstance(body, bytes | bytearray):
            record.sent.extend(body)
        record.completed = True


async def _models(request: web.Request) -> web.StreamResponse:
    return _json({"object": "list", "data": list(CATALOG)})


async def _model(request: web.Request) -> web.StreamResponse:
    model_id = request.match_info["model_id"]
    entry = catalog_entry(model_id)
    if entry is None:
        return _error(404, f"Model '{model_id}' not found.")
    return _json(entry)


async def _not_found(request: web.Request) -> web.StreamResponse:
    return _error(404, f"No route for {request.method} {request.path}.")


def _quoted_key(request: web.Request, fault: Fault) -> str | None:
    """The received key in the form ``fault.quote_key`` names (JSON-string safe), or None."""
    key = _presented_key(request)
    if fault.quote_key is None or key is None:
        return None
    if fault.quote_key == "json_escaped":
        return key.replace("_", "\\u005f")
    if fault.quote_key == "partial":
        prefix, _, secret = key.rpartition("_")
        return f"{prefix}_{secret[:10]}..."
    if fault.quote_key == "percent":
        return urllib.parse.quote(key, safe="")
    return key


def _quote_into(data: bytes, quoted: str) -> bytes:
    """Put ``quoted`` at the start of the first ``content`` string of ``data``."""
    marker = b'"content":"'
    return data.replace(marker, marker + quoted.encode() + b" ", 1)


def _fault_response(request: web.Request, fault: Fault) -> web.StreamResponse | None:
    if fault.redirect_to is not None:
        return web.Response(status=307, headers={"Location": fault.redirect_to})
    status = fault.status
    if status is None and fault.non_json_body:
        status = 502
    if status is None and fault.body_quotes_key:
        status = 500
    quoted = _quoted_key(request, fault) if fault.quote_key_in == "error_body" else None
    if status is None and quoted is not None:
        status = 500
    retry_after = fault.retry_after
    if fault.quote_key is not None and fault.quote_key_in == "retry_after":
        status = status or 429
        retry_after = f"1; key={_quoted_key(request, fault)}"
    if status is None:
        return None
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    if quoted is not None:
        # Written into the JSON by hand: a json_escaped quote must reach the wire as escapes.
        body = b'{"error":{"message":"Request failed for key ' + quoted.encode()
        body += b'.","type":"api_error","param":null,"code":"internal_error"}}'
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )
    if fault.non_json_body:
        page = f"<html><body><h1>{status} Error</h1><p>upstream trouble</p></body></html>"
        return web.Response(status=status, text=page, content_type="text/html", headers=headers)
    message = None
    if fault.body_quotes_key:
        message = (
            f"Request failed for key {_presented_key(request)!s} "
            f"(Authorization: {request.headers.get('Authorization', '')})."
        )
    return _error(status, message, headers=headers)


def _validated(body: object) -> tuple[dict[str, object], str, ChatPrice] | web.Response:
    """Return the body, its model and the model's prices, or the 400/404 answer."""
    if not isinstance(body, dict):
        return _error(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error(400, "'model' is required and must be a string.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty array.")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return _error(400, "Each message must be an object with a 'role'.")
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= _MAX_CHOICES):
        return _error(400, f"'n' must be an integer from 1 to {_MAX_CHOICES}.")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and (not _is_int(value) or value < 1):
            return _error(400, f"'{field}' must be a positive integer.")
    if "stream" in body and not isinstance(body["stream"], bool):
        return _error(400, "'stream' must be a boolean.")
    price = chat_price(model)
    if price is None:
        return _error(404, f"Model '{model}' not found.")
    return body, model, price


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    record = request[_RECORD_KEY]
    fault = state.take_fault() or _NO_FAULT
    if fault.first_byte_delay > 0:
        await state.sleep(fault.first_byte_delay)
    admitted = _admit(request, record, fault)
    if isinstance(admitted, web.StreamResponse):
        return admitted
    key, body, model, price = admitted
    choices = generate_choices(
        state.seed,
        body,
        length=fault.completion_tokens,
        honour_limit=not fault.ignore_max_tokens,
    )
    messages = body["messages"]
    prompt = prompt_tokens(messages if isinstance(messages, list) else [], body.get("tools"))
    completion = sum(c.completion_tokens for c in choices)
    is_stream = body.get("stream") is True
    bill = Bill(
        id=state.next_generation_id(),
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=cost_credits(price, prompt, completion),
        streamed=is_stream,
        request_id=record.request_id,
        key=key,
        finish_reason=choices[0].finish_reason,
        created=int(state.now()),
    )
    state.add_bill(bill, lag=fault.generation_lag)
    record.generation_id = bill.id
    record.stream = is_stream
    if state.hold is not None:
        await state.hold.wait()

    reported = Decimal(fault.reported_cost) if fault.reported_cost is not None else bill.cost
    usage = usage_object(prompt, completion, reported, with_cost=not fault.usage_without_cost)
    quoted = _quoted_key(request, fault) if fault.quote_key_in in {"answer", "stream"} else None
    if fault.invalid_answer == "not_json":
        record.stream = False
        return web.Response(
            body=b"<html><body>not a chat completion</body></html>",
            content_type="application/json",
        )
    if not is_stream and fault.invalid_answer != "sse":
        answer = completion_body(
            generation_id=bill.id,
            created=bill.created,
            model=model,
            choices=choices,
            usage=None if fault.no_usage else usage,
        )
        if quoted is not None:
            answer = _quote_into(answer, quoted)
        return web.Response(body=answer, content_type="application/json")
    record.stream = True
    plan = _stream_plan(body, bill, choices, usage, fault, is_stream=is_stream)
    events = plan.events
    if quoted is not None:
        for index, event in enumerate(events):
            if b'"content":"' in event:
                events = (*events[:index], _quote_into(event, quoted), *events[index + 1 :])
                break
    return await _send_stream(request, record, events, plan.finish_end, fault)


def _admit(
    request: web.Request, record: RecordedRequest, fault: Fault
) -> web.StreamResponse | tuple[str, dict[str, object], str, ChatPrice]:
    """A scripted answer, or Clipia's refusals in its order (401, 400/404, 429, 402).

    Return the key, the validated body, the model and its price when the request is served.
    """
    scripted = _fault_response(request, fault)
    if scripted is not None:
        return scripted
    key = _authenticate(request)
    if key is None:
        return _error(401)
    validated = _validated(record.json)
    if isinstance(validated, web.Response):
        return validated
    state = request.app[STATE_KEY]
    rate = state.admit(key)
    if not rate.allowed:
        return _error(429, headers={"Retry-After": str(rate.reset_seconds)})
    if state.is_exhausted(key):
        return _error(402, "The key's credit limit is exhausted.")
    return (key, *validated)


def _stream_plan(
    body: dict[str, object],
    bill: Bill,
    choices: list[GeneratedChoice],
    usage: dict[str, object],
    fault: Fault,
    *,
    is_stream: bool,
) -> StreamPlan:
    """The events of a streamed answer, with the usage event when it was asked (or forced)."""
    options = body.get("stream_options")
    include_usage = (
        isinstance(options, dict) and options.get("include_usage") is True
    ) or not is_stream
    send_usage = (include_usage or fault.usage_unasked) and not fault.no_usage
    return stream_plan(
        generation_id=bill.id,
        created=bill.created,
        model=bill.model,
        choices=choices,
        usage=usage if send_usage else None,
        include_usage=include_usage,
        fault=fault,
    )


def _is_connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _stall(request: web.Request, seconds: float) -> None:
    """Wait ``seconds`` with the socket open, or less if the client leaves first."""
    # aiohttp offers a handler no "client left" event, so poll the transport.
    steps = max(1, math.ceil(seconds / _POLL_SECONDS))
    for _ in range(steps):
        if not _is_connected(request):
            return
        await asyncio.sleep(seconds / steps)


async def _send_stream(
    request: web.Request,
    record: RecordedRequest,
    events: tuple[bytes, ...],
    finish_end: int,
    fault: Fault,
) -> web.StreamResponse:
    """Write ``events`` as the fault says; break the connection where it says to."""
    stop, action = _stream_end(len(events), finish_end, fault)
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    writes = _writes(request, events[:stop], fault)
    try:
        for number, data in enumerate(writes):
            if number > 0 and fault.chunk_gap > 0:
                await request.app[STATE_KEY].sleep(fault.chunk_gap)
            parts = [data[i : i + 1] for i in range(len(data))] if fault.tiny_writes else [data]
            for part in parts:
                await response.write(part)
                record.sent.extend(part)
        if action == "stall":
            await _stall(request, fault.stall_seconds)
            _abort(request)
        elif action == "abort":
            _abort(request)
        else:
            await response.write_eof()
            record.completed = True
    except ConnectionError:
        # The client left mid-stream; the bill stands, as Clipia's would.
        pass
    return response


def _stream_end(count: int, finish_end: int, fault: Fault) -> tuple[int, str]:
    """Return how many events are sent and how the stream then ends (end, abort, stall)."""
    stop = count
    action = "end"
    for limit, kind in (
        (fault.reset_after_chunks, "abort"),
        (fault.stall_after_chunks, "stall"),
        (finish_end if fault.close_before_usage else None, "abort"),
    ):
        if limit is not None and limit < stop:
            stop, action = max(0, limit), kind
    return stop, action


def _writes(request: web.Request, events: tuple[bytes, ...], fault: Fault) -> list[bytes]:
    """Group the events into writes (``events_per_write``), or cut them inside a quoted key."""
    group = max(1, fault.events_per_write)
    writes = [b"".join(events[i : i + group]) for i in range(0, len(events), group)]
    quoted = _quoted_key(request, fault) if fault.split_key_at else None
    if quoted is None:
        return writes
    body = b"".join(writes)
    at = body.find(quoted.encode())
    cuts = sorted({at + k for k in fault.split_key_at if at >= 0 and 0 < at + k < len(body)})
    return [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]


async def _generation(request: web.Request) -> web.StreamResponse:
    key = _authenticate(request)
    if key is None:
        return _error(401)
    generation_id = request.query.get("id")
    if not generation_id:
        return _error(400, "'id' is required.")
    bill = request.app[STATE_KEY].lookup_generation(generation_id, key)
    if bill is None:
        return _error(404, f"Generation '{generation_id}' not found.")
    created_at = datetime.fromtimestamp(bill.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _json(
        {
            "data": {
                "id": bill.id,
                "model": bill.model,
                "provider_name": "Clipia",
                "streamed": bill.streamed,
                "total_cost": bill.cost,
                "tokens_prompt": bill.prompt_tokens,
                "tokens_completion": bill.completion_tokens,
                "finish_reason": bill.finish_reason,
                "created_at": created_at,
            }
        }
    )


async def _key(request: web.Request) -> web.StreamResponse:
    key = _authenticate(request)
    if key is None:
        return _error(401)
    state = request.app[STATE_KEY]
    usage = state.usage(key)
    limit = state.key_limits.get(key)
    return _json(
        {
            "data": {
                "label": "sandbox key" if key.startswith("clipia_test_") else "live key",
                "usage": usage,
                "limit": limit,
                "limit_remaining": None if limit is None else max(limit - usage, 0),
                "rate_limit": {"requests": state.rpm, "interval": "1m"},
            }
        }
    )


def _record_json(record: RecordedRequest) -> dict[str, object]:
    return {
        "method": record.method,
        "path": record.path,
        "query_string": record.query_string,
        "headers": [list(pair) for pair in record.headers],
        "body": record.body.decode("utf-8", "replace"),
        "json": record.json,
        "request_id": record.request_id,
        "key": record.key,
        "status": record.status,
        "generation_id": record.generation_id,
        "stream": record.stream,
        "sent": bytes(record.sent).decode("utf-8", "replace"),
        "completed": record.completed,
    }


def _bill_json(bill: Bill) -> dict[str, object]:
    return {
        "id": bill.id,
        "model": bill.model,
        "prompt_tokens": bill.prompt_tokens,
        "completion_tokens": bill.completion_tokens,
        "cost": bill.cost,
        "streamed": bill.streamed,
        "request_id": bill.request_id,
        "key": bill.key,
        "charged": bill.charged,
        "finish_reason": bill.finish_reason,
        "created": bill.created,
    }


_FAULTS_DECODER: Final = msgspec.json.Decoder(Fault | list[Fault])


async def _control_faults(request: web.Request) -> web.StreamResponse:
    try:
        decoded = _FAULTS_DECODER.decode(await request.read())
    except msgspec.DecodeError as exc:
        return _error(400, f"Invalid fault: {exc}")
    faults = decoded if isinstance(decoded, list) else [decoded]
    state = request.app[STATE_KEY]
    state.push_fault(*faults)
    return _json({"queued": len(faults), "pending": state.pending_faults})


async def _control_requests(request: web.Request) -> web.StreamResponse:
    return _json([_record_json(r) for r in request.app[STATE_KEY].requests])


async def _control_bills(request: web.Request) -> web.StreamResponse:
    return _json({bid: _bill_json(b) for bid, b in request.app[STATE_KEY].bills.items()})


async def _control_reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE_KEY].reset()
    return _json({"reset": True})


def create_emulator_app(state: EmulatorState | None = None) -> web.Application:
    """Return the emulator as an aiohttp application serving ``state`` (a fresh one if omitted)."""
    app = web.Application(middlewares=[_record], client_max_size=_MAX_BODY)
    app[STATE_KEY] = state if state is not None else EmulatorState()
    app.on_response_prepare.append(_on_prepare)
    router = app.router
    router.add_get("/v1/models", _models)
    router.add_get("/v1/models/{model_id}", _model)
    router.add_post("/v1/chat/completions", _chat)
    router.add_get("/v1/generation", _generation)
    router.add_get("/v1/key", _key)
    router.add_post("/_emulator/faults", _control_faults)
    router.add_get("/_emulator/requests", _control_requests)
    router.add_get("/_emulator/bills", _control_bills)
    router.add_post("/_emulator/reset", _control_reset)
    # Last, so every other method or path gets Clipia's 404 envelope rather than aiohttp's page.
    router.add_route("*", "/{tail:.*}", _not_found)
    return app


async def run_emulator(
    host: str = "127.0.0.1",
    port: int = 8090,
    seed: int = 0,
    *,
    state: EmulatorState | None = None,
) -> None:
    """Serve the emulator on ``host:port`` until cancelled.

    ``state`` (optional) replaces the default ``EmulatorState(seed=seed)``, e.g. for a higher
    ``rpm`` in benchmarks.
    """
    app = create_emulator_app(state if state is not None else EmulatorState(seed=seed))
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

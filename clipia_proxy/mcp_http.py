"""``/mcp``: Clipia's MCP chat tool, as MCP Streamable HTTP (stateless, JSON answers).

A small JSON-RPC 2.0 server on aiohttp that speaks the MCP 2025-06-18 / 2025-11-25 Streamable
HTTP transport as far as a stateless tool server needs it:

- ``POST /mcp`` carries exactly one JSON-RPC message (batches were removed in 2025-06-18).
  A request gets its response as ``application/json``, or as one ``text/event-stream`` event
  when the client's ``Accept`` does not take JSON; a notification or a response gets ``202``
  with no body. No session id is ever issued.
- ``GET`` and ``DELETE /mcp`` answer ``405`` (no server-sent stream, no session to end).
- Refused before any tool runs, and never sent upstream: an ``Accept`` that takes neither
  JSON nor SSE (406), an unknown ``MCP-Protocol-Version`` (400), a body that is not JSON (400,
  ``-32700``), not one JSON-RPC message (400, ``-32600``), not ``application/json`` (415) or too
  large (413).

A browser page may not call ``/mcp`` unless its ``Origin`` is listed in
``mcp.allowed_origins`` (the transport's DNS-rebinding protection: :func:`check_origin`, run by
the gateway middleware before identity, so a refused page learns nothing and nothing is sent
upstream); a request without ``Origin`` (agents, SDKs, curl) is not affected.

Identity is the data port's: the gateway middleware has already authenticated the team key
(the same three header schemes) before this handler runs. The tools are the team's view:

- ``chat``: ``prompt`` or ``messages`` and a ``model`` → the reply text, token usage and credit
  cost. It runs :func:`handlers.complete_chat`, the very function behind
  ``/v1/chat/completions``: the same policy, caps, budgets, limits, ledger and metrics.
- ``list_models`` / ``get_model``: ``/v1/models`` and ``/v1/models/{id}`` (aliases included).
- ``get_balance``: ``/v1/key``'s data (budgets, limits, spend).

A refusal is a tool result with ``isError: true`` whose ``structuredContent`` is the REST error
envelope (same ``code``, ``type``, ``message``), never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Final

import msgspec
from aiohttp import web

from . import handlers
from .errors import InvalidRequest, OriginNotAllowed, ProxyError, UpstreamUnavailable
from .keys import LIVE, METRICS, PRINCIPAL
from .version import __version__
from .wire import decode_json, encode_json, parse_chat_request

__all__ = ["PATH", "PROTOCOL_VERSIONS", "TOOLS", "add_routes", "check_origin"]

_LOGGER: Final = logging.getLogger(__name__)

PATH: Final = "/mcp"
PROTOCOL_VERSIONS: Final = ("2025-11-25", "2025-06-18")
"""Protocol revisions this server negotiates, newest first."""
_ACCEPTED_HEADER_VERSIONS: Final = frozenset({*PROTOCOL_VERSIONS, "2025-03-26"})
"""``MCP-Protocol-Version`` values accepted on a request (2025-03-26 is what a client without
the header is assumed to speak, so it is accepted when sent explicitly too)."""

_JSON: Final = "application/json"
_SSE: Final = "text/event-stream"
_ALLOW: Final = {"Allow": "POST"}

# JSON-RPC 2.0 error codes.
_PARSE_ERROR: Final = -32700
_INVALID_REQUEST: Final = -32600
_METHOD_NOT_FOUND: Final = -32601
_INVALID_PARAMS: Final = -32602
_SERVER_ERROR: Final = -32000
"""Transport-level refusals that are not JSON-RPC's own (HTTP status tells which)."""

_CHAT_FIELDS: Final = frozenset(
    {"model", "prompt", "system", "messages", "max_tokens", "temperature", "top_p", "stop", "seed"}
)

TOOLS: Final[list[dict[str, object]]] = [
    {
        "name": "chat",
        "title": "Chat",
        "description": (
            "Send a prompt (or a messages array) to a chat model through the company's Clipia "
            "gateway; returns the reply text, token usage and credit cost. Team policy, caps, "
            "budgets and rate limits apply."
        ),
        "inputSchema": {
            "type": "object",
            "properties": {
                "model": {"type": "string", "description": "A model id or alias (list_models)."},
                "prompt": {"type": "string", "description": "The user message (or messages)."},
                "system": {"type": "string", "description": "A system message for the prompt."},
                "messages": {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "OpenAI chat messages (instead of prompt).",
                },
                "max_tokens": {"type": "integer", "minimum": 1},
                "temperature": {"type": "number"},
                "top_p": {"type": "number"},
                "stop": {"type": ["string", "array"], "items": {"type": "string"}},
                "seed": {"type": "integer"},
            },
            "required": ["model"],
            "additionalProperties": False,
        },
    },
    {
        "name": "list_models",
        "title": "List models",
        "description": "The chat models (and aliases) this team may use, with prices.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    },
    {
        "name": "get_model",
        "title": "Get model",
        "description": "One chat model (or alias) this team may use.",
        "inputSchema": {
            "type": "object",
            "properties": {"model": {"type": "string", "description": "A model id or alias."}},
            "required": ["model"],
            "additionalProperties": False,
        },
    },
    {
        "name": "get_balance",
        "title": "Get balance",
        "description": "This team's budgets (limit, spent, remaining, reset), limits and usage.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    },
]
_TOOL_NAMES: Final = frozenset(str(tool["name"]) for tool in TOOLS)
_INSTRUCTIONS: Final = (
    "Clipia chat models through the company gateway. Call list_models to see what this team "
    "may use, chat to ask a model, get_balance for the team's remaining budget."
)

_Tool = Callable[[web.Request, dict[str, object]], Awaitable[dict[str, object]]]


class _RpcError(Exception):
    """A JSON-RPC error answered instead of a result (``status`` is the HTTP status)."""

    def __init__(self, code: int, message: str, *, status: int = 200) -> None:
        super().__init__(message)
        self.code: Final = code
        self.message: Final = message
        self.status: Final = status


def check_origin(origins: list[str], allowed: tuple[str, ...]) -> None:
    """Refuse (403) a ``/mcp`` request whose ``Origin`` headers are not one allowed origin.

    ``allowed`` is ``mcp.allowed_origins``: exact origins, or ``scheme://host:*`` for any port
    (as the official SDK's transport security settings). Host names compare case-insensitively.
    """
    origin = origins[0].strip().lower() if len(origins) == 1 else ""
    if origin and origin in allowed:
        return
    for entry in allowed:
        if entry.endswith(":*") and origin.startswith(entry[:-1]):
            port = origin[len(entry) - 1 :]
            if port.isdigit() and len(port) <= 5:
                return
    shown = (
        f"The origin {origins[0][:100]!r}"
        if len(origins) == 1
        else "A request with several origins"
    )
    raise OriginNotAllowed(
        f"{shown} may not call {PATH}: a browser page's origin must be listed in "
        "mcp.allowed_origins (protection against DNS rebinding)."
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Install ``/mcp`` on the data port's router."""
    router.add_post(PATH, handle_post, expect_handler=handlers.defer_expectation)
    router.add_get(PATH, _method_not_allowed, allow_head=False)
    router.add_delete(PATH, _method_not_allowed)


async def _method_not_allowed(request: web.Request) -> web.Response:
    """``GET``/``DELETE /mcp``: no server-sent stream and no session, so 405 (as the spec says)."""
    return _rpc_error_response(
        None,
        _SERVER_ERROR,
        f"The method {request.method[:16]} is not allowed on {PATH}: this server is stateless "
        "and offers no event stream; POST JSON-RPC messages.",
        status=405,
        headers=_ALLOW,
    )


def _media_types(accept: str) -> set[str]:
    """The media ranges an ``Accept`` header lists (parameters dropped; ``q=0`` ones left out)."""
    found: set[str] = set()
    for part in accept.split(","):
        media, *params = part.split(";")
        refused = any(
            name.strip().lower() == "q" and value.strip() in {"0", "0.0", "0.00", "0.000"}
            for name, _, value in (param.partition("=") for param in params)
        )
        if not refused and media.strip():
            found.add(media.strip().lower())
    return found


def _answer_format(request: web.Request) -> str:
    """``application/json`` or ``text/event-stream`` per ``Accept``; raise 406 if neither."""
    accepted = _media_types(",".join(request.headers.getall("Accept", [])))
    if accepted & {_JSON, "application/*", "*/*"}:
        return _JSON
    if accepted & {_SSE, "text/*"}:
        return _SSE
    raise _RpcError(
        _SERVER_ERROR,
        "Not Acceptable: the Accept header must list application/json and text/event-stream.",
        status=406,
    )


def _check_protocol_version(request: web.Request) -> None:
    versions = request.headers.getall("MCP-Protocol-Version", [])
    if len(versions) > 1 or (versions and versions[0].strip() not in _ACCEPTED_HEADER_VERSIONS):
        shown = versions[0][:40] if len(versions) == 1 else "several values"
        raise _RpcError(
            _SERVER_ERROR,
            f"Bad Request: unsupported MCP-Protocol-Version {shown!r}; supported: "
            f"{', '.join(PROTOCOL_VERSIONS)}.",
            status=400,
        )


async def handle_post(request: web.Request) -> web.StreamResponse:
    """``POST /mcp``: one JSON-RPC message in, its answer (or 202) out."""
    answer_as = _JSON
    try:
        answer_as = _answer_format(request)
        _check_protocol_version(request)
        message = await _read_message(request)
    except _RpcError as exc:
        return _rpc_error_response(None, exc.code, exc.message, status=exc.status)
    has_id = "id" in message
    raw_id = message.get("id")
    if has_id and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        return _rpc_error_response(
            None,
            _INVALID_REQUEST,
            "Invalid Request: 'id' must be a string or an integer.",
            status=400,
        )
    request_id = raw_id if isinstance(raw_id, str | int) else None  # None: a notification
    method = message.get("method")
    if not isinstance(method, str):
        if (
            method is None
            and request_id is not None
            and ("result" in message or "error" in message)
        ):
            return web.Response(status=202)  # a response to a request we never send: ignored
        return _rpc_error_response(
            request_id,
            _INVALID_REQUEST,
            "Invalid Request: no 'method'."
            if method is None
            else "Invalid Request: 'method' must be a string.",
            status=400,
        )
    if request_id is None:
        return web.Response(status=202)  # a notification (initialized, cancelled, ...)
    params = message.get("params", {})
    try:
        result = await _dispatch(request, method, params)
    except _RpcError as exc:
        return _rpc_error_response(request_id, exc.code, exc.message, status=exc.status)
    body = encode_json({"jsonrpc": "2.0", "id": request_id, "result": result})
    if answer_as == _SSE:
        return web.Response(
            body=b"event: message\ndata: " + body + b"\n\n",
            content_type=_SSE,
            headers={"Cache-Control": "no-cache"},
        )
    return web.Response(body=body, content_type=_JSON)


async def _read_message(request: web.Request) -> dict[str, object]:
    """Return the body's one JSON-RPC 2.0 message; raise :class:`_RpcError` for anything else."""
    try:
        raw = await handlers.read_json_body(request, request.app[LIVE].config.server.max_body_bytes)
    except ProxyError as exc:
        raise _RpcError(_SERVER_ERROR, exc.message, status=exc.status) from exc
    try:
        message = decode_json(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise _RpcError(_PARSE_ERROR, f"Parse error: {exc}", status=400) from exc
    if isinstance(message, list):
        raise _RpcError(
            _INVALID_REQUEST,
            "Invalid Request: one JSON-RPC message per POST (batches are not supported).",
            status=400,
        )
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise _RpcError(
            _INVALID_REQUEST, "Invalid Request: not a JSON-RPC 2.0 message.", status=400
        )
    return message


async def _dispatch(request: web.Request, method: str, params: object) -> dict[str, object]:
    if not isinstance(params, dict):
        raise _RpcError(_INVALID_PARAMS, "Invalid params: 'params' must be an object.")
    if method == "initialize":
        return _initialize(params)
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call":
        return await _call_tool(request, params)
    raise _RpcError(_METHOD_NOT_FOUND, f"Method not found: {method[:64]!r}.")


def _initialize(params: dict[str, object]) -> dict[str, object]:
    asked = params.get("protocolVersion")
    if not isinstance(asked, str):
        raise _RpcError(_INVALID_PARAMS, "Invalid params: 'protocolVersion' must be a string.")
    version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
    return {
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "clipia-proxy", "title": "Clipia gateway", "version": __version__},
        "instructions": _INSTRUCTIONS,
    }


async def _call_tool(request: web.Request, params: dict[str, object]) -> dict[str, object]:
    name = params.get("name")
    arguments = params.get("arguments", {})
    if not isinstance(name, str) or name not in _TOOL_NAMES:
        shown = repr(name[:64]) if isinstance(name, str) else "(none)"
        raise _RpcError(_INVALID_PARAMS, f"Unknown tool: {shown}.")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _RpcError(_INVALID_PARAMS, "Invalid params: 'arguments' must be an object.")
    tool = _TOOL_FUNCTIONS[name]
    try:
        return await tool(request, arguments)
    except ProxyError as exc:
        if exc.reason is not None:
            request.app[METRICS].record_rejection(request[PRINCIPAL].team, exc.reason)
        _LOGGER.info("mcp tool %s refused: %s", name, exc.code)
        return _tool_error(
            exc.message, type_=exc.type, code=exc.code, param=exc.param, retry_after=exc.retry_after
        )


def _tool_error(
    message: str,
    *,
    type_: str,
    code: str,
    param: str | None = None,
    retry_after: int | None = None,
) -> dict[str, object]:
    """A tool result with ``isError``: the REST envelope as structured content, and as text."""
    error: dict[str, object] = {"message": message, "type": type_, "param": param, "code": code}
    if retry_after is not None:
        error["retry_after"] = max(0, retry_after)
    return {
        "content": [{"type": "text", "text": f"{code}: {message}"}],
        "structuredContent": {"error": error},
        "isError": True,
    }


def _tool_result(data: dict[str, object], text: str | None = None) -> dict[str, object]:
    return {
        "content": [{"type": "text", "text": encode_json(data).decode() if text is None else text}],
        "structuredContent": data,
        "isError": False,
    }


def _only(arguments: dict[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(set(arguments) - allowed)
    if unknown:
        raise InvalidRequest(
            f"Unknown argument {unknown[0][:64]!r}; accepted: {', '.join(sorted(allowed))}.",
            param=unknown[0][:64],
        )


def _string(arguments: dict[str, object], name: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name)
    return value


def _chat_body(arguments: dict[str, object]) -> dict[str, object]:
    """The ``/v1/chat/completions`` body a ``chat`` call stands for (never streamed)."""
    _only(arguments, _CHAT_FIELDS)
    model = _string(arguments, "model")
    prompt, messages = arguments.get("prompt"), arguments.get("messages")
    if (prompt is None) == (messages is None):
        raise InvalidRequest("Send either 'prompt' or 'messages' (exactly one).", param="prompt")
    if prompt is not None:
        text = _string(arguments, "prompt")
        messages = [{"role": "user", "content": text}]
        system = arguments.get("system")
        if system is not None:
            messages.insert(0, {"role": "system", "content": _string(arguments, "system")})
    elif "system" in arguments:
        raise InvalidRequest("'system' goes with 'prompt'; put it in 'messages'.", param="system")
    body: dict[str, object] = {"model": model, "messages": messages}
    for name in ("max_tokens", "temperature", "top_p", "stop", "seed"):
        if arguments.get(name) is not None:
            body[name] = arguments[name]
    return body


async def _chat(request: web.Request, arguments: dict[str, object]) -> dict[str, object]:
    # The same strict parser as the REST route, on the body this call stands for.
    chat = parse_chat_request(encode_json(_chat_body(arguments)))
    response = await handlers.complete_chat(request, chat)
    assert isinstance(response, web.Response)  # never streamed: the whole body is held
    raw = response.body
    data = raw if isinstance(raw, bytes) else b""
    try:
        decoded = decode_json(data)
    except (msgspec.DecodeError, ValueError):
        decoded = None
    if response.status != 200:
        error = decoded.get("error") if isinstance(decoded, dict) else None
        if not isinstance(error, dict):
            error = {}
        return _tool_error(
            str(error.get("message") or f"The upstream AI gateway answered {response.status}."),
            type_=str(error.get("type") or "api_error"),
            code=str(error.get("code") or "upstream_error"),
            param=error.get("param") if isinstance(error.get("param"), str) else None,
            retry_after=_retry_after(response),
        )
    if not isinstance(decoded, dict):
        raise UpstreamUnavailable("The upstream AI gateway sent an answer that is not JSON.")
    return _tool_result(*_chat_summary(decoded))


def _retry_after(response: web.Response) -> int | None:
    value = response.headers.get("Retry-After", "")
    return int(value) if value.isdigit() else None


def _chat_summary(answer: dict[str, object]) -> tuple[dict[str, object], str]:
    """The ``chat`` tool's structured result and its text, from a chat completion."""
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    reply = content if isinstance(content, str) else ""
    usage = answer.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    cost = usage.get("cost")
    tokens = {
        name: value
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(value := usage.get(name), int) and not isinstance(value, bool)
    }
    data: dict[str, object] = {
        "reply": reply,
        "model": answer.get("model"),
        "id": answer.get("id"),
        "finish_reason": first.get("finish_reason") if isinstance(first, dict) else None,
        "usage": tokens,
        "cost": cost if isinstance(cost, Decimal | int) and not isinstance(cost, bool) else None,
    }
    return data, reply


async def _list_models(request: web.Request, arguments: dict[str, object]) -> dict[str, object]:
    _only(arguments, frozenset())
    return _tool_result({"object": "list", "data": await handlers.team_models(request)})


async def _get_model(request: web.Request, arguments: dict[str, object]) -> dict[str, object]:
    _only(arguments, frozenset({"model"}))
    return _tool_result(await handlers.team_model(request, _string(arguments, "model")))


async def _get_balance(request: web.Request, arguments: dict[str, object]) -> dict[str, object]:
    _only(arguments, frozenset())
    return _tool_result(await handlers.key_data(request))


_TOOL_FUNCTIONS: Final[dict[str, _Tool]] = {
    "chat": _chat,
    "list_models": _list_models,
    "get_model": _get_model,
    "get_balance": _get_balance,
}


def _rpc_error_response(
    request_id: str | int | None,
    code: int,
    message: str,
    *,
    status: int,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = encode_json(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    )
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

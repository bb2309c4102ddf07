"""Pure helpers for OpenAI wire formats: strict body parsing, re-serialisation, usage extraction.

This module never performs I/O and never imports aiohttp. JSON numbers with a fraction or an
exponent are decoded as :class:`decimal.Decimal` from their text, so a body is re-serialised
with exactly the digits the client sent, and ``usage.cost`` is read without a binary float.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Final

import msgspec

from .errors import InvalidRequest

__all__ = [
    "ChatRequest",
    "Usage",
    "answer_summary",
    "decode_json",
    "encode_json",
    "has_duplicate_keys",
    "parse_chat_request",
    "tolerant_answer_summary",
    "usage_from_object",
]

_MAX_DECIMAL_EXPONENT: Final = 400
"""|exponent| beyond this is refused: no real parameter needs it and `1e999999` is a DoS seed."""


def _float_hook(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - msgspec only hands us valid numbers
        raise ValueError("invalid number") from exc
    if not value.is_finite() or abs(value.adjusted()) > _MAX_DECIMAL_EXPONENT:
        raise ValueError("number out of range")
    return value


_DECODER: Final = msgspec.json.Decoder(float_hook=_float_hook)
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")


def decode_json(data: bytes | str) -> object:
    """Decode JSON strictly; fractional numbers become ``Decimal``.

    Raises ``msgspec.DecodeError`` (or ``ValueError``) for invalid UTF-8, ``NaN``/``Infinity``,
    out-of-range numbers, nesting deeper than msgspec's limit, trailing data and BOMs.
    """
    try:
        return _DECODER.decode(data)
    except RecursionError as exc:  # msgspec signals its nesting limit this way
        raise ValueError("JSON nested too deeply") from exc


def encode_json(obj: object) -> bytes:
    """Encode ``obj`` as compact JSON; ``Decimal`` values are written as JSON numbers."""
    return _ENCODER.encode(obj)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """The usage of one chat completion, as the upstream reported it.

    ``cost`` is in Clipia credits (``usage.cost``), exact, or ``None`` when not reported.
    """

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost: Decimal | None = None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _as_cost(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value >= 0 else None
    if isinstance(value, int):
        return Decimal(value) if value >= 0 else None
    if isinstance(value, str):
        try:
            parsed = Decimal(value)
        except InvalidOperation:
            return None
        return parsed if parsed.is_finite() and parsed >= 0 else None
    return None


def usage_from_object(obj: object) -> Usage | None:
    """Return the ``usage`` of a decoded response or chunk, or ``None`` when it has none.

    Tolerates missing or mistyped fields (each becomes ``None``); never raises.
    """
    if not isinstance(obj, dict):
        return None
    raw = obj.get("usage")
    if not isinstance(raw, dict):
        return None
    return Usage(
        prompt_tokens=_as_int(raw.get("prompt_tokens")),
        completion_tokens=_as_int(raw.get("completion_tokens")),
        total_tokens=_as_int(raw.get("total_tokens")),
        cost=_as_cost(raw.get("cost")),
    )


_Count = Annotated[int, msgspec.Meta(ge=0)]


class _UsageIn(msgspec.Struct):
    prompt_tokens: _Count | None = None
    completion_tokens: _Count | None = None
    total_tokens: _Count | None = None
    cost: Decimal | None = None


class _AnswerIn(msgspec.Struct):
    id: str | None = None
    usage: _UsageIn | None = None


_ANSWER: Final = msgspec.json.Decoder(_AnswerIn)


def answer_summary(data: bytes) -> tuple[str | None, Usage | None] | None:
    """Return the ``id`` and ``usage`` of a chat completion body; ``None`` if it is no object.

    The same answer as ``decode_json`` then ``usage_from_object``, faster for the common,
    well-formed body: only ``id`` and ``usage`` are decoded (anything unusual takes the
    tolerant path).
    """
    try:
        answer = _ANSWER.decode(data)
    except (msgspec.DecodeError, RecursionError):
        answer = None
    if answer is not None:
        raw = answer.usage
        cost = raw.cost if raw is not None else None
        if cost is None or (
            cost.is_finite() and cost >= 0 and abs(cost.adjusted()) <= _MAX_DECIMAL_EXPONENT
        ):
            usage = (
                None
                if raw is None
                else Usage(
                    prompt_tokens=raw.prompt_tokens,
                    completion_tokens=raw.completion_tokens,
                    total_tokens=raw.total_tokens,
                    cost=cost,
                )
            )
            return answer.id, usage
    return tolerant_answer_summary(data)


def tolerant_answer_summary(data: bytes) -> tuple[str | None, Usage | None] | None:
    """``answer_summary`` the slow way: decode the whole body, then read ``id`` and ``usage``."""
    try:
        decoded = decode_json(data)
    except (msgspec.DecodeError, ValueError):
        return None
    if not isinstance(decoded, dict):
        return None
    upstream_id = decoded.get("id")
    return (upstream_id if isinstance(upstream_id, str) else None), usage_from_object(decoded)


_SECOND_MODEL_CHANNELS: Final = frozenset(
    {"models", "fallbacks", "route", "provider", "extra_body", "api_base", "base_url", "api_key"}
)
"""Fields that would let a body pick another model or upstream (OpenRouter-style routing,
LiteLLM-style overrides). Refused outright: the upstream must see only the model we approved."""

_POSITIVE_INT_FIELDS: Final = ("max_tokens", "max_completion_tokens", "n")


class ChatRequest(msgspec.Struct, kw_only=True):
    """A validated chat completion request.

    ``body`` is the decoded JSON object; the handler rewrites ``model`` (and, for streams,
    ``stream_options``) and forwards ``encode_json(body)``.
    """

    body: dict[str, object]
    requested_model: str
    stream: bool
    client_wants_usage: bool
    """Whether the client itself asked for ``stream_options.include_usage``."""


def has_duplicate_keys(raw: bytes, decoded: object) -> bool:
    r"""Whether an object in the JSON text ``raw`` names a key twice; ``decoded`` is its decoding.

    Outside string literals a colon only separates a key from its value, and inside one it
    is the same colon in the decoded string (or a ``\u003a`` escape, counted apart). The
    decoder keeps one value per key, so re-encoding ``decoded`` (which escapes no colon) gives
    exactly as many colons as ``raw`` holds plus its escaped ones when no object repeats a
    key, and fewer when one does, however the key was spelled (``"model"`` and
    ``"mod\u0065l"`` are one key) and at any depth. An escaped colon is a ``\u003a`` whose
    backslash starts an escape: ``raw`` decoded, so every backslash is in a string and starts
    one, and once the escaped backslashes (``\\``, taken left to right as the decoder does)
    are removed, every ``\u003a`` left is one. An encode, a replace and byte counts, all in C:
    linear in the body, with no per-key (or per-escape) Python work whatever the body holds.
    """
    colons = raw.count(b":")
    if raw.find(b"u003") != -1:  # not ``in``: see redact's docstring
        escapes = raw.replace(b"\\\\", b"") if raw.find(b"\\\\") != -1 else raw
        colons += escapes.count(b"\\u003a") + escapes.count(b"\\u003A")
    return encode_json(decoded).count(b":") != colons


def parse_chat_request(raw: bytes) -> ChatRequest:
    """Parse and check a ``POST /v1/chat/completions`` body; raise ``InvalidRequest`` (400).

    Refused: anything but one JSON object; invalid UTF-8, BOMs, ``NaN``, huge numbers, deep
    nesting, trailing data; any key given twice in one object (at any depth, in any spelling);
    a ``model`` that is missing or not a non-empty string;
    a second model or upstream channel; ``messages`` that is not a non-empty list of objects;
    ``stream`` that is not a boolean; ``stream_options`` that is neither an object nor null;
    ``max_tokens``, ``max_completion_tokens`` or ``n`` that is not a positive integer.
    """
    body = _decode_body(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    smuggled = _SECOND_MODEL_CHANNELS.intersection(body)
    if smuggled:
        field = min(smuggled)
        raise InvalidRequest(f"The field {field!r} is not accepted by this gateway.", param=field)
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise InvalidRequest("'messages' must be a non-empty array of objects.", param="messages")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    _check_positive_ints(body)
    wants_usage = bool(stream and options is not None and options.get("include_usage") is True)
    return ChatRequest(
        body=body, requested_model=model, stream=stream, client_wants_usage=wants_usage
    )


def _decode_body(raw: bytes) -> dict[str, object]:
    """Decode one JSON object strictly, with no key given twice in any of its objects."""
    try:
        body = decode_json(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object.")
    if has_duplicate_keys(raw, body):
        # msgspec keeps the last of duplicate keys silently, and another parser upstream
        # might keep the first: refused, whatever the key and however deep.
        raise InvalidRequest("The body names a key twice in one object; each key must be unique.")
    return body


def _check_positive_ints(body: dict[str, object]) -> None:
    for name in _POSITIVE_INT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
        if value > 2**31:
            raise InvalidRequest(f"'{name}' is out of range.", param=name)

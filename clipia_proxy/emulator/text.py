r"""What the emulated model says: deterministic text, token counts, schema-satisfying JSON.

This module is pure (no I/O, no aiohttp, no clock). Everything a completion contains is a
function of ``(seed, model, messages)`` plus the request's shaping parameters (``n``,
``max_tokens``/``max_completion_tokens``, ``tools``/``tool_choice``, ``response_format``), so
the same request always yields the same answer, streamed or not.

One tokenizer, :func:`count_tokens` (``\w+|[^\w\s]``), counts prompts and completions alike.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from clipia_proxy.wire import encode_json

__all__ = [
    "GeneratedChoice",
    "ToolCall",
    "count_tokens",
    "generate_choices",
    "prompt_tokens",
    "schema_value",
    "split_pieces",
    "truncate_tokens",
]

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")

_MESSAGE_OVERHEAD: Final = 4
"""Tokens charged per message for role and framing, like OpenAI's chat format."""

_PROMPT_OVERHEAD: Final = 3
"""Tokens charged once per prompt for priming the assistant's reply."""

_MIN_TOKENS: Final = 8
_MAX_TOKENS: Final = 60
_MAX_SCHEMA_DEPTH: Final = 8

_WORDS: Final = (
    "the", "gateway", "model", "token", "stream", "budget", "request", "answer", "team",
    "cost", "credit", "limit", "window", "ledger", "proxy", "upstream", "latency", "cache",
    "query", "result", "value", "signal", "careful", "quick", "steady", "bright", "quiet",
    "river", "mountain", "forest", "harbor", "lantern", "compass", "garden", "meadow",
    "engine", "bridge", "signal", "orbit", "prism", "vector", "matrix", "kernel", "socket",
    "packet", "header", "buffer", "thread", "queue", "shard", "replica", "cluster", "node",
    "we", "you", "it", "they", "can", "will", "should", "might", "must", "is", "are", "was",
    "and", "or", "but", "so", "then", "because", "while", "when", "if", "with", "without",
    "into", "over", "under", "across", "through", "about", "every", "each", "some", "many",
    "first", "second", "last", "next", "new", "old", "small", "large", "exact", "simple",
    "measure", "count", "check", "settle", "reserve", "relay", "report", "build", "test",
)  # fmt: skip
"""Single-token words only, so token counts are exact by construction."""


def count_tokens(text: str) -> int:
    """Return the number of tokens in ``text`` (runs of word characters and single symbols)."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def truncate_tokens(text: str, limit: int) -> str:
    """Return the prefix of ``text`` that ends with its ``limit``-th token."""
    if limit <= 0:
        return ""
    for index, match in enumerate(_TOKEN_RE.finditer(text), start=1):
        if index == limit:
            return text[: match.end()]
    return text


def split_pieces(text: str, rng: random.Random) -> list[str]:
    """Split ``text`` into stream pieces of one or two tokens; their concatenation is ``text``.

    Whitespace before a token travels with it, as in real streams (``" word"``).
    """
    ends = [match.end() for match in _TOKEN_RE.finditer(text)]
    pieces: list[str] = []
    start = 0
    index = 0
    while index < len(ends):
        index = min(index + rng.choice((1, 2)), len(ends))
        end = ends[index - 1]
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        if pieces:
            pieces[-1] += text[start:]
        else:
            pieces.append(text[start:])
    return pieces


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict):
                # Images, audio, files: charged by their JSON description, a stand-in for pixels.
                parts.append(encode_json(part).decode())
        return " ".join(parts)
    if content is None:
        return ""
    return encode_json(content).decode()


def prompt_tokens(messages: list[object], tools: object = None) -> int:
    """Return the prompt tokens of ``messages`` (and offered ``tools``), overheads included."""
    total = _PROMPT_OVERHEAD
    for message in messages:
        total += _MESSAGE_OVERHEAD
        if not isinstance(message, dict):
            total += count_tokens(encode_json(message).decode())
            continue
        total += count_tokens(_content_text(message.get("content")))
        name = message.get("name")
        if isinstance(name, str):
            total += count_tokens(name)
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            total += count_tokens(encode_json(tool_calls).decode())
    if isinstance(tools, list) and tools:
        total += count_tokens(encode_json(tools).decode())
    return total


def _rng(digest: bytes, *salt: object) -> random.Random:
    """Return a reproducible (deliberately not cryptographic) source of generation choices."""
    material = digest + encode_json(list(salt))
    return random.Random(hashlib.sha256(material).digest())


def _sentence_text(rng: random.Random, target: int) -> str:
    """Return prose of exactly ``target`` tokens, ending with a period."""
    out: list[str] = []
    until_period = rng.randint(4, 12)
    capitalise = True
    for position in range(target):
        is_last = position == target - 1
        if (is_last or until_period <= 0) and position > 0 and out[-1] not in {".", ","}:
            out.append(".")
            until_period = rng.randint(4, 12)
            capitalise = True
            continue
        word = rng.choice(_WORDS)
        if capitalise:
            word = word.capitalize()
            capitalise = False
        elif until_period > 2 and rng.random() < 0.08 and out and out[-1] not in {".", ","}:
            out.append(",")
            until_period -= 1
            continue
        out.append(word)
        until_period -= 1
    text = ""
    for token in out:
        text += token if token in {".", ","} or not text else " " + token
    return text


def _as_number(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(str(value))
    return None


def _resolve_ref(ref: str, root: dict[str, object]) -> object:
    node: object = root
    for part in ref.removeprefix("#/").split("/") if ref != "#" else []:
        if not isinstance(node, dict):
            return {}
        node = node.get(part.replace("~1", "/").replace("~0", "~"), {})
    return node


def _merge_all_of(schema: dict[str, object]) -> dict[str, object]:
    merged: dict[str, object] = {k: v for k, v in schema.items() if k != "allOf"}
    parts = schema.get("allOf")
    if not isinstance(parts, list):
        return merged
    properties: dict[str, object] = dict(_as_dict(merged.get("properties")))
    required: list[object] = list(_as_list(merged.get("required")))
    for part in parts:
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties":
                properties.update(_as_dict(value))
            elif key == "required":
                required.extend(_as_list(value))
            else:
                merged.setdefault(key, value)
    if properties:
        merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged


def _as_dict(value: object) -> dict[str, object]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _string_value(schema: dict[str, object], rng: random.Random) -> str:
    fmt = schema.get("format")
    fixed = {
        "date-time": "2026-06-26T12:00:00Z",
        "date": "2026-06-26",
        "time": "12:00:00Z",
        "email": "user@example.com",
        "uri": "https://example.com/resource",
        "hostname": "example.com",
        "ipv4": "192.0.2.1",
    }
    if isinstance(fmt, str) and fmt in fixed:
        return fixed[fmt]
    if fmt == "uuid":
        hexed = f"{rng.getrandbits(128):032x}"
        return f"{hexed[:8]}-{hexed[8:12]}-4{hexed[13:16]}-a{hexed[17:20]}-{hexed[20:]}"
    min_length = schema.get("minLength")
    max_length = schema.get("maxLength")
    text = _words(rng, rng.randint(1, 4))
    if isinstance(min_length, int):
        while len(text) < min_length:
            text += " " + rng.choice(_WORDS)
    if isinstance(max_length, int):
        text = text[:max_length].rstrip() if max_length > 0 else ""
        if isinstance(min_length, int) and len(text) < min_length:
            text = text.ljust(min_length, "x")
    return text


def _lower_bounds(schema: dict[str, object], scale: int) -> list[int]:
    """Return the smallest allowed multiples of ``1/scale`` implied by the lower bounds."""
    bounds: list[int] = []
    minimum = _as_number(schema.get("minimum"))
    exclusive = _as_number(schema.get("exclusiveMinimum"))
    if minimum is not None:
        bounds.append(math.ceil(minimum * scale))
    if exclusive is not None:
        bounds.append(math.floor(exclusive * scale) + 1)
    return bounds


def _schema_maxima(schema: dict[str, object], scale: int) -> list[int]:
    """Return the largest allowed multiples of ``1/scale`` implied by the upper bounds."""
    bounds: list[int] = []
    maximum = _as_number(schema.get("maximum"))
    exclusive = _as_number(schema.get("exclusiveMaximum"))
    if maximum is not None:
        bounds.append(math.floor(maximum * scale))
    if exclusive is not None:
        bounds.append(math.ceil(exclusive * scale) - 1)
    return bounds


def _scaled_pick(schema: dict[str, object], rng: random.Random, scale: int) -> int | None:
    """Pick a multiple of ``1/scale`` (as its numerator) within bounds; ``None`` if none fits."""
    lowers = _lower_bounds(schema, scale)
    uppers = _schema_maxima(schema, scale)
    span = 100 * scale
    lo = max(lowers) if lowers else (min(uppers) - span if uppers else 0)
    hi = min(uppers) if uppers else lo + span
    return rng.randint(lo, hi) if lo <= hi else None


def _integer_value(schema: dict[str, object], rng: random.Random) -> int:
    picked = _scaled_pick(schema, rng, 1)
    # No integer fits (a contradictory schema): the lower bound is the least wrong answer.
    return picked if picked is not None else max(_lower_bounds(schema, 1), default=0)


def _number_value(schema: dict[str, object], rng: random.Random) -> Decimal:
    picked = _scaled_pick(schema, rng, 10)
    if picked is not None:
        return Decimal(picked) / 10
    # No tenth fits (e.g. 0 < x < 0.1): take the middle of the bounds.
    edges = [
        _as_number(schema.get(name))
        for name in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    ]
    known = [edge for edge in edges if edge is not None]
    return (min(known) + max(known)) / 2 if known else Decimal(0)


def schema_value(
    schema: object,
    rng: random.Random,
    *,
    root: dict[str, object] | None = None,
    depth: int = 0,
) -> object:
    """Return a JSON value satisfying the JSON ``schema`` (the common subset).

    Supported: ``type`` (also as a list), ``enum``, ``const``, ``$ref`` to the same document,
    ``anyOf``/``oneOf`` (the first branch), ``allOf`` (merged), objects (every listed property,
    plus required names without a schema), arrays (``items``, ``minItems``/``maxItems``),
    strings (``minLength``/``maxLength``, common ``format`` values), integers and numbers
    (inclusive and exclusive bounds), booleans and null. ``pattern`` and ``multipleOf`` are
    ignored.
    """
    if not isinstance(schema, dict):
        return _words(rng, 2)
    document = root if root is not None else schema
    if depth > _MAX_SCHEMA_DEPTH * 4:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        return schema_value(_resolve_ref(ref, document), rng, root=document, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    branch = _branch_schema(schema)
    if branch is not None:
        return schema_value(branch, rng, root=document, depth=depth + 1)
    match _schema_kind(schema):
        case "object":
            return _object_value(schema, rng, document, depth)
        case "array":
            return _array_value(schema, rng, document, depth)
        case "integer":
            return _integer_value(schema, rng)
        case "number":
            return _number_value(schema, rng)
        case "boolean":
            return rng.random() < 0.5
        case "null":
            return None
        case _:
            return _string_value(schema, rng)


def _branch_schema(schema: dict[str, object]) -> object | None:
    """The schema ``anyOf``/``oneOf`` (the first non-null branch) or ``allOf`` (merged) names."""
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if isinstance(branches, list) and branches:
            chosen: object = next(
                (b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")),
                branches[0],
            )
            return chosen
    if "allOf" in schema:
        return _merge_all_of(schema)
    return None


def _schema_kind(schema: dict[str, object]) -> object:
    """The ``type`` to produce: the first non-null one of a list, else guessed from keywords."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return kind


def _object_value(
    schema: dict[str, object], rng: random.Random, root: dict[str, object], depth: int
) -> dict[str, object]:
    properties = _as_dict(schema.get("properties"))
    required = [name for name in _as_list(schema.get("required")) if isinstance(name, str)]
    result: dict[str, object] = {}
    for name, subschema in properties.items():
        if depth >= _MAX_SCHEMA_DEPTH and name not in required:
            continue
        result[name] = schema_value(subschema, rng, root=root, depth=depth + 1)
    for name in required:
        if name not in result:
            result[name] = _words(rng, 1)
    return result


def _array_value(
    schema: dict[str, object], rng: random.Random, root: dict[str, object], depth: int
) -> list[object]:
    min_items = schema.get("minItems")
    max_items = schema.get("maxItems")
    low = min_items if isinstance(min_items, int) else 0
    high = max_items if isinstance(max_items, int) else max(low, 3)
    count = 0 if depth >= _MAX_SCHEMA_DEPTH else rng.randint(min(max(low, 1), high), high)
    count = max(count, low)
    items = schema.get("items")
    return [schema_value(items, rng, root=root, depth=depth + 1) for _ in range(count)]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCall:
    """One function call the model makes."""

    id: str
    name: str
    arguments: str
    """JSON text satisfying the function's ``parameters`` schema."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedChoice:
    """One choice of a completion, with the pieces a stream sends it in."""

    index: int
    content: str | None
    tool_call: ToolCall | None
    finish_reason: str
    completion_tokens: int
    pieces: tuple[str, ...]
    """Stream deltas: of ``content``, or of ``tool_call.arguments`` when it is a tool call."""


def _digest(seed: int, model: str, messages: list[object]) -> bytes:
    return hashlib.sha256(encode_json([seed, model, messages])).digest()


def _chosen_tool(tools: object, tool_choice: object) -> dict[str, object] | None:
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    functions = [
        _as_dict(tool.get("function"))
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    ]
    if not functions:
        return None
    if isinstance(tool_choice, dict):
        wanted = _as_dict(tool_choice.get("function")).get("name")
        for function in functions:
            if function.get("name") == wanted:
                return function
    return functions[0]


def _completion_limit(body: dict[str, object]) -> int | None:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _json_content(response_format: object, rng: random.Random) -> str | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = _as_dict(response_format.get("json_schema")).get("schema", {})
        return encode_json(schema_value(schema, rng)).decode()
    if kind == "json_object":
        value = {"answer": _words(rng, rng.randint(2, 6)), "count": rng.randint(0, 99)}
        return encode_json(value).decode()
    return None


def generate_choices(
    seed: int,
    body: dict[str, object],
    *,
    length: int | None = None,
    honour_limit: bool = True,
) -> list[GeneratedChoice]:
    """Return the choices of the completion for a validated chat request ``body``.

    The text depends only on ``seed``, ``model`` and ``messages`` (and the choice index), so
    a streamed and a non-streamed request produce the same content. Prose is 8 to 60 tokens;
    ``max_completion_tokens`` (else ``max_tokens``) cuts content (tool calls are never cut)
    and then ``finish_reason`` is ``"length"``. ``length`` fixes the prose's token count (a
    long answer); ``honour_limit=False`` ignores ``max_tokens`` (an upstream that does not).
    """
    model = str(body["model"])
    messages = _as_list(body.get("messages"))
    digest = _digest(seed, model, messages)
    n = body.get("n")
    count = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    limit = _completion_limit(body) if honour_limit else None
    tool = _chosen_tool(body.get("tools"), body.get("tool_choice"))
    choices: list[GeneratedChoice] = []
    for index in range(count):
        rng = _rng(digest, "choice", index)
        piece_rng = _rng(digest, "pieces", index)
        if tool is not None:
            name = str(tool.get("name", "function"))
            arguments = encode_json(schema_value(tool.get("parameters", {}), rng)).decode()
            call = ToolCall(id=f"call_{rng.getrandbits(96):024x}", name=name, arguments=arguments)
            choices.append(
                GeneratedChoice(
                    index=index,
                    content=None,
                    tool_call=call,
                    finish_reason="tool_calls",
                    completion_tokens=count_tokens(name) + count_tokens(arguments),
                    pieces=tuple(split_pieces(arguments, piece_rng)),
                )
            )
            continue
        text = _json_content(body.get("response_format"), rng)
        if text is None:
            target = rng.randint(_MIN_TOKENS, _MAX_TOKENS) if length is None else length
            text = _sentence_text(rng, target)
        finish_reason = "stop"
        if limit is not None and count_tokens(text) > limit:
            text = truncate_tokens(text, limit)
            finish_reason = "length"
        choices.append(
            GeneratedChoice(
                index=index,
                content=text,
                tool_call=None,
                finish_reason=finish_reason,
                completion_tokens=count_tokens(text),
                pieces=tuple(split_pieces(text, piece_rng)),
            )
        )
    return choices

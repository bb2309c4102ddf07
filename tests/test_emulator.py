"""Tests for the Clipia emulator: a real aiohttp server on an ephemeral port, no mocks."""

from __future__ import annotations

import asyncio
import random
import re
import socket
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from clipia_proxy.emulator import (
    CATALOG,
    STATE_KEY,
    EmulatorState,
    Fault,
    cost_credits,
    count_tokens,
    create_emulator_app,
    run_emulator,
)
from clipia_proxy.emulator.catalog import ChatPrice, chat_price
from clipia_proxy.emulator.text import schema_value, split_pieces, truncate_tokens
from clipia_proxy.wire import decode_json
from tests.harness import Clock

Client = TestClient[web.Request, web.Application]
Json = Any
"""Decoded JSON from the wire: its shape is what the assertions check, not the type checker."""

KEY = "clipia_test_abc123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
HELLO: dict[str, object] = {
    "model": "claude-opus-4-8",
    "messages": [{"role": "user", "content": "Hello there"}],
}
STREAM_USAGE: dict[str, object] = {"stream": True, "stream_options": {"include_usage": True}}
ID_RE = re.compile(r"^chatcmpl-[0-9a-f]{12}$")

WEATHER_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 3, "maxLength": 20},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "alerts": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
        "where": {"$ref": "#/$defs/point"},
        "note": {"type": ["string", "null"]},
        "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    },
    "required": ["city", "days", "unit", "where"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
        }
    },
}


# --- helpers -------------------------------------------------------------------------------


_BOUND_CHECKS: dict[str, Callable[[Decimal, Decimal], bool]] = {
    "minimum": lambda value, bound: value >= bound,
    "maximum": lambda value, bound: value <= bound,
    "exclusiveMinimum": lambda value, bound: value > bound,
    "exclusiveMaximum": lambda value, bound: value < bound,
}


def _number(value: object) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    return Decimal(value)


def _check_schema(value: object, schema: object, root: dict[str, object]) -> list[str]:
    """Return the violations of ``value`` against ``schema`` (an independent checker)."""
    assert isinstance(schema, dict)
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        defs = root["$defs"]
        assert isinstance(defs, dict)
        return _check_schema(value, defs[name], root)
    if "anyOf" in schema:
        options = schema["anyOf"]
        assert isinstance(options, list)
        ok = any(not _check_schema(value, option, root) for option in options)
        return [] if ok else [f"{value!r} matches no anyOf branch"]
    errors: list[str] = []
    if "enum" in schema:
        enum = schema["enum"]
        assert isinstance(enum, list)
        if value not in enum:
            errors.append(f"{value!r} not in enum")
    kinds = schema.get("type")
    kind_list = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    checks: dict[str, Callable[[object], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: _number(v) is not None,
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind_list and not any(checks[str(k)](value) for k in kind_list):
        return [f"{value!r} is not {kind_list}"]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        assert isinstance(properties, dict)
        required = schema.get("required", [])
        assert isinstance(required, list)
        errors.extend(f"missing {name}" for name in required if name not in value)
        if schema.get("additionalProperties") is False:
            errors.extend(f"extra {name}" for name in value if name not in properties)
        for name, item in value.items():
            if name in properties:
                errors.extend(_check_schema(item, properties[name], root))
    if isinstance(value, list):
        min_items = schema.get("minItems", 0)
        max_items = schema.get("maxItems", 10**9)
        assert isinstance(min_items, int)
        assert isinstance(max_items, int)
        if not min_items <= len(value) <= max_items:
            errors.append(f"{len(value)} items")
        errors.extend(e for item in value for e in _check_schema(item, schema.get("items"), root))
    if isinstance(value, str):
        min_length = schema.get("minLength", 0)
        max_length = schema.get("maxLength", 10**9)
        assert isinstance(min_length, int)
        assert isinstance(max_length, int)
        if not min_length <= len(value) <= max_length:
            errors.append(f"{value!r} has a bad length")
    number = _number(value)
    if number is not None:
        bounds = {word: _number(schema.get(word)) for word in _BOUND_CHECKS}
        errors.extend(
            f"{number} violates {word} {bound}"
            for word, bound in bounds.items()
            if bound is not None and not _BOUND_CHECKS[word](number, bound)
        )
    return errors


def _events(raw: bytes) -> list[str]:
    """Return the ``data`` payloads of an SSE body, in order (any line ending, comments skipped)."""
    text = raw.decode().replace("\r\n", "\n").replace("\r", "\n")
    payloads: list[str] = []
    for block in text.split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    return payloads


def _chunks(raw: bytes) -> list[dict[str, Json]]:
    chunks: list[dict[str, Json]] = []
    for payload in _events(raw):
        if payload == "[DONE]":
            continue
        chunk = decode_json(payload)
        assert isinstance(chunk, dict)
        chunks.append(chunk)
    return chunks


def _content(raw: bytes, index: int = 0) -> str:
    text = ""
    for chunk in _chunks(raw):
        choices = chunk["choices"]
        assert isinstance(choices, list)
        for choice in choices:
            if choice["index"] == index and isinstance(choice["delta"].get("content"), str):
                text += choice["delta"]["content"]
    return text


def _expected_cost(model: str, prompt: int, completion: int) -> Decimal:
    price = chat_price(model)
    assert price is not None
    rubles = price.prompt * prompt + price.completion * completion
    return (rubles / 3).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Json]:
    body = decode_json(await resp.read())
    assert isinstance(body, dict)
    return body


async def _chat(client: Client, body: dict[str, object], **headers: str) -> aiohttp.ClientResponse:
    return await client.post(CHAT, data=msgspec.json.encode(body), headers=headers or AUTH)


async def _read_until_broken(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """Read a body chunk by chunk; return the bytes got and whether the transfer broke."""
    got = b""
    try:
        async for data in resp.content.iter_any():
            got += data
    except aiohttp.ClientPayloadError:
        return got, True
    return got, False


def _error_of(body: dict[str, object]) -> dict[str, object]:
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] is None
    return error


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def state(clock: Clock) -> EmulatorState:
    return EmulatorState(seed=0, monotonic=clock, now=lambda: 1782300000.0)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, state: EmulatorState) -> Client:
    return await aiohttp_client(create_emulator_app(state))


# --- catalog -------------------------------------------------------------------------------


async def test_catalog_mixes_chat_and_media_models_and_needs_no_key(client: Client) -> None:
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await _json(resp)
    assert body["object"] == "list"
    data = body["data"]
    assert isinstance(data, list)
    assert len(data) == len(CATALOG)
    chat = [m for m in data if "architecture" in m]
    media = [m for m in data if "architecture" not in m]
    assert {m["id"] for m in chat} >= {
        "claude-opus-4-8",
        "gpt-5.5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "gpt-5.5-mini",
        "gemini-3-pro",
        "deepseek-v4",
        "grok-5",
    }
    for model in chat:
        assert set(model) == {
            "id",
            "object",
            "name",
            "created",
            "owned_by",
            "context_length",
            "architecture",
            "pricing",
            "supported_parameters",
        }
        assert set(model["architecture"]) == {
            "modality",
            "input_modalities",
            "output_modalities",
            "tokenizer",
        }
        assert all(isinstance(v, str) and Decimal(v) > 0 for v in model["pricing"].values())
    assert 2 <= len(media) <= 3
    for model in media:
        assert model["type"] in {"image", "video"}
        assert model["slug"] == model["id"]
        assert isinstance(model["pricing"]["credits"], int)
        assert "context_length" not in model
    prices = {m["id"]: m["pricing"] for m in chat}
    assert prices["claude-opus-4-8"] == {"prompt": "0.0004", "completion": "0.002"}
    assert prices["gpt-5.5"] == {"prompt": "0.0004", "completion": "0.0024"}
    assert prices["claude-sonnet-4-6"] == {"prompt": "0.00024", "completion": "0.0012"}


async def test_model_by_id_and_unknown_model(client: Client) -> None:
    resp = await client.get("/v1/models/gpt-5.5")
    assert resp.status == 200
    assert (await _json(resp))["id"] == "gpt-5.5"
    resp = await client.get("/v1/models/flux-2-pro")
    assert (await _json(resp))["type"] == "image"
    resp = await client.get("/v1/models/nope")
    assert resp.status == 404
    assert _error_of(await _json(resp))["code"] == "not_found"


# --- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": f"Bearer {KEY}"}, KEY),
        ({"Authorization": f"Key {KEY}"}, KEY),
        ({"X-Api-Key": KEY}, KEY),
        ({"Authorization": "Bearer clipia_live_xyz"}, "clipia_live_xyz"),
    ],
)
async def test_every_key_channel_authenticates(
    client: Client, state: EmulatorState, headers: dict[str, str], key: str
) -> None:
    assert (await _chat(client, HELLO, **headers)).status == 200
    assert (await client.get("/v1/key", headers=headers)).status == 200
    assert [r.key for r in state.requests] == [key, key]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-openai"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer clipia_test_"},
        {"X-Api-Key": ""},
    ],
)
async def test_missing_or_invalid_key_is_401(client: Client, headers: dict[str, str]) -> None:
    for method, path in (("POST", CHAT), ("GET", "/v1/key"), ("GET", "/v1/generation?id=x")):
        resp = await client.request(
            method, path, data=msgspec.json.encode(HELLO), headers=headers or {"X-Other": "1"}
        )
        assert resp.status == 401
        error = _error_of(await _json(resp))
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "authentication_error"


async def test_exact_key_set(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_emulator_app(EmulatorState(keys={"k1"})))
    assert (await _chat(client, HELLO, Authorization="Bearer k1")).status == 200
    assert (await _chat(client, HELLO, Authorization=f"Bearer {KEY}")).status == 401


# --- non-stream completions ----------------------------------------------------------------


async def test_completion_shape_tokens_and_exact_cost(client: Client, state: EmulatorState) -> None:
    resp = await _chat(client, HELLO)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    raw = await resp.read()
    body = await _json(resp)
    assert set(body) == {"id", "object", "created", "model", "provider", "choices", "usage"}
    assert ID_RE.match(str(body["id"]))
    assert body["object"] == "chat.completion"
    assert body["created"] == 1782300000
    assert body["model"] == "claude-opus-4-8"
    assert body["provider"] == "Clipia"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert 8 <= count_tokens(content) <= 60
    usage = body["usage"]
    assert isinstance(usage, dict)
    # 3 priming + 4 per message + "Hello", "there".
    assert usage["prompt_tokens"] == 9
    assert usage["completion_tokens"] == count_tokens(content)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    expected = _expected_cost("claude-opus-4-8", 9, usage["completion_tokens"])
    assert Decimal(usage["cost"]) == expected
    assert b'"cost":' + str(expected.normalize()).encode() + b"}" in raw
    bill = state.bills[str(body["id"])]
    assert (bill.prompt_tokens, bill.completion_tokens) == (9, usage["completion_tokens"])
    assert bill.cost == expected
    assert bill.streamed is False


def test_cost_arithmetic_is_decimal_half_up_and_plain() -> None:
    opus = chat_price("claude-opus-4-8")
    assert opus is not None
    # Clipia's documented example: 18 + 72 tokens of claude-opus-4-8 = 0.1512 ₽ = 0.0504 credits.
    assert str(cost_credits(opus, 18, 72)) == "0.0504"
    assert str(cost_credits(opus, 1, 0)) == "0.000133"
    assert str(cost_credits(opus, 15000, 0)) == "2"
    assert str(cost_credits(opus, 0, 0)) == "0"
    half = ChatPrice(prompt=Decimal("0.0000015"), completion=Decimal(0))
    assert str(cost_credits(half, 1, 0)) == "0.000001"  # half-even would give 0


async def test_same_input_same_text_other_seed_other_text(
    client: Client, aiohttp_client: AiohttpClient
) -> None:
    first = await _json(await _chat(client, HELLO))
    second = await _json(await _chat(client, HELLO | {"temperature": 0.3}))
    assert first["id"] != second["id"]
    assert first["choices"] == second["choices"]
    other = await _json(
        await _chat(client, HELLO | {"messages": [{"role": "user", "content": "Hi"}]})
    )
    assert other["choices"] != first["choices"]
    seeded = await aiohttp_client(create_emulator_app(EmulatorState(seed=7)))
    assert (await _json(await _chat(seeded, HELLO)))["choices"] != first["choices"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_token_cap_cuts_with_finish_reason_length(client: Client, field: str) -> None:
    body = await _json(await _chat(client, HELLO | {field: 3}))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    assert count_tokens(choice["message"]["content"]) == 3
    assert body["usage"]["completion_tokens"] == 3
    uncapped = await _json(await _chat(client, HELLO))
    assert uncapped["choices"][0]["message"]["content"].startswith(choice["message"]["content"])


async def test_n_gives_n_choices_billed_together(client: Client) -> None:
    body = await _json(await _chat(client, HELLO | {"n": 3}))
    choices = body["choices"]
    assert isinstance(choices, list)
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) == 3
    total = sum(count_tokens(c["message"]["content"]) for c in choices)
    assert body["usage"]["completion_tokens"] == total


@pytest.mark.parametrize(
    "tool_choice", [None, "auto", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_tools_give_tool_calls_matching_the_schema(
    client: Client, tool_choice: object
) -> None:
    tools = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}},
    ]
    if tool_choice is None:
        tools.reverse()
    request: dict[str, object] = HELLO | {"tools": tools}
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    body = await _json(await _chat(client, request))
    expected_name = "lookup" if tool_choice == "auto" else "get_weather"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == expected_name
    arguments = decode_json(call["function"]["arguments"])
    schema: dict[str, object] = (
        WEATHER_SCHEMA if expected_name == "get_weather" else {"type": "object"}
    )
    assert _check_schema(arguments, schema, schema) == []


async def test_tool_choice_none_gives_text(client: Client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": WEATHER_SCHEMA}}]
    body = await _json(await _chat(client, HELLO | {"tools": tools, "tool_choice": "none"}))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(body["choices"][0]["message"]["content"], str)


async def test_json_schema_and_json_object_outputs(client: Client) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "strict": True, "schema": WEATHER_SCHEMA},
    }
    body = await _json(await _chat(client, HELLO | {"response_format": response_format}))
    content = body["choices"][0]["message"]["content"]
    assert _check_schema(decode_json(content), WEATHER_SCHEMA, WEATHER_SCHEMA) == []
    body = await _json(await _chat(client, HELLO | {"response_format": {"type": "json_object"}}))
    assert isinstance(decode_json(body["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 7},
        {"type": "number", "minimum": 0.25, "maximum": 0.3},
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.05},
        {"type": "string", "minLength": 40, "maxLength": 41},
        {"type": "array", "items": {"const": 1}, "minItems": 0, "maxItems": 0},
        {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}]},
    ],
)
def test_schema_values_respect_bounds(schema: dict[str, object]) -> None:
    for seed in range(20):
        value = schema_value(schema, random.Random(seed))
        if "allOf" in schema:
            assert isinstance(value, dict)
            assert isinstance(value["a"], int)
        else:
            assert _check_schema(value, schema, schema) == [], value


async def test_openai_sdk_parses_responses(client: Client) -> None:
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=KEY, max_retries=0)
    completion = await sdk.chat.completions.create(
        model="gpt-5.5", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 9
    stream = await sdk.chat.completions.create(
        model="gpt-5.5",
        messages=[{"role": "user", "content": "Hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert text == completion.choices[0].message.content
    assert usage is not None
    assert usage.completion_tokens == completion.usage.completion_tokens
    await sdk.close()


# --- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_event_sequence(
    client: Client, state: EmulatorState, include_usage: bool
) -> None:
    extra: dict[str, object] = STREAM_USAGE if include_usage else {"stream": True}
    resp = await _chat(client, HELLO | extra)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    raw = await resp.read()
    payloads = _events(raw)
    assert payloads[-1] == "[DONE]"
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = _chunks(raw)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    gen_id = ids.pop()
    assert ID_RE.match(str(gen_id))
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "claude-opus-4-8"
        assert chunk["created"] == 1782300000
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""}
    usage_chunks = [c for c in chunks if c["choices"] == []]
    body_chunks = [c for c in chunks if c["choices"] != []]
    finish = body_chunks[-1]["choices"][0]
    assert finish == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])
    bill = state.bills[str(gen_id)]
    assert bill.streamed is True
    if include_usage:
        assert [c["usage"] for c in body_chunks] == [None] * len(body_chunks)
        [usage_chunk] = usage_chunks
        assert usage_chunk is chunks[-1]
        usage = usage_chunk["usage"]
        assert usage == {
            "prompt_tokens": 9,
            "completion_tokens": bill.completion_tokens,
            "total_tokens": 9 + bill.completion_tokens,
            "cost": bill.cost,
        }
    else:
        assert usage_chunks == []
        assert all("usage" not in c for c in chunks)
    non_stream = await _json(await _chat(client, HELLO))
    assert _content(raw) == non_stream["choices"][0]["message"]["content"]
    assert bill.completion_tokens == count_tokens(_content(raw))


async def test_stream_tool_call_arguments_concatenate(client: Client) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}
    ]
    raw = await (await _chat(client, HELLO | {"tools": tools, "stream": True})).read()
    chunks = _chunks(raw)
    header = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert header["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = await _json(await _chat(client, HELLO | {"tools": tools}))
    call = plain["choices"][0]["message"]["tool_calls"][0]
    assert arguments == call["function"]["arguments"]
    assert header["id"] == call["id"]


async def test_stream_with_n_choices(client: Client) -> None:
    raw = await (await _chat(client, HELLO | {"n": 2, "stream": True})).read()
    plain = await _json(await _chat(client, HELLO | {"n": 2}))
    for index in (0, 1):
        assert _content(raw, index) == plain["choices"][index]["message"]["content"]


# --- generation, key, limits ---------------------------------------------------------------


async def test_generation_lookup(client: Client, state: EmulatorState) -> None:
    gen_id = str((await _json(await _chat(client, HELLO, **AUTH))).get("id"))
    resp = await client.get("/v1/generation", params={"id": gen_id}, headers={"X-Api-Key": KEY})
    assert resp.status == 200
    data = (await _json(resp))["data"]
    bill = state.bills[gen_id]
    assert data == {
        "id": gen_id,
        "model": "claude-opus-4-8",
        "provider_name": "Clipia",
        "streamed": False,
        "total_cost": bill.cost,
        "tokens_prompt": bill.prompt_tokens,
        "tokens_completion": bill.completion_tokens,
        "finish_reason": "stop",
        "created_at": "2026-06-24T11:20:00Z",
    }
    resp = await client.get("/v1/generation", params={"id": "chatcmpl-000000000000"}, headers=AUTH)
    assert resp.status == 404
    assert _error_of(await _json(resp))["code"] == "not_found"


async def test_generation_lag(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(generation_lag=2))
    gen_id = str((await _json(await _chat(client, HELLO))).get("id"))
    statuses = [
        (await client.get("/v1/generation", params={"id": gen_id}, headers=AUTH)).status
        for _ in range(3)
    ]
    assert statuses == [404, 404, 200]


async def test_key_reports_usage_and_limit(aiohttp_client: AiohttpClient) -> None:
    live = "clipia_live_abc123"
    auth = {"Authorization": f"Bearer {live}"}
    state = EmulatorState(key_limits={live: Decimal("0.01")})
    client = await aiohttp_client(create_emulator_app(state))
    resp = await client.get("/v1/key", headers=auth)
    assert (await _json(resp))["data"] == {
        "label": "live key",
        "usage": 0,
        "limit": Decimal("0.01"),
        "limit_remaining": Decimal("0.01"),
        "rate_limit": {"requests": 120, "interval": "1m"},
    }
    while True:
        resp = await _chat(client, HELLO, **auth)
        if resp.status != 200:
            break
    assert resp.status == 402
    assert _error_of(await _json(resp))["code"] == "insufficient_credits"
    used = sum((b.cost for b in state.bills.values()), Decimal(0))
    data = (await _json(await client.get("/v1/key", headers=auth)))["data"]
    assert data["usage"] == used
    assert data["limit_remaining"] == 0


async def test_sandbox_key_reports_the_cost_but_is_never_charged(
    aiohttp_client: AiohttpClient,
) -> None:
    state = EmulatorState(key_limits={KEY: Decimal("0.000001")})
    client = await aiohttp_client(create_emulator_app(state))
    for _ in range(3):
        resp = await _chat(client, HELLO)
        assert resp.status == 200  # a limit never bites: nothing is charged
        assert Decimal(str((await _json(resp))["usage"]["cost"])) > 0
    assert [bill.charged for bill in state.bills.values()] == [False] * 3
    data = (await _json(await client.get("/v1/key", headers=AUTH)))["data"]
    assert (data["label"], data["usage"]) == ("sandbox key", 0)
    # A generation is visible to the key that created it only.
    gen_id = next(iter(state.bills))
    mine = await client.get("/v1/generation", params={"id": gen_id}, headers=AUTH)
    assert mine.status == 200
    other = {"Authorization": "Bearer clipia_live_other"}
    theirs = await client.get("/v1/generation", params={"id": gen_id}, headers=other)
    assert theirs.status == 404


async def test_rpm_limit_429_with_retry_after(aiohttp_client: AiohttpClient, clock: Clock) -> None:
    state = EmulatorState(rpm=2, monotonic=clock)
    client = await aiohttp_client(create_emulator_app(state))
    first = await _chat(client, HELLO)
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert first.headers["RateLimit-Reset"] == "60"
    assert first.headers["Set-Cookie"].startswith("clipia_session=")
    clock.advance(20)
    assert (await _chat(client, HELLO)).headers["RateLimit-Remaining"] == "0"
    clock.advance(10)
    limited = await _chat(client, HELLO)
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "30"
    error = _error_of(await _json(limited))
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    assert error["message"] == "Rate limit exceeded. Try again later."
    assert len(state.bills) == 2
    # Another key has its own window.
    assert (await _chat(client, HELLO, Authorization="Bearer clipia_test_other")).status == 200
    clock.advance(30)
    assert (await _chat(client, HELLO)).status == 200


async def test_bad_requests(client: Client, state: EmulatorState) -> None:
    cases: list[tuple[bytes, int, str]] = [
        (b"not json", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (msgspec.json.encode({"messages": [{"role": "user"}]}), 400, "invalid_request"),
        (msgspec.json.encode({"model": "gpt-5.5", "messages": []}), 400, "invalid_request"),
        (msgspec.json.encode(HELLO | {"n": 0}), 400, "invalid_request"),
        (msgspec.json.encode(HELLO | {"max_tokens": "3"}), 400, "invalid_request"),
        (msgspec.json.encode(HELLO | {"model": "gpt-9"}), 404, "not_found"),
        (msgspec.json.encode(HELLO | {"model": "flux-2-pro"}), 404, "not_found"),
    ]
    for data, status, code in cases:
        resp = await client.post(CHAT, data=data, headers=AUTH)
        assert resp.status == status, data
        assert _error_of(await _json(resp))["code"] == code
    assert state.bills == {}
    for method, path in (("GET", CHAT), ("GET", "/v2/anything"), ("DELETE", "/v1/models")):
        resp = await client.request(method, path)
        assert resp.status == 404
        assert _error_of(await _json(resp))["code"] == "not_found"


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (401, "invalid_api_key"),
        (402, "insufficient_credits"),
        (403, "insufficient_scope"),
        (404, "not_found"),
        (422, "model_input_invalid"),
        (429, "rate_limit_exceeded"),
        (500, "internal_error"),
        (503, "service_unavailable"),
        (504, "internal_error"),
    ],
)
async def test_status_faults_are_not_billed(
    client: Client, state: EmulatorState, status: int, code: str
) -> None:
    state.push_fault(Fault(status=status, retry_after="2"))
    resp = await _chat(client, HELLO)
    assert resp.status == status
    assert resp.headers["Retry-After"] == "2"
    assert _error_of(await _json(resp))["code"] == code
    assert state.bills == {}
    assert (await _chat(client, HELLO)).status == 200


async def test_faults_are_fifo_and_honour_times(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(status=503, times=2), Fault(status=500))
    statuses = [(await _chat(client, HELLO)).status for _ in range(4)]
    assert statuses == [503, 503, 500, 200]
    # Non-chat routes never take a fault.
    state.push_fault(Fault(status=500))
    assert (await client.get("/v1/key", headers=AUTH)).status == 200
    assert (await _chat(client, HELLO)).status == 500


async def test_body_quotes_key_and_non_json_body(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(status=401, body_quotes_key=True), Fault(non_json_body=True))
    resp = await _chat(client, HELLO)
    assert resp.status == 401
    message = str(_error_of(await _json(resp))["message"])
    assert KEY in message
    assert f"Bearer {KEY}" in message
    resp = await _chat(client, HELLO)
    assert resp.status == 502
    assert resp.content_type == "text/html"
    assert (await resp.text()).startswith("<html>")


async def test_redirect_fault(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(redirect_to="https://elsewhere.example/v1/chat/completions"))
    resp = await client.post(CHAT, json=HELLO, headers=AUTH, allow_redirects=False)
    assert resp.status == 307
    assert resp.headers["Location"] == "https://elsewhere.example/v1/chat/completions"
    assert state.bills == {}


async def test_delay_faults(aiohttp_client: AiohttpClient) -> None:
    """``first_byte_delay`` waits once before the answer, ``chunk_gap`` between stream writes."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(0)

    state = EmulatorState(seed=0, sleep=sleep)
    client = await aiohttp_client(create_emulator_app(state))
    state.push_fault(Fault(first_byte_delay=0.05), Fault(chunk_gap=0.01))
    assert (await _chat(client, HELLO)).status == 200
    assert slept == [0.05]
    raw = await (await _chat(client, HELLO | {"stream": True})).read()
    gaps = len(_events(raw)) - 1
    assert gaps > 1
    assert slept == [0.05] + [0.01] * gaps


async def test_reset_after_chunks_aborts_and_still_bills(
    client: Client, state: EmulatorState
) -> None:
    state.push_fault(Fault(reset_after_chunks=3))
    resp = await _chat(client, HELLO | STREAM_USAGE)
    assert resp.status == 200
    got, broken = await _read_until_broken(resp)
    assert broken
    record = state.requests[-1]
    assert bytes(record.sent) == got
    assert len(_events(got)) == 3
    assert record.completed is False
    assert record.generation_id in state.bills
    bill = state.bills[str(record.generation_id)]
    assert bill.completion_tokens > count_tokens(_content(got))


async def test_stall_then_abort(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(stall_after_chunks=2, stall_seconds=0.1))
    resp = await _chat(client, HELLO | {"stream": True})
    first = await resp.content.readuntil(b"\n\n")
    second = await resp.content.readuntil(b"\n\n")
    assert bytes(state.requests[-1].sent) == first + second
    rest, broken = await _read_until_broken(resp)
    assert broken
    assert rest == b""


async def test_close_before_usage(client: Client, state: EmulatorState) -> None:
    state.push_fault(Fault(close_before_usage=True))
    resp = await _chat(client, HELLO | STREAM_USAGE)
    got, broken = await _read_until_broken(resp)
    assert broken
    chunks = _chunks(got)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert b"[DONE]" not in got


async def test_usage_faults(client: Client, state: EmulatorState) -> None:
    state.push_fault(
        Fault(no_usage=True),
        Fault(usage_without_cost=True),
        Fault(usage_unasked=True),
        Fault(no_usage=True),
    )
    raw = await (await _chat(client, HELLO | STREAM_USAGE)).read()
    assert all(c["choices"] != [] for c in _chunks(raw))
    assert _events(raw)[-1] == "[DONE]"
    raw = await (await _chat(client, HELLO | STREAM_USAGE)).read()
    usage = _chunks(raw)[-1]["usage"]
    assert isinstance(usage, dict)
    assert "cost" not in usage
    assert usage["prompt_tokens"] == 9
    raw = await (await _chat(client, HELLO | {"stream": True})).read()
    unasked = _chunks(raw)[-1]
    assert unasked["choices"] == []
    assert "cost" in unasked["usage"]
    body = await _json(await _chat(client, HELLO))
    assert "usage" not in body
    assert len(state.bills) == 4


async def test_framing_faults_keep_the_same_events(client: Client, state: EmulatorState) -> None:
    normal = await (await _chat(client, HELLO | STREAM_USAGE)).read()
    state.push_fault(
        Fault(crlf=True),
        Fault(tiny_writes=True),
        Fault(events_per_write=4),
        Fault(comments=True),
    )
    variants = [await (await _chat(client, HELLO | STREAM_USAGE)).read() for _ in range(4)]
    crlf, tiny, _grouped, commented = variants

    def strip_ids(raw: bytes) -> list[str]:
        return [re.sub(r"chatcmpl-[0-9a-f]{12}", "ID", p) for p in _events(raw)]

    for raw in variants:
        assert strip_ids(raw) == strip_ids(normal)
    assert b"\r\n\r\n" in crlf
    assert b"\n" not in crlf.replace(b"\r\n", b"")
    assert tiny.replace(b"chatcmpl-", b"") != b""
    assert b": keep-alive\n\n" in commented
    assert b"event: message\nid: 1\ndata: " in commented
    for record in state.requests[-4:]:
        assert record.completed


async def test_hold_gate_bills_before_answering(client: Client, state: EmulatorState) -> None:
    hold = asyncio.Event()
    state.hold = hold

    async def release() -> None:
        for _ in range(400):
            if state.bills:
                break
            await asyncio.sleep(0.005)
        assert state.bills
        assert state.requests[-1].status == 0
        hold.set()

    resp, _ = await asyncio.gather(_chat(client, HELLO), release())
    assert resp.status == 200
    assert state.requests[-1].status == 200


# --- records and control routes ------------------------------------------------------------


async def test_records_keep_headers_body_and_sent_bytes(
    client: Client, state: EmulatorState
) -> None:
    headers = [
        ("Authorization", f"Key {KEY}"),
        ("X-Request-Id", "req-1"),
        ("X-Dup", "a"),
        ("X-Dup", "b"),
    ]
    data = msgspec.json.encode(HELLO | {"temperature": 0.5})
    resp = await client.post(CHAT + "?trace=1", data=data, headers=headers)
    got = await resp.read()
    stream_resp = await client.post(
        CHAT, data=msgspec.json.encode(HELLO | STREAM_USAGE), headers=AUTH
    )
    streamed = await stream_resp.read()
    plain, stream = state.requests
    assert (plain.method, plain.path, plain.query_string) == ("POST", CHAT, "trace=1")
    assert [
        h for h in plain.headers if h[0] in {"Authorization", "X-Request-Id", "X-Dup"}
    ] == headers
    assert plain.body == data
    assert plain.json == HELLO | {"temperature": Decimal("0.5")}
    assert plain.request_id == "req-1"
    assert plain.key == KEY
    assert plain.status == 200
    assert plain.stream is False
    assert bytes(plain.sent) == got
    assert plain.completed
    assert plain.generation_id == (await _json(resp))["id"]
    assert state.bills[str(plain.generation_id)].request_id == "req-1"
    assert stream.stream is True
    assert bytes(stream.sent) == streamed
    assert stream.completed


async def test_control_routes(client: Client, state: EmulatorState) -> None:
    resp = await client.post("/_emulator/faults", json={"status": 503, "retry_after": "1"})
    assert resp.status == 200
    resp = await client.post("/_emulator/faults", json=[{"status": 500}, {"no_usage": True}])
    assert (await _json(resp)) == {"queued": 2, "pending": 3}
    assert [(await _chat(client, HELLO)).status for _ in range(3)] == [503, 500, 200]
    bad = await client.post("/_emulator/faults", json={"bogus": 1})
    assert bad.status == 400
    requests = decode_json(await (await client.get("/_emulator/requests")).read())
    assert isinstance(requests, list)
    assert len(requests) == 3
    assert requests[0]["status"] == 503
    assert requests[2]["body"] == msgspec.json.encode(HELLO).decode()
    assert requests[2]["sent"] == bytes(state.requests[2].sent).decode()
    assert requests[2]["headers"][0][0]
    bills = decode_json(await (await client.get("/_emulator/bills")).read())
    assert isinstance(bills, dict)
    [(gen_id, bill)] = bills.items()
    assert bill["cost"] == state.bills[gen_id].cost
    assert (await client.post("/_emulator/reset")).status == 200
    assert state.requests == []
    assert state.bills == {}
    assert state.pending_faults == 0


async def test_state_key_and_reset_clears_rate_windows(aiohttp_client: AiohttpClient) -> None:
    state = EmulatorState(rpm=1)
    app = create_emulator_app(state)
    assert app[STATE_KEY] is state
    client = await aiohttp_client(app)
    assert (await _chat(client, HELLO)).status == 200
    assert (await _chat(client, HELLO)).status == 429
    state.reset()
    assert (await _chat(client, HELLO)).status == 200


async def test_run_emulator_serves_until_cancelled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def use() -> int:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/models") as resp:
                        return resp.status
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
        return 0

    async with asyncio.TaskGroup() as group:
        server = group.create_task(run_emulator(port=port, seed=3))
        status = await use()
        server.cancel()
    assert status == 200
    assert server.cancelled()


# --- pure helpers --------------------------------------------------------------------------


@given(st.text(alphabet=st.sampled_from("ab c,.\n\r\t—é1"), max_size=60), st.integers(0, 2**32))
def test_pieces_concatenate_and_truncation_counts(text: str, seed: int) -> None:
    assert "".join(split_pieces(text, random.Random(seed))) == text
    for limit in range(count_tokens(text) + 1):
        assert count_tokens(truncate_tokens(text, limit)) == limit

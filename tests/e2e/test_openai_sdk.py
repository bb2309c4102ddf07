"""The real ``openai`` SDK (sync and async) through the gateway to the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from clipia_proxy.emulator import Fault, RecordedRequest

if TYPE_CHECKING:
    from tests.conftest import Stack

pytestmark = pytest.mark.e2e

CANONICAL = "claude-sonnet-4-6"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about the gateway."}
]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "score", "tags"],
    "additionalProperties": False,
}


@pytest.fixture
def client(thread_stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=thread_stack.base_url, api_key=thread_stack.keys["search"], max_retries=0
    ) as made:
        yield made


@pytest.fixture
async def aclient(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=stack.base_url, api_key=stack.keys["search"], max_retries=0
    ) as made:
        yield made


def record_for(stack: Stack, request_id: str | None) -> RecordedRequest:
    """Return the emulator's record of the one request the gateway sent with ``request_id``."""
    assert request_id
    found = [r for r in stack.emulator.requests if r.request_id == request_id]
    assert len(found) == 1, found
    return found[0]


def sent_json(record: RecordedRequest) -> dict[str, Any]:
    assert isinstance(record.json, dict)
    return record.json


# --- chat, non-stream and stream -------------------------------------------------------------


def test_chat_alias_resolves_and_reports_usage(thread_stack: Stack, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    completion = raw.parse()
    record = record_for(thread_stack, raw.headers.get("x-request-id"))

    assert sent_json(record)["model"] == CANONICAL
    assert completion.model == CANONICAL
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    bill = thread_stack.emulator.bills[completion.id]
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    assert usage.total_tokens == bill.prompt_tokens + bill.completion_tokens
    assert Decimal(repr(getattr(usage, "cost", None))) == bill.cost


def test_stream_matches_non_stream_and_hides_injected_usage(
    thread_stack: Stack, client: openai.OpenAI
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Stream me the same answer."}
    ]
    whole = client.chat.completions.create(model="fast", messages=messages)

    stream = client.chat.completions.create(model="fast", messages=messages, stream=True)
    chunks = list(stream)
    record = record_for(thread_stack, stream.response.headers.get("x-request-id"))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices for c in chunks), "the usage-only chunk reached the client"
    assert all(c.usage is None for c in chunks)
    assert all(c.model == CANONICAL for c in chunks)
    # The gateway asked for usage on the client's behalf (to bill it) ...
    body = sent_json(record)
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == CANONICAL
    # ... and the emulator did send it.
    assert b'"choices":[]' in record.sent
    assert record.completed


def test_stream_with_client_usage_gets_usage_chunk(
    thread_stack: Stack, client: openai.OpenAI
) -> None:
    stream = client.chat.completions.create(
        model="fast",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    record = record_for(thread_stack, stream.response.headers.get("x-request-id"))

    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    bill = thread_stack.emulator.bills[last.id]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    assert Decimal(repr(getattr(last.usage, "cost", None))) == bill.cost
    assert sum(1 for c in chunks if not c.choices) == 1
    assert sent_json(record)["stream_options"] == {"include_usage": True}


async def test_async_chat_and_stream(stack: Stack, aclient: openai.AsyncOpenAI) -> None:
    whole = await aclient.chat.completions.create(model="fast", messages=MESSAGES)
    assert whole.model == CANONICAL
    assert whole.usage is not None
    assert whole.usage.completion_tokens == stack.emulator.bills[whole.id].completion_tokens

    stream = await aclient.chat.completions.create(model="fast", messages=MESSAGES, stream=True)
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    record = record_for(stack, stream.response.headers.get("x-request-id"))
    assert sent_json(record)["stream_options"] == {"include_usage": True}

    usage_stream = await aclient.chat.completions.create(
        model="fast", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in usage_stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


# --- tools and structured output -------------------------------------------------------------


def test_tool_calls_parse(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "Weather in Oslo for 3 days?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = msgspec.json.decode(call.function.arguments)
    assert set(arguments) == {"city", "days"}
    assert isinstance(arguments["city"], str)
    assert 1 <= arguments["days"] <= 7


def test_tool_calls_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "Weather in Oslo for 3 days?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    names: list[str] = []
    arguments = ""
    finish: list[str] = []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function is not None:
                    if call.function.name:
                        names.append(call.function.name)
                    arguments += call.function.arguments or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert names == ["get_weather"]
    assert finish == ["tool_calls"]
    assert set(msgspec.json.decode(arguments)) == {"city", "days"}


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "Rate the gateway."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "rating", "strict": True, "schema": ANSWER_SCHEMA},
        },
    )
    content = completion.choices[0].message.content
    assert content is not None
    value = msgspec.json.decode(content)
    assert set(value) == set(ANSWER_SCHEMA["properties"])
    assert isinstance(value["title"], str)
    assert isinstance(value["score"], int)
    assert 0 <= value["score"] <= 10
    assert all(isinstance(tag, str) for tag in value["tags"])


# --- models ----------------------------------------------------------------------------------


def test_models_list_shows_only_allowed_and_aliases(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert sorted(ids) == sorted([CANONICAL, "gpt-5.5", "fast"])
    assert len(ids) == len(set(ids))
    for absent in ("claude-sonnet-4-5", "flux-2-pro", "veo-4", "nano-banana-3", "gpt-5.5-mini"):
        assert absent not in ids


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(CANONICAL)
    assert model.id == CANONICAL
    alias = client.models.retrieve("fast")
    assert alias.id == "fast"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("claude-sonnet-4-5")  # denied: looks the same as absent
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("flux-2-pro")  # a media model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("claude-sonnet-9")


async def test_async_models(aclient: openai.AsyncOpenAI) -> None:
    page = await aclient.models.list()
    assert sorted(m.id for m in page.data) == sorted([CANONICAL, "gpt-5.5", "fast"])
    assert (await aclient.models.retrieve("fast")).id == "fast"


# --- errors as the SDK's own exception types ------------------------------------------------


def test_bad_key_is_authentication_error(thread_stack: Stack) -> None:
    before = len(thread_stack.chat_requests())
    with openai.OpenAI(
        base_url=thread_stack.base_url, api_key="cpx_not_a_real_key", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.chat.completions.create(model="fast", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert len(thread_stack.chat_requests()) == before


def test_unknown_model_allowed_by_glob_is_not_found(
    thread_stack: Stack, client: openai.OpenAI
) -> None:
    before = len(thread_stack.chat_requests())
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="claude-sonnet-9", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert len(thread_stack.chat_requests()) == before


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-opus-4-8", "gpt-5.5-mini"])
def test_denied_model_is_permission_denied(
    thread_stack: Stack, client: openai.OpenAI, model: str
) -> None:
    before = len(thread_stack.chat_requests())
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES)
    assert caught.value.status_code == 403
    assert caught.value.code == "model_not_allowed"
    assert len(thread_stack.chat_requests()) == before


async def test_upstream_429_is_rate_limit_error(stack: Stack, aclient: openai.AsyncOpenAI) -> None:
    stack.emulator.push_fault(Fault(status=429, retry_after="30", times=3))
    with pytest.raises(openai.RateLimitError) as caught:
        await aclient.chat.completions.create(model="fast", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert caught.value.response.headers.get("retry-after") == "30"
    # 30 s is over max_retry_wait_seconds: the gateway gave up at once.
    assert len(stack.chat_requests()) == 1
    assert stack.emulator.pending_faults == 2


async def test_upstream_500_is_internal_server_error(
    stack: Stack, aclient: openai.AsyncOpenAI
) -> None:
    stack.emulator.push_fault(Fault(status=500, times=3))
    with pytest.raises(openai.InternalServerError) as caught:
        await aclient.chat.completions.create(model="fast", messages=MESSAGES)
    assert caught.value.status_code == 500
    # One retry budget, the client's: the gateway passes the 500 on at once.
    assert "x-should-retry" not in caught.value.response.headers
    assert len(stack.chat_requests()) == 1
    assert stack.emulator.pending_faults == 2


async def test_upstream_500_then_success_is_retried(
    stack: Stack, aclient: openai.AsyncOpenAI
) -> None:
    """The SDK's own retries (its default: 2) see the 500s and get the answer."""
    stack.emulator.push_fault(Fault(status=500, times=2))
    async with openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.keys["search"]) as sdk:
        completion = await sdk.chat.completions.create(model="fast", messages=MESSAGES)
    assert completion.choices[0].message.content
    assert len(stack.chat_requests()) == 3


async def test_mid_stream_reset_raises(stack: Stack, aclient: openai.AsyncOpenAI) -> None:
    stack.emulator.push_fault(Fault(reset_after_chunks=3))
    stream = await aclient.chat.completions.create(model="fast", messages=MESSAGES, stream=True)
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        await consume()
    assert not isinstance(caught.value, openai.APIStatusError)
    assert 1 <= len(received) <= 3
    assert all(c.choices and c.choices[0].finish_reason is None for c in received)
    record = record_for(stack, stream.response.headers.get("x-request-id"))
    assert not record.completed


def test_mid_stream_reset_raises_sync(thread_stack: Stack, client: openai.OpenAI) -> None:
    thread_stack.emulator.push_fault(Fault(reset_after_chunks=3))
    stream = client.chat.completions.create(model="fast", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    assert thread_stack.emulator.pending_faults == 0


def test_upstream_error_quoting_key_is_not_relayed(
    thread_stack: Stack, client: openai.OpenAI
) -> None:
    thread_stack.emulator.push_fault(Fault(status=400, body_quotes_key=True))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fast", messages=MESSAGES)
    response = caught.value.response
    assert thread_stack.clipia_key not in response.text
    assert all(thread_stack.clipia_key not in v for v in response.headers.values())


# --- secrets ---------------------------------------------------------------------------------


async def test_only_the_clipia_key_goes_upstream_and_never_comes_back(
    stack: Stack, aclient: openai.AsyncOpenAI
) -> None:
    team_key = stack.keys["search"]
    seen: list[tuple[dict[str, str], bytes]] = []

    raw = await aclient.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)
    seen.append((dict(raw.headers), raw.content))
    async with aclient.chat.completions.with_streaming_response.create(
        model="fast", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as streamed:
        body = b"".join([part async for part in streamed.iter_bytes()])
        seen.append((dict(streamed.headers), body))
    models = await aclient.models.with_raw_response.list()
    seen.append((dict(models.headers), models.content))
    stack.emulator.push_fault(Fault(status=503))
    with pytest.raises(openai.InternalServerError) as caught:
        await aclient.chat.completions.create(model="fast", messages=MESSAGES)
    seen.append((dict(caught.value.response.headers), caught.value.response.content))
    stack.emulator.push_fault(Fault(status=422, body_quotes_key=True))
    with pytest.raises(openai.UnprocessableEntityError) as unprocessable:
        await aclient.chat.completions.create(model="fast", messages=MESSAGES)
    seen.append((dict(unprocessable.value.response.headers), unprocessable.value.response.content))

    for headers, content in seen:
        for value in [*headers.values(), content.decode("utf-8", "replace")]:
            assert stack.clipia_key not in value
            assert "clipia_live_" not in value
            assert team_key not in value
        assert "set-cookie" not in {name.lower() for name in headers}

    assert stack.emulator.requests
    for record in stack.emulator.requests:
        authorizations = [v for k, v in record.headers if k.lower() == "authorization"]
        assert authorizations == [f"Bearer {stack.clipia_key}"], record.path
        if record.path == "/v1/chat/completions" and record.status == 200:
            assert record.key == stack.clipia_key
        for name, value in record.headers:
            assert team_key not in value, name
            assert "cpx_" not in value, name
        assert team_key.encode() not in record.body

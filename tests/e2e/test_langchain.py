"""LangChain's ``ChatOpenAI`` through the gateway to the emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, SecretStr

if TYPE_CHECKING:
    from tests.conftest import Stack

pytestmark = pytest.mark.e2e

CANONICAL = "claude-sonnet-4-6"
PROMPT = "Explain what a gateway does."


class GetWeather(BaseModel):
    """Get the weather forecast for a city."""

    city: str = Field(description="The city name")
    days: int = Field(ge=1, le=7, description="How many days ahead")


def make_chat(stack: Stack, **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=stack.base_url,
        api_key=SecretStr(stack.keys["search"]),
        model="fast",
        max_retries=0,
        **kwargs,  # type: ignore[arg-type]
    )


def merge(chunks: list[Any]) -> AIMessageChunk:
    """Add streamed chunks up the way LangChain does."""
    assert chunks
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert isinstance(merged, AIMessageChunk)
    return merged


def test_invoke(thread_stack: Stack) -> None:
    message = make_chat(thread_stack).invoke(PROMPT)
    assert isinstance(message.content, str)
    assert message.content
    assert message.response_metadata["model_name"] == CANONICAL
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] > 0
    last = thread_stack.chat_requests()[-1]
    assert isinstance(last.json, dict)
    assert last.json["model"] == CANONICAL


def test_stream_concatenates_to_invoke(thread_stack: Stack) -> None:
    chat = make_chat(thread_stack)
    whole = chat.invoke(PROMPT)
    chunks = list(chat.stream(PROMPT))
    assert len(chunks) > 1
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    text = "".join(c.content for c in chunks if isinstance(c.content, str))
    assert text == whole.content
    # The gateway injected include_usage for billing, and hid the usage chunk again.
    last = thread_stack.chat_requests()[-1]
    assert isinstance(last.json, dict)
    assert last.json["stream_options"] == {"include_usage": True}
    assert all(getattr(c, "usage_metadata", None) is None for c in chunks)


def test_stream_usage(thread_stack: Stack) -> None:
    chunks = list(make_chat(thread_stack, stream_usage=True).stream(PROMPT))
    merged = merge(chunks)
    usage = merged.usage_metadata
    assert usage is not None
    record = thread_stack.chat_requests()[-1]
    assert record.generation_id is not None
    bill = thread_stack.emulator.bills[record.generation_id]
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        bill.prompt_tokens,
        bill.completion_tokens,
    )
    assert usage["total_tokens"] == bill.prompt_tokens + bill.completion_tokens


def test_bind_tools(thread_stack: Stack) -> None:
    chat = make_chat(thread_stack).bind_tools([GetWeather])
    message = chat.invoke("What is the weather in Oslo for the next 3 days?")
    assert message.tool_calls
    call = message.tool_calls[0]
    assert call["name"] == "GetWeather"
    parsed = GetWeather.model_validate(call["args"])
    assert 1 <= parsed.days <= 7
    assert call["id"]


def test_bind_tools_stream(thread_stack: Stack) -> None:
    chat = make_chat(thread_stack).bind_tools([GetWeather], tool_choice="GetWeather")
    chunks = list(chat.stream("Weather in Oslo?"))
    merged = merge(chunks)
    assert [c["name"] for c in merged.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(merged.tool_calls[0]["args"])

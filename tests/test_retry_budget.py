"""One retry budget, and timeouts that fit LLMs: the real openai SDK, with its default retries.

Each test counts the requests the emulator (Clipia) received for one application call. The
SDK retries 408/409/429/5xx twice by default, unless the answer says ``x-should-retry: false``;
before, the gateway also retried 429/5xx itself (an upstream 429 or 503 cost 9 upstream
requests) and a slow answer came back as a 504 the SDK retried (3 paid generations).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import openai
import pytest

from clipia_proxy.emulator import Fault
from tests.conftest import Stack

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Hello there"}
]


def sdk(stack: Stack) -> openai.AsyncOpenAI:
    """The SDK as an application uses it: default retries and timeout (600 s)."""
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.keys["search"])


def test_the_sdk_defaults_these_tests_rely_on() -> None:
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:1/v1", api_key="x")
    assert client.max_retries == 2
    assert client.timeout is not None
    assert openai.DEFAULT_TIMEOUT.read == 600


async def test_an_answer_slower_than_the_timeout_is_one_generation(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    """The gateway gives up after the request reached Clipia: 504 with x-should-retry: false."""
    stack = await stacks(upstream={"first_byte_timeout_seconds": 0.3})
    stack.emulator.push_fault(Fault(first_byte_delay=1.0, times=5))
    async with sdk(stack) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-5.5", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(stack.chat_requests()) == 1  # was 3: the SDK retried the 504 twice


@pytest.mark.parametrize(
    ("status", "error"), [(429, openai.RateLimitError), (503, openai.InternalServerError)]
)
async def test_an_upstream_429_or_503_costs_at_most_three_upstream_requests(
    stack: Stack, status: int, error: type[openai.APIStatusError]
) -> None:
    """By default the client's retries are the only ones: 3 upstream requests (was 9)."""
    stack.emulator.push_fault(Fault(status=status, retry_after="0", times=20))
    async with sdk(stack) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model="gpt-5.5", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.response.headers.get("Retry-After") == "0"
    assert len(stack.chat_requests()) == 3
    assert not stack.emulator.bills


async def test_gateway_retries_opted_in_end_the_clients_retries(
    stacks: Callable[..., Awaitable[Stack]],
) -> None:
    """With retry_on_status the gateway retries; its last answer says x-should-retry: false."""
    stack = await stacks(upstream={"retry_on_status": "[429, 503]", "retries": 2})
    stack.emulator.push_fault(Fault(status=429, retry_after="0", times=20))
    async with sdk(stack) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-5.5", messages=MESSAGES)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(stack.chat_requests()) == 3  # the gateway's 1 + 2; the SDK retried nothing


async def test_a_transient_429_is_served_on_the_clients_retry(stack: Stack) -> None:
    stack.emulator.push_fault(Fault(status=429, retry_after="0"))
    async with sdk(stack) as client:
        reply = await client.chat.completions.create(model="gpt-5.5", messages=MESSAGES)
    assert reply.choices
    assert [r.status for r in stack.chat_requests()] == [429, 200]
    assert len(stack.emulator.bills) == 1


def test_the_default_first_byte_timeout_matches_the_sdks_wait() -> None:
    from clipia_proxy.config import AccountingConfig, UpstreamConfig

    assert UpstreamConfig().first_byte_timeout_seconds == 600
    assert UpstreamConfig().retry_on_status == []
    assert AccountingConfig().lease_seconds > UpstreamConfig().first_byte_timeout_seconds

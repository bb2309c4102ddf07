"""What real clients tripped over: each through the HTTP entry point.

A leftover ``X-Api-Key`` next to a valid Bearer key (the openai SDK with ``default_headers``),
the gateway's own 429 with OpenAI's ``x-ratelimit-*`` headers, a 404 for other OpenAI routes that
says what is served, a client's ``X-Request-Id`` echoed, a vision-sized body under the default cap.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import openai
import pytest
from multidict import CIMultiDict

from tests.harness import Stack, start_stack, stop_stack
from tests.http_client import assert_envelope, chat, http, post_chat

TEAMS_WITH_RPM = """
teams:
  - id: search
    keys: [{{id: search-1, sha256: {search}}}]
    models: {{allow: ["gpt-5.5"]}}
    limits: {{rpm: 1}}
  - id: research
    keys: [{{id: research-1, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""


@pytest.fixture
async def rpm_stack() -> AsyncIterator[Stack]:
    made = await start_stack(teams=TEAMS_WITH_RPM)
    try:
        yield made
    finally:
        await stop_stack(made)


@pytest.mark.parametrize("leftover", ["sk-from-another-tool", "clipia_live_not-ours"])
async def test_openai_sdk_with_a_leftover_x_api_key_is_served(stack: Stack, leftover: str) -> None:
    """Authorization wins: the SDK's default_headers X-Api-Key neither refuses nor leaks."""
    client = openai.AsyncOpenAI(
        base_url=stack.base_url,
        api_key=stack.keys["search"],
        default_headers={"X-Api-Key": leftover},
        max_retries=0,
    )
    try:
        answer = await client.chat.completions.create(
            model="gpt-5.5", messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        await client.close()
    assert answer.choices[0].message.content
    forwarded = CIMultiDict(stack.chat_requests()[-1].headers)
    assert forwarded.getall("Authorization") == [f"Bearer {stack.clipia_key}"]
    assert "X-Api-Key" not in forwarded
    assert leftover not in str(list(forwarded.items()))


async def test_another_teams_key_in_x_api_key_does_not_change_the_team(stack: Stack) -> None:
    reply = await http(
        stack,
        "GET",
        "/v1/key",
        headers={**stack.auth("search"), "X-Api-Key": stack.keys["research"]},
    )
    assert reply.status == 200
    assert reply.json()["data"]["team"] == "search"


async def test_an_invalid_bearer_key_is_not_rescued_by_x_api_key(stack: Stack) -> None:
    reply = await http(
        stack,
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": "Bearer cpx_wrong", "X-Api-Key": stack.keys["search"]},
        body=chat(),
    )
    assert_envelope(reply, 401, "invalid_api_key")


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings", "/v1/completions"])
async def test_other_openai_routes_say_what_is_served(stack: Stack, path: str) -> None:
    reply = await http(stack, "POST", path, headers=stack.auth(), body=chat())
    error = assert_envelope(reply, 404, "not_found")
    assert "chat completions only" in error["message"]
    assert path in error["message"]


async def test_openai_sdk_embeddings_gets_the_clear_404(stack: Stack) -> None:
    client = openai.AsyncOpenAI(
        base_url=stack.base_url, api_key=stack.keys["search"], max_retries=0
    )
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.embeddings.create(model="gpt-5.5", input="hi")
    finally:
        await client.close()
    assert "chat completions only" in str(caught.value)


async def test_own_429_carries_ratelimit_headers(rpm_stack: Stack) -> None:
    first = await post_chat(rpm_stack, chat())
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    # Sliding 60-second windows: whole again a minute after this request.
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    refused = await post_chat(rpm_stack, chat())
    assert_envelope(refused, 429, "rate_limit_exceeded")
    assert refused.headers["x-ratelimit-limit-requests"] == "1"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    reset = re.fullmatch(r"(?:(\d+)m)?(\d+)s", refused.headers["x-ratelimit-reset-requests"])
    assert reset is not None
    seconds = int(reset[1] or 0) * 60 + int(reset[2])
    assert seconds == int(refused.headers["Retry-After"]) >= 1


async def test_openai_sdk_sees_the_client_request_id_it_sent(
    stack: Stack, log_capture: list[str]
) -> None:
    client = openai.AsyncOpenAI(
        base_url=stack.base_url,
        api_key=stack.keys["search"],
        default_headers={"X-Request-Id": "app-trace-42"},
        max_retries=0,
    )
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=[{"role": "user", "content": "hi"}]
        )
        stream = await client.chat.completions.with_raw_response.create(
            model="gpt-5.5", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream.parse():
            pass
    finally:
        await client.close()
    ids = []
    for response in (raw, stream):
        assert response.headers["x-request-id"] == "app-trace-42"
        ids.append(response.headers["x-clipia-proxy-request-id"])
    assert "app-trace-42" not in ids
    assert stack.chat_requests()[-1].request_id == ids[-1]
    access = [msgspec.json.decode(line) for line in log_capture if '"event":"access"' in line]
    assert {(a["request_id"], a["client_request_id"]) for a in access} >= {
        (ids[0], "app-trace-42"),
        (ids[1], "app-trace-42"),
    }


async def test_a_vision_sized_body_is_served_under_the_default_cap(stack: Stack) -> None:
    """A 5 MB base64 image: the default server.max_body_bytes (32 MiB) admits it."""
    assert stack.config.server.max_body_bytes == 32 * 1024 * 1024
    image = base64.b64encode(b"\x89PNG" + bytes(range(256)) * 15_000).decode()
    assert len(image) > 5_000_000
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    body = chat(messages=[{"role": "user", "content": content}])
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.base_url}/chat/completions",
            headers={**stack.auth(), "Content-Type": "application/json"},
            data=io.BytesIO(body),
        ) as response,
    ):
        assert response.status == 200, (await response.read())[:200]

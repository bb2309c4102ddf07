"""The canary scan: no secret in any answer or log line (the class of leak of CVE-2024-9606).

One stack with fresh canary secrets is driven through success and every error path the
gateway has, at DEBUG. Every response header and body and every log line is captured; neither
the Clipia key nor any team key, nor any 8-character substring of one, may occur in any of
them. Team keys must never reach the upstream either.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from clipia_proxy.auth import hash_key
from clipia_proxy.emulator import Fault
from tests.harness import Stack, start_stack, stop_stack
from tests.http_client import (
    Reply,
    chat,
    http,
    raw_http,
    raw_request,
)

PUBLIC_PREFIXES = ("clipia_live_", "clipia_test_", "cpx_")
REFLECTED: list[Reply] = []
"""Replies that quote a client-chosen model name which was itself a secret (see below)."""


def canaries(secret: str, width: int = 8) -> set[str]:
    """Every ``width``-character substring of ``secret`` that could only come from it.

    Left out: pieces of a public key prefix, and runs of digits (timestamps, durations and
    token counts fill logs and metrics with digits, so an 8-digit run matches by chance).
    """
    found = {secret[i : i + width] for i in range(len(secret) - width + 1)}
    return {
        c for c in found if not c.isdigit() and not any(c in prefix for prefix in PUBLIC_PREFIXES)
    }


def render(reply: Reply) -> str:
    head = "\n".join(f"{name}: {value}" for name, value in reply.headers.items())
    return f"{reply.status}\n{head}\n\n{reply.body.decode('latin-1')}"


def hits(texts: list[str], secrets: dict[str, str]) -> list[str]:
    found: list[str] = []
    for label, secret in secrets.items():
        # A key hash is hex, like request and generation ids: 8 hex characters would match
        # thousands of random ids now and then, so a hash is sought by 16-character pieces.
        pieces = canaries(secret, 16 if label.startswith("hash") else 8)
        assert len(pieces) >= 20
        for index, text in enumerate(texts):
            for piece in pieces:
                if piece in text:
                    found.append(f"{label}[{piece}] in #{index}: {text[:160]!r}")
                    break
    return found


@pytest.fixture
async def canary_stack() -> AsyncIterator[Stack]:
    made = await start_stack(server={"max_body_bytes": 4096})
    try:
        yield made
    finally:
        await stop_stack(made)


async def drive_everything(stack: Stack) -> list[Reply]:
    """Every path: success, each refusal, each upstream failure. Returns every reply."""
    search = stack.keys["search"]
    auth = stack.auth()
    replies: list[Reply] = []
    REFLECTED.clear()

    async def post(
        body: bytes, headers: dict[str, str] | None = None, team: str = "search"
    ) -> Reply:
        reply = await http(
            stack,
            "POST",
            "/v1/chat/completions",
            headers=stack.auth(team) if headers is None else headers,
            body=body,
        )
        replies.append(reply)
        return reply

    async def get(path: str, headers: dict[str, str] | None = None) -> Reply:
        reply = await http(stack, "GET", path, headers=auth if headers is None else headers)
        replies.append(reply)
        return reply

    # Success paths.
    ok = await post(chat())
    assert ok.status == 200
    assert (await post(chat("fast", stream=True))).status == 200
    assert (await post(chat(stream=True, stream_options={"include_usage": True}))).status == 200
    assert (await get("/v1/models")).status == 200
    assert (await get("/v1/models/gpt-5.5")).status == 200
    assert (await get("/v1/key")).status == 200
    assert (await get(f"/v1/generation?id={ok.json()['id']}")).status == 200

    # 401: missing, wrong, near-miss, other channels, the Clipia key itself.
    near_miss = search[:-1] + ("A" if search[-1] != "A" else "B")
    for headers in (
        {},
        {"Authorization": f"Bearer {near_miss}"},
        {"Authorization": f"Bearer {search}x"},
        {"Authorization": f"Basic {base64.b64encode(f'{search}:'.encode()).decode()}"},
        {"Cookie": f"api_key={search}"},
        {"Authorization": f"Bearer {stack.clipia_key}"},
        # Authorization wins: a valid key in X-Api-Key does not rescue a wrong Bearer key.
        {"Authorization": f"Bearer {near_miss}", "X-Api-Key": search},
        {"Authorization": f"Bearer {hash_key(search)}"},
    ):
        assert (await post(chat(), headers=headers)).status == 401
    assert (
        await http(stack, "POST", f"/v1/chat/completions?api_key={search}", body=chat())
    ).status == 401
    assert (await get(f"/v1/models?key={search}", headers={})).status == 401

    # 400, 403, 404, 405, 413, 415.
    assert (await post(chat("claude-sonnet-4-5"))).status == 403
    # A secret the client itself puts in the model name is echoed back to that client only
    # (the message quotes the requested model); these replies are scanned apart, see below.
    for model in (f"gpt-5.5 {search}", stack.clipia_key):
        reflected = await post(chat(model))
        replies.pop()
        assert reflected.status in {403, 404}
        REFLECTED.append(reflected)
    reflected = await http(stack, "GET", f"/v1/models/{search}", headers=auth)
    assert reflected.status == 404
    REFLECTED.append(reflected)
    assert (await post(chat("claude-sonnet-9"))).status == 404
    assert (await get("/v1/models/claude-opus-4-8")).status == 404
    assert (await get("/v1/nope")).status == 404
    assert (await get(f"/v1/generation?id={search}")).status == 404
    assert (await get("/v1/chat/completions")).status == 405
    assert (await post(b"{not json")).status == 400
    assert (await post(b'{"model":"' + search.encode() + b'",}')).status == 400
    assert (await post(chat(api_key=stack.clipia_key))).status == 400
    assert (await post(chat(max_tokens=5000), team="research")).status == 400
    assert (await post(chat(padding="x" * 5000))).status == 413
    reply = await http(
        stack, "POST", "/v1/chat/completions", headers=auth, body=chat(), content_type="text/plain"
    )
    replies.append(reply)
    assert reply.status == 415

    # Parser-level refusal with a valid key on the connection.
    parser = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [
                ("Authorization", f"Bearer {search}"),
                ("Content-Type", "application/json"),
                ("Content-Length", "1"),
            ],
            chat(),
        ),
    )
    replies.append(parser)
    assert parser.status == 400

    # Upstream failures.
    stack.emulator.push_fault(Fault(status=429, retry_after="0"))
    assert (await post(chat())).status == 429
    stack.emulator.push_fault(Fault(status=500, retry_after="0"))
    assert (await post(chat())).status == 500
    stack.emulator.push_fault(Fault(status=500, body_quotes_key=True, retry_after="0"))
    quoted = await post(chat())
    assert quoted.status == 500
    stack.emulator.push_fault(Fault(status=400, body_quotes_key=True))
    assert (await post(chat())).status == 400
    stack.emulator.push_fault(Fault(non_json_body=True, retry_after="0"))
    assert (await post(chat())).status == 502
    for status in (401, 403):
        stack.emulator.push_fault(Fault(status=status, body_quotes_key=True, times=3))
        attempts = len(stack.chat_requests())
        rejected = await post(chat())
        assert rejected.status == 502, rejected.body
        assert rejected.json()["error"]["code"] == "upstream_unavailable"
        assert b"Request failed for key" not in rejected.body  # Clipia's body is never relayed
        assert len(stack.chat_requests()) == attempts + 1  # our key was refused: no retry
        stack.emulator.reset()
    stack.emulator.push_fault(Fault(redirect_to="http://127.0.0.1:1/", times=3))
    attempts = len(stack.chat_requests())
    redirected = await post(chat())
    assert len(stack.chat_requests()) == attempts + 1  # never followed, never retried
    stack.emulator.reset()
    assert redirected.status == 502
    assert redirected.json()["error"]["code"] == "upstream_unavailable"
    assert "Location" not in redirected.headers
    stack.emulator.push_fault(Fault(reset_after_chunks=1))
    replies.append(
        await http(stack, "POST", "/v1/chat/completions", headers=auth, body=chat(stream=True))
    )
    stack.emulator.push_fault(Fault(close_before_usage=True))
    replies.append(
        await http(stack, "POST", "/v1/chat/completions", headers=auth, body=chat(stream=True))
    )
    assert stack.emulator.pending_faults == 0
    return replies


async def test_canary_scan_over_every_response_and_log_line(
    canary_stack: Stack, log_capture: list[str]
) -> None:
    stack = canary_stack
    replies = await drive_everything(stack)
    assert len(replies) >= 35
    assert len(log_capture) > 40  # access lines at least, plus warnings and errors
    secrets = {"clipia": stack.clipia_key, **{f"team:{k}": v for k, v in stack.keys.items()}}
    texts = [render(reply) for reply in replies] + log_capture
    assert hits(texts, secrets) == []
    # Hashes of team keys are as good as keys for a lookup table: never shown either.
    hashes = {f"hash:{k}": hash_key(v) for k, v in stack.keys.items()}
    assert hits(texts, hashes) == []
    # Pinned: a model name is quoted back to the client that sent it (and nowhere else: the
    # log lines above were scanned). The gateway adds nothing of its own to such a reply.
    assert len(REFLECTED) >= 3
    for reply in REFLECTED:
        assert reply.json()["error"]["code"] in {"model_not_allowed", "model_not_found"}
        others = {k: v for k, v in secrets.items() if v not in reply.json()["error"]["message"]}
        assert hits([render(reply)], {**others, **hashes}) == []
    REFLECTED.clear()


async def test_team_keys_never_reach_the_upstream(canary_stack: Stack) -> None:
    stack = canary_stack
    await drive_everything(stack)
    assert stack.emulator.requests
    upstream_texts = []
    for record in stack.emulator.requests:
        authorizations = [v for k, v in record.headers if k.lower() == "authorization"]
        assert authorizations == [f"Bearer {stack.clipia_key}"], authorizations
        upstream_texts.append(
            "\n".join(f"{k}: {v}" for k, v in record.headers)
            + record.query_string
            + record.body.decode("latin-1")
        )
    team_secrets = {f"team:{k}": v for k, v in stack.keys.items()}
    found = hits(upstream_texts, team_secrets)
    # The one allowed exception: a model name the client chose is data, refused before sending.
    assert found == []


async def test_clipia_key_only_in_the_authorization_header_upstream(canary_stack: Stack) -> None:
    """The key lives in one header, never in a URL, a body or another header (litellm#11264)."""
    stack = canary_stack
    await drive_everything(stack)
    for record in stack.emulator.requests:
        assert stack.clipia_key not in record.query_string
        assert stack.clipia_key not in record.path
        assert stack.clipia_key.encode() not in record.body
        others = [v for k, v in record.headers if k.lower() != "authorization"]
        assert not any(stack.clipia_key in v for v in others)

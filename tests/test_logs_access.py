"""One JSON access line per request (docs/architecture.md §5.7), nothing secret in logs or metrics.

The access line is matched to its request by ``X-Request-Id`` and checked field by field
against what the client and the emulator saw. The canary scan drives fresh secrets (the Clipia
key, every team key) through success and every error path at DEBUG, then scans every log line,
every ``/metrics`` line and every response for each secret and each 8-character substring of
it — and for the prompt, the completion and a header value.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import aiohttp
import msgspec
import pytest
from multidict import CIMultiDict

from clipia_proxy.auth import hash_key
from clipia_proxy.emulator import Fault
from clipia_proxy.keys import QUOTAS
from tests.harness import Stack, start_stack, stop_stack, wait_settled
from tests.http_client import Reply
from tests.test_metrics import TEAM_IDS, TEAMS
from tests.test_secrets import drive_everything, hits, render

CHAT: Final = "/v1/chat/completions"
ACCESS_FIELDS: Final = frozenset(
    {
        "request_id",
        "team",
        "key_id",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "usage_source",
        "duration_ms",
        "ttft_ms",
        "outcome",
    }
)


def access_lines(lines: list[str]) -> list[dict[str, Any]]:
    decoded = [msgspec.json.decode(line) for line in lines]
    return [entry for entry in decoded if entry["logger"] == "clipia_proxy.access"]


@dataclass
class Sent:
    """One request and what came back."""

    label: str
    status: int
    request_id: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class Client:
    """Sends requests to a stack and remembers every reply (for the scans)."""

    def __init__(self, stack: Stack, session: aiohttp.ClientSession) -> None:
        self.stack, self.session = stack, session
        self.sent: list[Sent] = []

    async def send(
        self,
        label: str,
        method: str,
        path: str,
        *,
        team: str | None = "search",
        json: dict[str, Any] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Sent:
        merged = {**(self.stack.auth(team) if team is not None else {}), **(headers or {})}
        if data is not None:
            merged.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method,
            f"http://127.0.0.1:{self.stack.running.port}{path}",
            headers=merged,
            json=json,
            data=data,
        ) as reply:
            body = await reply.read()
            sent = Sent(
                label, reply.status, reply.headers["X-Request-Id"], body, dict(reply.headers)
            )
        self.sent.append(sent)
        return sent

    async def disconnect(self, label: str, body: dict[str, Any], team: str = "search") -> Sent:
        """Start a stream, read its first bytes, then hang up."""
        async with self.session.post(
            f"{self.stack.base_url}/chat/completions", headers=self.stack.auth(team), json=body
        ) as reply:
            assert reply.status == 200
            first = await reply.content.readany()
            sent = Sent(
                label, reply.status, reply.headers["X-Request-Id"], first, dict(reply.headers)
            )
            reply.close()
        self.sent.append(sent)
        return sent


def chat_body(model: str = "gpt-5.5", content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


# --------------------------------------------------------------------------- access lines


async def test_one_access_line_per_request_with_design_fields(
    stack: Stack, log_capture: list[str]
) -> None:
    async with aiohttp.ClientSession() as session:
        c = Client(stack, session)
        ok = await c.send("ok", "POST", CHAT, json=chat_body(max_tokens=20))
        streamed = await c.send("stream", "POST", CHAT, json=chat_body("fast", stream=True))
        own_usage = await c.send(
            "stream_usage",
            "POST",
            CHAT,
            json=chat_body(stream=True, stream_options={"include_usage": True}),
        )
        stack.emulator.push_fault(Fault(chunk_gap=0.05))
        gone = await c.disconnect("disconnect", chat_body(stream=True, max_tokens=50))
        stack.emulator.push_fault(Fault(status=500, retry_after="0", times=3))
        failed = await c.send("upstream_500", "POST", CHAT, json=chat_body())
        denied = await c.send("denied", "POST", CHAT, json=chat_body("claude-sonnet-4-5"))
        unknown = await c.send("no_key", "POST", CHAT, team=None, json=chat_body())
        bad = await c.send("bad_json", "POST", CHAT, data=b"{nope")
        capped = await c.send("cap", "POST", CHAT, team="research", json=chat_body(max_tokens=5000))
        nowhere = await c.send("no_route", "GET", "/v1/nope")
        listed = await c.send("models", "GET", "/v1/models")
        await wait_settled(stack)
    statuses = {s.label: s.status for s in c.sent}
    assert statuses == {
        "ok": 200,
        "stream": 200,
        "stream_usage": 200,
        "disconnect": 200,
        "upstream_500": 500,
        "denied": 403,
        "no_key": 401,
        "bad_json": 400,
        "cap": 400,
        "no_route": 404,
        "models": 200,
    }

    lines = access_lines(log_capture)
    per_id = Counter(line["request_id"] for line in lines)
    assert per_id == Counter(s.request_id for s in c.sent)  # exactly one line per request
    assert all(count == 1 for count in per_id.values())
    by_id = {line["request_id"]: line for line in lines}
    for line in lines:
        assert line["msg"] == "access"
        assert line["level"] == "info"
        assert line["event"] == "access"
        assert line.keys() >= ACCESS_FIELDS, ACCESS_FIELDS - line.keys()
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= 0

    bills = {bill.request_id: bill for bill in stack.emulator.bills.values()}

    def settled_line(sent: Sent, *, model: str, source: str, outcome: str) -> dict[str, Any]:
        line = by_id[sent.request_id]
        bill = bills[sent.request_id]
        assert line["team"] == "search"
        assert line["key_id"] == "search-1"
        assert line["model"] == model == bill.model
        assert line["status"] == 200
        assert line["prompt_tokens"] == bill.prompt_tokens
        assert line["completion_tokens"] == bill.completion_tokens
        assert Decimal(line["cost"]) == bill.cost
        assert line["usage_source"] == source
        assert line["outcome"] == outcome
        assert line["ttft_ms"] is not None
        assert 0 <= line["ttft_ms"] <= line["duration_ms"]
        assert line["upstream_id"] == bill.id
        return line

    line = settled_line(ok, model="gpt-5.5", source="response", outcome="completed")
    assert line["stream"] is False
    assert ok.json()["usage"]["completion_tokens"] == line["completion_tokens"]
    line = settled_line(streamed, model="claude-sonnet-4-6", source="stream", outcome="completed")
    assert line["stream"] is True
    settled_line(own_usage, model="gpt-5.5", source="stream", outcome="completed")
    # on_disconnect: cancel — the upstream was closed once its id was known; the cost is asked
    # of /v1/generation after the access line (the ledger has it, not the line).
    line = by_id[gone.request_id]
    bill = bills[gone.request_id]
    assert (line["status"], line["outcome"], line["upstream_id"]) == (
        200,
        "client_disconnect",
        bill.id,
    )
    assert (line["usage_source"], line["cost"]) == (None, None)

    line = by_id[failed.request_id]
    assert (line["team"], line["key_id"], line["model"]) == ("search", "search-1", "gpt-5.5")
    assert (line["status"], line["outcome"], line["ttft_ms"]) == (500, "upstream_error", None)
    assert line["cost"] is None
    assert line["usage_source"] is None

    for sent, team, key_id, model in (
        (denied, "search", "search-1", "claude-sonnet-4-5"),  # a catalog id, denied to it
        (unknown, "unknown", None, None),
        (bad, "search", "search-1", None),
        (capped, "research", "research-1", "gpt-5.5"),
        (nowhere, "search", "search-1", None),
    ):
        line = by_id[sent.request_id]
        assert (line["team"], line["key_id"], line["model"]) == (team, key_id, model), sent.label
        assert line["status"] == sent.status
        assert line["prompt_tokens"] is None
        assert line["completion_tokens"] is None
        assert line["cost"] is None
        assert line["usage_source"] is None
        assert line["ttft_ms"] is None
        assert line["outcome"] is None
    assert by_id[nowhere.request_id]["route"] == "unmatched"
    assert by_id[listed.request_id]["route"] == "/v1/models"
    assert by_id[ok.request_id]["route"] == CHAT
    assert by_id[ok.request_id]["method"] == "POST"


async def test_access_line_outcome_for_upstream_refusal(
    stack: Stack, log_capture: list[str]
) -> None:
    async with aiohttp.ClientSession() as session:
        c = Client(stack, session)
        stack.emulator.push_fault(Fault(status=401, times=3))
        refused = await c.send("refused", "POST", CHAT, json=chat_body())
        await wait_settled(stack)
    assert refused.status == 502
    (line,) = [x for x in access_lines(log_capture) if x["request_id"] == refused.request_id]
    assert line["outcome"] == "upstream_error"


async def test_access_line_and_ledger_record_tell_the_same_story(
    stack: Stack, log_capture: list[str]
) -> None:
    """One record per request: the line's outcome and upstream id are what the ledger settled."""
    async with aiohttp.ClientSession() as session:
        c = Client(stack, session)
        await c.send("ok", "POST", CHAT, json=chat_body(max_tokens=20))
        await c.send("stream", "POST", CHAT, json=chat_body(stream=True, max_tokens=20))
        stack.emulator.push_fault(Fault(chunk_gap=0.05))
        await c.disconnect("disconnect", chat_body(stream=True, max_tokens=50))
        stack.emulator.push_fault(Fault(status=500, retry_after="0"))
        await c.send("upstream_500", "POST", CHAT, json=chat_body())
        stack.emulator.push_fault(Fault(status=401))
        await c.send("refused", "POST", CHAT, json=chat_body())
        stack.emulator.push_fault(Fault(reset_after_chunks=1))
        await c.send("reset", "POST", CHAT, json=chat_body(stream=True))
        await wait_settled(stack)
    by_id = {line["request_id"]: line for line in access_lines(log_capture)}
    store = stack.running.app[QUOTAS].store
    outcomes = {}
    for sent in c.sent:
        line, record = by_id[sent.request_id], await store.record(sent.request_id)
        assert record is not None, sent.label
        assert record.outcome is not None, sent.label
        assert (line["outcome"], line["upstream_id"]) == (
            record.outcome.value,
            record.upstream_id,
        ), sent.label
        if line["usage_source"] is not None:  # the upstream's own figures: settled as reported
            assert line["usage_source"] == record.usage_source, sent.label
            assert Decimal(line["cost"]) == Decimal(record.cost) / 1_000_000, sent.label
            assert (line["prompt_tokens"], line["completion_tokens"]) == (
                record.prompt_tokens,
                record.completion_tokens,
            ), sent.label
        outcomes[sent.label] = line["outcome"]
    assert outcomes == {
        "ok": "completed",
        "stream": "completed",
        "disconnect": "client_disconnect",
        "upstream_500": "upstream_error",
        "refused": "upstream_error",
        "reset": "upstream_error",
    }


# --------------------------------------------------------------------------- canary scan


def _prompt_canary() -> str:
    return "PROMPT" + secrets.token_hex(12)


def _windows(text: str, size: int = 24) -> Iterator[str]:
    words = text.strip()
    for start in range(0, max(len(words) - size, 0) + 1, 4):
        yield words[start : start + size]


async def scrape_text(stack: Stack) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{stack.admin_url}/metrics") as reply,
    ):
        return await reply.text()


async def drive_quota_paths(stack: Stack, prompt: str, header_value: str) -> list[Sent]:
    """Success, every quota refusal, shadow, disconnect and upstream errors, with canaries."""
    extra = {"X-Canary": header_value, "User-Agent": header_value}
    async with aiohttp.ClientSession() as session:
        c = Client(stack, session)
        body = chat_body(content=prompt, max_tokens=20)
        assert (await c.send("ok", "POST", CHAT, json=body, headers=extra)).status == 200
        assert (await c.send("broke", "POST", CHAT, team="broke", json=body)).status == 402
        assert (await c.send("rpm", "POST", CHAT, team="rpm", json=body)).status == 200
        assert (await c.send("rpm", "POST", CHAT, team="rpm", json=body)).status == 429
        assert (await c.send("tpm", "POST", CHAT, team="tpm", json=body)).status == 429
        assert (await c.send("shadow", "POST", CHAT, team="shadow", json=body)).status == 200
        stack.emulator.hold = asyncio.Event()
        billed = len(stack.emulator.bills)
        async with asyncio.TaskGroup() as group:
            held = group.create_task(c.send("held", "POST", CHAT, team="conc", json=body))
            async with asyncio.timeout(5):
                while len(stack.emulator.bills) == billed:  # noqa: ASYNC110 - emulator state
                    await asyncio.sleep(0.005)
            refused = await c.send("conc", "POST", CHAT, team="conc", json=body, headers=extra)
            assert refused.status == 429
            stack.emulator.hold.set()
        assert held.result().status == 200
        stack.emulator.hold = None
        stack.emulator.push_fault(Fault(chunk_gap=0.05))
        await c.disconnect("disconnect", chat_body(content=prompt, stream=True, max_tokens=50))
        # One attempt each: an answer that reached Clipia is not retried (upstream.retries
        # covers only what never did), so a fault queued for more would answer the next one.
        stack.emulator.push_fault(Fault(status=500, body_quotes_key=True, retry_after="0"))
        assert (await c.send("500", "POST", CHAT, json=body, headers=extra)).status == 500
        stack.emulator.push_fault(Fault(status=429, retry_after="0"))
        assert (await c.send("429", "POST", CHAT, json=body)).status == 429
        stack.emulator.push_fault(Fault(status=403, body_quotes_key=True))
        assert (await c.send("403", "POST", CHAT, json=body)).status == 502
        stack.emulator.reset()
        stack.emulator.push_fault(Fault(reset_after_chunks=1))
        assert (
            await c.send("reset", "POST", CHAT, json=chat_body(content=prompt, stream=True))
        ).status == 200
        await wait_settled(stack)
    return c.sent


def as_reply(sent: Sent) -> Reply:
    return Reply(sent.status, CIMultiDict(sent.headers), sent.body)


async def test_canaries_never_reach_logs_metrics_or_responses(
    log_capture: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = _prompt_canary()
    header_value = "HDR" + secrets.token_hex(12)
    everything = await start_stack(server={"max_body_bytes": 4096})
    quotas = await start_stack(teams=TEAMS, team_ids=TEAM_IDS)
    monkeypatch.setenv("CLIPIA_TEST_DEAD_REDIS", "redis://127.0.0.1:1/0")
    dead = await start_stack(
        teams=TEAMS,
        team_ids=TEAM_IDS,
        store="{backend: redis, redis_url_env: CLIPIA_TEST_DEAD_REDIS, timeout_seconds: 0.5}"
        "\nledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_DEAD_DSN}",
    )
    stacks = (everything, quotas, dead)
    try:
        replies = await drive_everything(everything)
        await wait_settled(everything)
        sent = await drive_quota_paths(quotas, prompt, header_value)
        async with aiohttp.ClientSession() as session:
            c = Client(dead, session)
            unavailable = await c.send("store", "POST", CHAT, json=chat_body(content=prompt))
            assert unavailable.status == 503
            sent += c.sent
        metrics = [await scrape_text(s) for s in stacks]
    finally:
        for s in stacks:
            with contextlib.suppress(Exception):
                await stop_stack(s)

    assert len(log_capture) > 60
    completions = [
        msgspec.json.decode(s.body)["choices"][0]["message"]["content"]
        for s in sent
        if s.label in {"ok", "shadow", "held"}
    ]
    assert all(len(text) >= 24 for text in completions)

    response_texts = [render(r) for r in replies] + [render(as_reply(s)) for s in sent]
    metric_lines = [line for text in metrics for line in text.splitlines()]
    assert len(metric_lines) > 300
    scanned = log_capture + metric_lines + response_texts
    secret_values: dict[str, str] = {}
    for index, s in enumerate(stacks):
        secret_values[f"clipia#{index}"] = s.clipia_key
        for team, key in s.keys.items():
            secret_values[f"team#{index}:{team}"] = key
            secret_values[f"hash#{index}:{team}"] = hash_key(key)
    assert hits(scanned, secret_values) == []

    # Never a prompt, a completion or a header value in a log line or a metric.
    private = log_capture + metric_lines
    assert not [line for line in private if prompt in line]
    assert not [line for line in private if header_value in line]
    for text in completions:
        for window in _windows(text):
            assert not [line for line in private if window in line], window
    # Every log line is one JSON object.
    for line in log_capture:
        assert isinstance(msgspec.json.decode(line), dict)

"""No request can create a metric series (labels only from config or small enums).

10,000 requests through HTTP — random model names, random and bogus keys, random paths, query
strings and methods, plus a few real generations — are sent in two halves of the same shape.
The second half, with all-new random values, must not add a single series, and every label
value must come from the config, the catalog, the gateway's routes or a small enum, never a
key, a request id or a raw path.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from clipia_proxy.keys import CATALOG
from clipia_proxy.metrics import REJECTION_REASONS, ROUTES, STREAM_REASONS, WITHHELD_REASONS
from clipia_proxy.quotas.model import UsageSource
from tests.conftest import Stack, wait_settled

TOTAL: Final = 10_000
CONCURRENCY: Final = 50
CHAT: Final = "/v1/chat/completions"
HELLO: Final = [{"role": "user", "content": "hi"}]
PREFIX: Final = "clipia_proxy_"


@dataclass(frozen=True)
class Planned:
    """One request to send and the status it must get."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    status: int


def _json(model: str, **extra: object) -> bytes:
    return msgspec.json.encode({"model": model, "messages": HELLO, "max_tokens": 5, **extra})


def plan(index: int, stack: Stack, tokens: list[str]) -> Planned:
    """The request of number ``index``: its kind cycles, its random values are all new."""
    token = secrets.token_hex(8)
    tokens.append(token)
    search, research = stack.auth("search"), stack.auth("research")
    json_headers = {"Content-Type": "application/json"}
    if index % 500 == 0:  # a few real generations, streamed or not
        body = _json("gpt-5.5", stream=index % 1000 == 0)
        return Planned("POST", CHAT, {**research, **json_headers}, body, 200)
    kinds: list[Callable[[], Planned]] = [
        # Unknown model, for a team with an allow list (403) and one that allows "*" (404).
        lambda: Planned("POST", CHAT, {**search, **json_headers}, _json(f"m-{token}"), 403),
        lambda: Planned("POST", CHAT, {**research, **json_headers}, _json(f"m/{token}"), 404),
        lambda: Planned(
            "POST", CHAT, {**research, **json_headers}, _json(f"claude-opus-{token}"), 403
        ),
        # Bogus keys: team-key shaped, Clipia-key shaped, random.
        lambda: Planned(
            "POST",
            CHAT,
            {"Authorization": f"Bearer cpx_{token}{token}{token}", **json_headers},
            _json("gpt-5.5"),
            401,
        ),
        lambda: Planned(
            "POST",
            CHAT,
            {"Authorization": f"Bearer clipia_live_{token}{token}", **json_headers},
            _json("gpt-5.5"),
            401,
        ),
        lambda: Planned("GET", f"/v1/models?key={token}", {"Authorization": token}, None, 401),
        # Random paths, with and without a key, and with odd shapes.
        lambda: Planned("GET", f"/v1/{token}", search, None, 404),
        lambda: Planned("POST", f"/{token}/chat/completions?x={token}", {}, None, 401),
        lambda: Planned("GET", f"/v1/models/{token}", research, None, 404),
        lambda: Planned("GET", f"/v1/models/{token}/{token}", research, None, 404),
        lambda: Planned("GET", f"{CHAT}/{token}", search, None, 404),
        lambda: Planned("GET", f"/v1/generation?id={token}", search, None, 404),
        lambda: Planned("DELETE", f"/v1/models?{token}", search, None, 405),
        lambda: Planned("POST", CHAT, {**search, **json_headers}, b"{" + token.encode(), 400),
    ]
    return kinds[index % len(kinds)]()


@dataclass
class Outcome:
    statuses: Counter[int]
    mismatches: list[str]
    request_ids: set[str]


async def send_all(
    stack: Stack, session: aiohttp.ClientSession, indices: range, tokens: list[str]
) -> Outcome:
    base = f"http://127.0.0.1:{stack.running.port}"
    outcome = Outcome(Counter(), [], set())
    numbers = iter(indices)

    async def worker() -> None:
        for index in numbers:
            planned = plan(index, stack, tokens)
            async with session.request(
                planned.method,
                base + planned.path,
                headers={**planned.headers, "X-Request-Id": f"client-{tokens[-1]}"},
                data=planned.body,
            ) as reply:
                await reply.read()
                outcome.statuses[reply.status] += 1
                outcome.request_ids.add(reply.headers.get("X-Request-Id", ""))
                if reply.status != planned.status:
                    outcome.mismatches.append(
                        f"#{index} {planned.method} {planned.path}: {reply.status}"
                    )

    async with asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(worker())
    return outcome


Series = dict[str, set[frozenset[tuple[str, str]]]]


async def series(stack: Stack, session: aiohttp.ClientSession) -> tuple[Series, str]:
    async with session.get(f"{stack.admin_url}/metrics") as reply:
        text = await reply.text()
    found: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).add(frozenset(sample.labels.items()))
    return found, text


async def test_random_traffic_creates_no_series(stack: Stack) -> None:
    tokens: list[str] = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        before, _ = await series(stack, session)
        first = await send_all(stack, session, range(TOTAL // 2), tokens)
        await wait_settled(stack)
        middle, _ = await series(stack, session)
        second = await send_all(stack, session, range(TOTAL // 2, TOTAL), tokens)
        await wait_settled(stack)
        after, text = await series(stack, session)

    assert first.mismatches == []
    assert second.mismatches == []
    assert first.statuses.total() + second.statuses.total() == TOTAL
    assert len(tokens) == TOTAL
    assert len(stack.chat_requests()) == TOTAL // 500  # refusals never reached the upstream

    # The second half, all new random values, added no series to any family.
    assert {name: len(s) for name, s in after.items()} == {
        name: len(s) for name, s in middle.items()
    }
    assert after == middle
    # The families configured up front existed before any traffic.
    for name in (
        PREFIX + "inflight_requests",
        PREFIX + "rejections_total",
        PREFIX + "stream_terminations_total",
    ):
        assert before[name] <= after[name], name
        # Beyond them, only the unauthenticated caller's series appear (``team="unknown"``).
        assert all(("team", "unknown") in labels for labels in after[name] - before[name]), name

    # Every label value comes from a bounded domain.
    chat_ids = stack.running.app[CATALOG].model_ids()
    teams = {team.id for team in stack.config.teams}
    domains: dict[str, set[str]] = {
        "team": teams | {"unknown"},
        "model": set(chat_ids) | {"other"},
        "route": set(ROUTES) | {"other"},
        "reason": set(REJECTION_REASONS) | set(STREAM_REASONS) | set(WITHHELD_REASONS),
        "source": {source.value for source in UsageSource},
        "stream": {"true", "false"},
        "type": {"prompt", "completion"},
        "environment": {"live", "test"},
        "result": {"success", "error", "match", "corrected", "unavailable"},
        "on_error": {"fail_closed", "fail_open"},
        "period": {"day", "week", "month"},
        "port": {"data", "admin"},
    }
    values: set[str] = set()
    for name, label_sets in after.items():
        for labels in label_sets:
            for label, value in labels:
                values.add(value)
                if label == "code":
                    assert value.isdigit() or value in {"connect_error", "timeout", "error"}
                    assert len(value) <= 13
                elif label == "le":
                    float(value)
                elif label == "version":
                    assert name == PREFIX + "build_info"
                else:
                    assert label in domains, (name, label)
                    assert value in domains[label], (name, label, value)

    # No label value carries a key, a request id or a raw path.
    secrets_seen = [*stack.keys.values(), stack.clipia_key]
    request_ids = first.request_ids | second.request_ids
    assert len(request_ids) == TOTAL
    for value in values:
        assert not any(secret in value for secret in secrets_seen)
        assert value not in request_ids
        assert "?" not in value
        if value.startswith("/"):
            assert value in ROUTES
    for token in itertools.chain(tokens, request_ids):
        assert token not in text
    assert all(len(value) < 64 for value in values)

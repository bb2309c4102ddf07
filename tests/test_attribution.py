"""Attribution below the team, through HTTP: per-key spend, declared tags, the end user.

Each lands in the ledger and in ``report --by``; tags cannot blow up the metrics (10 000
distinct values make no new series), and the end user is never a metric label.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipia_proxy.attribution import Attributor, hash_key_from
from clipia_proxy.config import AttributionConfig, ConfigError, TagConfig, parse_config
from clipia_proxy.keys import QUOTAS
from clipia_proxy.quotas.store import LedgerRecord
from tests.harness import Stack, run_report, sqlite_report_config, wait_settled

Factory = Callable[..., Awaitable[Stack]]

# Two keys in team "search": the second is the one start_stack makes for "research".
TEAMS = """
teams:
  - id: search
    keys: [{{id: app-key, sha256: {search}}}, {{id: ci-key, sha256: {research}}}]
    models: {{allow: ["*"]}}
"""
ATTRIBUTION = """
attribution:
  end_user: {mode}
  tags:
    service: {{values: [search-api, indexer], metric: true}}
    ticket: {{}}
"""


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5.5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


async def chat(
    stack: Stack, http: aiohttp.ClientSession, who: str, payload: dict[str, Any], **headers: str
) -> None:
    async with http.post(
        f"{stack.base_url}/chat/completions",
        json=payload,
        headers={**stack.auth(who), **headers},
    ) as reply:
        assert reply.status == 200, await reply.text()
        await reply.read()


async def records_of(stack: Stack) -> list[LedgerRecord]:
    await wait_settled(stack)
    return await stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf"))


async def report(tmp_path: Path, db: str, by: str) -> dict[tuple[str, ...], dict[str, Any]]:
    doc = await run_report(sqlite_report_config(tmp_path, db), "--by", by)
    names = by.split(",")
    return {tuple(row[name] for name in names): row for row in doc["rows"]}


async def test_key_tags_and_end_user_land_in_the_ledger_and_the_report(
    stacks: Factory, tmp_path: Path
) -> None:
    db = str(tmp_path / "ledger.db")
    stack = await stacks(
        teams=TEAMS,
        extra=ATTRIBUTION.format(mode="hash"),
        store=f"{{backend: sqlite, sqlite_path: {db}}}",
    )
    async with aiohttp.ClientSession() as http:
        await chat(
            stack,
            http,
            "search",
            body(user="alice@example.com"),
            **{"X-Clipia-Tags": "service=search-api, ticket=T-1, undeclared=zzz"},
        )
        # metadata works too; an undeclared value of a bounded tag becomes "other"; the
        # header wins over metadata for the same key.
        await chat(
            stack,
            http,
            "research",
            body(metadata={"service": "rogue", "ticket": "T-2"}, safety_identifier="bob"),
            **{"X-Clipia-Tags": "ticket=T-3"},
        )
        await chat(stack, http, "search", body(user="alice@example.com"))
    records = sorted(await records_of(stack), key=lambda r: r.created_at)
    assert [r.key_id for r in records] == ["app-key", "ci-key", "app-key"]
    assert [r.tags for r in records] == [
        {"service": "search-api", "ticket": "T-1"},
        {"service": "other", "ticket": "T-3"},
        {},
    ]
    # The end user as a keyed hash: stable per user, not the value, not a plain SHA-256.
    alice = records[0].end_user
    assert alice is not None
    assert alice.startswith("h:")
    assert records[2].end_user == alice
    assert records[1].end_user not in (None, alice)
    assert "alice" not in alice
    assert alice[2:] != hashlib.sha256(b"alice@example.com").hexdigest()[:32]
    key = hash_key_from(stack.clipia_key)
    assert alice == "h:" + hmac.new(key, b"alice@example.com", "sha256").hexdigest()[:32]
    # The upstream still got the request as sent (user, metadata forwarded unchanged).
    sent = [msgspec.json.decode(r.body) for r in stack.chat_requests()]
    assert sent[0]["user"] == "alice@example.com"
    # report --by key / tag:service / tag / user over the same ledger file.
    cost = {r.request_id: Decimal(r.cost) / 1_000_000 for r in records}
    by_key = await report(tmp_path, db, "team,key")
    assert {k: v["requests"] for k, v in by_key.items()} == {
        ("search", "app-key"): 2,
        ("search", "ci-key"): 1,
    }
    assert Decimal(by_key["search", "ci-key"]["credits"]) == cost[records[1].request_id]
    by_service = await report(tmp_path, db, "tag:service")
    assert {k: v["requests"] for k, v in by_service.items()} == {
        ("search-api",): 1,
        ("other",): 1,
        ("",): 1,
    }
    by_tag = await report(tmp_path, db, "tag")
    assert {k: v["requests"] for k, v in by_tag.items()} == {
        ("service=search-api",): 1,
        ("ticket=T-1",): 1,
        ("service=other",): 1,
        ("ticket=T-3",): 1,
        ("",): 1,
    }
    by_user = await report(tmp_path, db, "user")
    assert {k: v["requests"] for k, v in by_user.items()} == {
        (alice,): 2,
        (records[1].end_user,): 1,
    }
    # Metrics: the metric tag counts spend per declared value; the end user is no label.
    async with aiohttp.ClientSession() as http, http.get(f"{stack.admin_url}/metrics") as reply:
        text = await reply.text()
    assert "alice" not in text
    assert alice[2:] not in text
    tag_spend = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "clipia_proxy_tag_spend_credits_total"
    }
    assert tag_spend == {
        (("tag", "service"), ("team", "search"), ("value", "search-api")): pytest.approx(
            float(cost[records[0].request_id])
        ),
        (("tag", "service"), ("team", "search"), ("value", "other")): pytest.approx(
            float(cost[records[1].request_id])
        ),
    }


@pytest.mark.parametrize(("mode", "expected"), [("record", "alice@example.com"), ("ignore", None)])
async def test_end_user_recorded_as_given_or_ignored(
    stacks: Factory, mode: str, expected: str | None
) -> None:
    stack = await stacks(teams=TEAMS, extra=ATTRIBUTION.format(mode=mode))
    async with aiohttp.ClientSession() as http:
        await chat(stack, http, "search", body(user="alice@example.com"))
    (record,) = await records_of(stack)
    assert record.end_user == expected


@pytest.mark.timeout(300)  # 10 000 chat completions through the gateway and the emulator
async def test_ten_thousand_tag_values_make_no_new_series(stacks: Factory) -> None:
    stack = await stacks(
        teams=TEAMS, extra=ATTRIBUTION.format(mode="hash"), store="{backend: memory}"
    )
    stack.emulator.rpm = 1_000_000  # the one Clipia key of the test takes every request
    connector = aiohttp.TCPConnector(limit=32)
    total = 10_000
    numbers = iter(range(1, total))

    async def send(http: aiohttp.ClientSession, number: int) -> None:
        headers = {
            "X-Clipia-Tags": f"service=svc-{number},ticket=T-{number},free{number}=x",
            **stack.auth("search"),
        }
        payload = body(user=f"user-{number}", metadata={"service": f"m-{number}"})
        async with http.post(
            f"{stack.base_url}/chat/completions", json=payload, headers=headers
        ) as reply:
            assert reply.status == 200, await reply.text()
            await reply.read()

    async def worker(http: aiohttp.ClientSession) -> None:
        for number in numbers:
            await send(http, number)

    async def series(http: aiohttp.ClientSession) -> set[tuple[str, frozenset[Any]]]:
        async with http.get(f"{stack.admin_url}/metrics") as reply:
            text = await reply.text()
        return {
            (sample.name, frozenset(sample.labels.items()))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async with aiohttp.ClientSession(connector=connector) as http:
        await send(http, 0)  # one request: every series such a request makes now exists
        await wait_settled(stack)
        first = await series(http)
        async with asyncio.TaskGroup() as group:
            for _ in range(32):
                group.create_task(worker(http))
        await wait_settled(stack)
        after = await series(http)
    assert len(stack.chat_requests()) == total
    assert after == first  # 9 999 more distinct tag values and users: not one new series
    tag_series = {labels for name, labels in after if name.startswith("clipia_proxy_tag_spend")}
    assert tag_series == {frozenset({("team", "search"), ("tag", "service"), ("value", "other")})}


def test_tag_config_is_checked() -> None:
    text = """
attribution:
  end_user: sometimes
  tags:
    "bad key!": {}
    service: {values: ["ok", "no spaces please", "other"]}
    free: {metric: true}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml", environ={"CLIPIA_API_KEY": "clipia_live_x"})
    problems = "\n".join(info.value.problems)
    assert "attribution.end_user" in problems
    assert "attribution.tags.bad key!" in problems
    assert "'no spaces please'" in problems
    assert "'other'" in problems
    assert "attribution.tags.free.metric: a metric tag needs its values declared" in problems


def test_attributor_bounds_every_value() -> None:
    config = AttributionConfig(
        tags={"service": TagConfig(values=("a",), metric=True), "free": TagConfig()}
    )
    attributor = Attributor(config, b"k" * 32)
    got = attributor.of(
        {"X-Clipia-Tags": "service=b,free=" + "x" * 100 + ",nope=1"}, {"metadata": {"free": "ok"}}
    )
    assert got.tags == {"service": "other", "free": "other"}
    assert attributor.metric_tags(got.tags) == {"service": "other"}
    assert attributor.of({}, {"metadata": {"free": "fine-1"}}).tags == {"free": "fine-1"}

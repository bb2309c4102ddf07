"""Sandbox teams: a test team's requests carry the sandbox key only, the others the live key only.

A canary scan over every byte the emulator received (headers and bodies) proves no request of
one environment ever carried the other's key; check-config refuses the unsafe configurations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from clipia_proxy.cli import main
from clipia_proxy.config import ConfigError, Secret, parse_config
from clipia_proxy.emulator.state import RecordedRequest
from clipia_proxy.errors import UpstreamUnavailable
from clipia_proxy.keys import QUOTAS
from clipia_proxy.sandbox import Upstreams
from clipia_proxy.upstream import UpstreamClient
from tests.harness import (
    Stack,
    run_report,
    sqlite_report_config,
    start_stack,
    stop_stack,
    wait_settled,
)
from tests.test_metrics import scrape

HASH = "ab" * 32
TEAMS = """
teams:
  - id: prod
    keys: [{{id: prod-1, sha256: {prod}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 10}}
  - id: ci
    environment: test
    keys: [{{id: ci-1, sha256: {ci}}}]
    models: {{allow: ["*"]}}
    budget: {{day: 10}}
"""


@dataclass
class Sandbox:
    stack: Stack
    test_key: str

    @property
    def live_key(self) -> str:
        return self.stack.clipia_key

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.stack.running.port}{path}"


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    stack = await start_stack(teams=TEAMS, team_ids=("prod", "ci"), test_key=True)
    assert stack.test_key is not None
    try:
        yield Sandbox(stack, stack.test_key)
    finally:
        await stop_stack(stack)


def raw_bytes(record: RecordedRequest) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in record.headers)
    return (
        f"{record.method} {record.path}?{record.query_string}\r\n{head}\r\n".encode() + record.body
    )


async def chat(
    stack: Sandbox, http: aiohttp.ClientSession, team: str, **extra: Any
) -> dict[str, Any]:
    body = {
        "model": "gpt-5.5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"from {team}"}],
        **extra,
    }
    async with http.post(
        stack.url("/v1/chat/completions"), json=body, headers=stack.stack.auth(team)
    ) as reply:
        assert reply.status == 200, await reply.text()
        if extra.get("stream"):
            await reply.read()
            return {}
        answer: dict[str, Any] = await reply.json()
        return answer


async def test_canary_scan_each_team_reaches_clipia_with_its_own_key_only(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    stack = sandbox
    async with aiohttp.ClientSession() as http:
        for team in ("prod", "ci", "prod", "ci"):
            answer = await chat(stack, http, team)
            # /v1/generation is asked with the key that created the generation (the emulator
            # only shows a generation to its own key, so 200 proves the right key was used).
            async with http.get(
                stack.url("/v1/generation"),
                params={"id": answer["id"]},
                headers=stack.stack.auth(team),
            ) as reply:
                assert reply.status == 200, await reply.text()
            await chat(stack, http, team, stream=True)
    await wait_settled(stack.stack)
    chats = [r for r in stack.stack.emulator.requests if r.path == "/v1/chat/completions"]
    assert len(chats) == 8
    seen = {"prod": 0, "ci": 0}
    for record in stack.stack.emulator.requests:
        data = raw_bytes(record)
        if record.path == "/v1/models":
            continue  # the catalog needs no key; it is fetched with the live one
        team = "ci" if record.key == stack.test_key else "prod"
        own, other = (
            (stack.test_key, stack.live_key) if team == "ci" else (stack.live_key, stack.test_key)
        )
        assert own.encode() in data
        assert other.encode() not in data, (team, record.path)
        if record.path == "/v1/chat/completions":
            assert msgspec.json.decode(record.body)["messages"][0]["content"] == f"from {team}"
            seen[team] += 1
    assert seen == {"prod": 4, "ci": 4}
    # The sandbox charged nothing; the live key paid for the live team's requests only.
    bills = list(stack.stack.emulator.bills.values())
    assert {b.key for b in bills if not b.charged} == {stack.test_key}
    assert {b.key for b in bills if b.charged} == {stack.live_key}
    # The test team's spend (the cost the sandbox reports) is on its own budget, not live's.
    records = await stack.stack.running.app[QUOTAS].store.records(since=0.0, until=float("inf"))
    by_team = {team: [r for r in records if r.team == team] for team in ("prod", "ci")}
    assert len(by_team["prod"]) == len(by_team["ci"]) == 4
    assert all(r.cost > 0 for r in records)
    # The report keeps them apart: --by team,environment,model and --by environment.
    db = stack.stack.config.store.sqlite_path
    default = await run_report(sqlite_report_config(tmp_path, db), "--by", "team,environment,model")
    assert {(row["team"], row["environment"], row["model"]) for row in default["rows"]} == {
        ("prod", "live", "gpt-5.5"),
        ("ci", "test", "gpt-5.5"),
    }
    split = await run_report(sqlite_report_config(tmp_path, db), "--by", "environment")
    credits = {row["environment"]: Decimal(row["credits"]) for row in split["rows"]}
    assert credits == {
        "live": Decimal(sum(r.cost for r in by_team["prod"])) / 1_000_000,
        "test": Decimal(sum(r.cost for r in by_team["ci"])) / 1_000_000,
    }
    # Metrics: the test team's spend carries environment="test", the live team's "live".
    got = await scrape(stack.stack)
    spend = got.by("clipia_proxy_spend_credits_total", "team", "model", "environment")
    assert {key for key, value in spend.items() if value} == {
        ("prod", "gpt-5.5", "live"),
        ("ci", "gpt-5.5", "test"),
    }
    assert spend["ci", "gpt-5.5", "test"] == pytest.approx(
        sum(r.cost for r in by_team["ci"]) / 1_000_000
    )


def sandbox_config(text: str, environ: dict[str, str], *, resolve: bool = True) -> list[str] | None:
    try:
        parse_config(text, source="c.yaml", environ=environ, resolve_secrets=resolve)
    except ConfigError as exc:
        return list(exc.problems)
    return None


TEST_TEAM = (
    f"teams:\n  - id: ci\n    environment: test\n    keys: [{{id: k1, sha256: {HASH}}}]\n"
    "    models: {allow: ['gpt-5.5']}\n"
)
LIVE = {"CLIPIA_API_KEY": "clipia_live_x"}


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        pytest.param(
            TEST_TEAM,
            LIVE,
            [
                "c.yaml: teams[0].environment: a test team needs the sandbox key: set "
                "upstream.test_api_key_env"
            ],
            id="test-team-without-test-key",
        ),
        pytest.param(
            "upstream: {test_api_key_env: CLIPIA_TEST_API_KEY}\n" + TEST_TEAM,
            {**LIVE, "CLIPIA_TEST_API_KEY": "clipia_live_y"},
            [
                "c.yaml: upstream.test_api_key_env: CLIPIA_TEST_API_KEY holds a live key "
                "(clipia_live_…); it must hold the sandbox key (clipia_test_…)"
            ],
            id="live-key-in-test-variable",
        ),
        pytest.param(
            "upstream: {test_api_key_env: CLIPIA_TEST_API_KEY}\n" + TEST_TEAM,
            {"CLIPIA_API_KEY": "clipia_test_x", "CLIPIA_TEST_API_KEY": "clipia_test_y"},
            [
                "c.yaml: upstream.api_key_env: the live key is a sandbox key (clipia_test_…) "
                "while upstream.test_api_key_env is set; it must hold the live key (clipia_live_…)"
            ],
            id="test-key-in-live-variable",
        ),
        pytest.param(
            "upstream: {test_api_key_env: CLIPIA_API_KEY}\n" + TEST_TEAM,
            LIVE,
            ["c.yaml: upstream.test_api_key_env: must name another variable than api_key_env"],
            id="same-variable",
        ),
        pytest.param(
            "upstream: {test_api_key_env: CLIPIA_TEST_API_KEY}\n" + TEST_TEAM,
            LIVE,
            [
                "c.yaml: upstream.test_api_key_env: the environment variable "
                "CLIPIA_TEST_API_KEY is not set"
            ],
            id="test-variable-unset",
        ),
    ],
)
def test_unsafe_sandbox_configs_are_refused(
    text: str, environ: dict[str, str], expected: list[str]
) -> None:
    assert sandbox_config(text, environ) == expected


def test_good_sandbox_config_and_warnings() -> None:
    text = "upstream: {test_api_key_env: CLIPIA_TEST_API_KEY}\n" + TEST_TEAM
    assert sandbox_config(text, {**LIVE, "CLIPIA_TEST_API_KEY": "clipia_test_y"}) is None
    config = parse_config(text, source="c.yaml", environ=LIVE, resolve_secrets=False)
    assert config.teams[0].environment == "test"
    assert (
        "c.yaml: upstream.test_api_key_env: the environment variable CLIPIA_TEST_API_KEY is not set"
        in config.warnings
    )
    # Without a sandbox variable a clipia_test_ live key is fine (the demo, the benchmarks).
    assert (
        sandbox_config(
            TEST_TEAM.replace("environment: test", "environment: live"),
            {"CLIPIA_API_KEY": "clipia_test_x"},
        )
        is None
    )


def test_check_config_refuses_a_live_key_in_the_test_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {test_api_key_env: H16_TEST_KEY}\n" + TEST_TEAM)
    monkeypatch.setenv("H16_TEST_KEY", "clipia_live_" + "z" * 20)
    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "H16_TEST_KEY holds a live key" in err
    assert "zzzz" not in err  # the value is never echoed
    monkeypatch.setenv("H16_TEST_KEY", "clipia_test_" + "z" * 20)
    assert main(["check-config", str(path)]) == 0


def test_a_test_team_without_a_sandbox_client_is_refused_never_sent_live() -> None:
    config = parse_config(
        "upstream: {test_api_key_env: CLIPIA_TEST_API_KEY}\n" + TEST_TEAM,
        environ={**LIVE, "CLIPIA_TEST_API_KEY": "clipia_test_y"},
    )
    live = UpstreamClient(config.upstream, Secret("clipia_live_x"))
    upstreams = Upstreams(live, None)  # started before the reload that made "ci" a test team
    upstreams.apply(config.teams)
    with pytest.raises(UpstreamUnavailable):
        upstreams.for_team("ci")
    assert upstreams.for_team("gone") is live  # a team no longer configured: live

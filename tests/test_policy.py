"""Unit tests of clipia_proxy.policy (the HTTP path is covered by test_hardening_http.py)."""

from __future__ import annotations

import pytest

from clipia_proxy.config import CapsConfig, TeamConfig, parse_config
from clipia_proxy.errors import InvalidRequest, ModelNotAllowed, ModelNotFound
from clipia_proxy.policy import ModelPolicy, apply_caps
from tests.conftest import TEAMS_YAML

CHAT_IDS = frozenset(
    {
        "gpt-5.5",
        "gpt-5.5-mini",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5",
        "claude-opus-4-8",
        "gemini-3-pro",
    }
)


def teams() -> dict[str, TeamConfig]:
    config = parse_config(
        "upstream: {api_key_env: null}\n" + TEAMS_YAML.format(search="a" * 64, research="b" * 64),
        source="t.yaml",
        resolve_secrets=False,
    )
    return {team.id: team for team in config.teams}


SEARCH = ModelPolicy(teams()["search"])
RESEARCH = ModelPolicy(teams()["research"])


@pytest.mark.parametrize(
    ("requested", "canonical"),
    [
        ("gpt-5.5", "gpt-5.5"),
        ("fast", "claude-sonnet-4-6"),
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
    ],
)
def test_resolve_allowed(requested: str, canonical: str) -> None:
    assert SEARCH.resolve(requested, CHAT_IDS) == canonical


@pytest.mark.parametrize(
    "requested",
    [
        "claude-sonnet-4-5",
        "claude-opus-4-8",
        "gpt-5.5-mini",
        "GPT-5.5",
        "smart",
        "FAST",
        "gpt-5x5",
        "gpt-5.5 ",
        "*",
        "gpt-?.?",
        "anthropic/claude-sonnet-4-6",
        "claude-sonnetx",
        "",
    ],
)
def test_resolve_not_allowed(requested: str) -> None:
    with pytest.raises(ModelNotAllowed) as caught:
        SEARCH.resolve(requested, CHAT_IDS)
    assert caught.value.status == 403
    assert caught.value.param == "model"
    assert "gpt-5.5" in caught.value.message  # the message lists what the team may use


@pytest.mark.parametrize(
    "requested", ["claude-sonnet-9", "claude-sonnet-*", "claude-sonnet-4-6/../claude-opus-4-8"]
)
def test_resolve_glob_allowed_but_absent_is_404(requested: str) -> None:
    with pytest.raises(ModelNotFound) as caught:
        SEARCH.resolve(requested, CHAT_IDS)
    assert caught.value.status == 404
    assert caught.value.code == "model_not_found"


def test_deny_wins_and_case_matters() -> None:
    assert SEARCH.allows("claude-sonnet-4-6")
    assert not SEARCH.allows("claude-sonnet-4-5")
    assert not SEARCH.allows("Claude-Sonnet-4-6")
    assert RESEARCH.allows("gpt-5.5-mini")
    assert not RESEARCH.allows("claude-opus-4-8")
    assert RESEARCH.allows("Claude-Opus-4-8")  # a different string; the catalog has no such id
    with pytest.raises(ModelNotFound):
        RESEARCH.resolve("Claude-Opus-4-8", CHAT_IDS)


def test_alias_resolves_once_and_other_teams_aliases_do_not() -> None:
    assert SEARCH.canonical("fast") == "claude-sonnet-4-6"
    assert SEARCH.canonical("smart") == "smart"
    assert RESEARCH.canonical("smart") == "gpt-5.5"
    assert RESEARCH.canonical("fast") == "fast"


def test_visible_lists_allowed_and_aliases() -> None:
    ids = sorted(CHAT_IDS)
    assert sorted(SEARCH.visible(CHAT_IDS, ids)) == [
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
        ("fast", "claude-sonnet-4-6"),
        ("gpt-5.5", "gpt-5.5"),
    ]
    research_ids = {listed for listed, _ in RESEARCH.visible(CHAT_IDS, ids)}
    assert "claude-opus-4-8" not in research_ids
    assert "smart" in research_ids


def test_visible_hides_alias_to_absent_model() -> None:
    assert ("fast", "claude-sonnet-4-6") not in SEARCH.visible({"gpt-5.5"}, ["gpt-5.5"])


def test_message_quotes_model_safely() -> None:
    with pytest.raises(ModelNotAllowed) as caught:
        SEARCH.resolve("evil\r\nX-Injected: 1" + "x" * 500, CHAT_IDS)
    message = caught.value.message
    assert "\r" not in message
    assert "\n" not in message
    assert "x" * 100 not in message
    assert "..." in message


def test_describe() -> None:
    text = SEARCH.describe()
    assert "claude-sonnet-*" in text
    assert "except claude-sonnet-4-5" in text
    assert "fast -> claude-sonnet-4-6" in text


def caps(max_tokens: int | None = 1000, n: int | None = 2, on_exceed: str = "reject") -> CapsConfig:
    return CapsConfig(max_tokens=max_tokens, n=n, on_exceed=on_exceed)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 1001}, "max_tokens"),
        ({"max_completion_tokens": 1001}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"max_tokens": 2000, "max_completion_tokens": 2000}, "max_tokens"),
    ],
)
def test_apply_caps_rejects(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        apply_caps(dict(body), caps())
    assert caught.value.param == param
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"max_tokens": 1000},
        {"n": 2},
        {"max_tokens": 3, "max_completion_tokens": 3},
        {"max_tokens": None, "max_completion_tokens": 10},
    ],
)
def test_apply_caps_accepts_unchanged(body: dict[str, object]) -> None:
    copy = dict(body)
    apply_caps(copy, caps())
    assert copy == body


def test_apply_caps_clamps() -> None:
    body: dict[str, object] = {"max_tokens": 5000, "max_completion_tokens": 5000, "n": 9}
    apply_caps(body, caps(on_exceed="clamp"))
    assert body == {"max_tokens": 1000, "max_completion_tokens": 1000, "n": 2}


def test_apply_caps_disagreement_is_refused_even_when_clamping() -> None:
    with pytest.raises(InvalidRequest):
        apply_caps({"max_tokens": 5, "max_completion_tokens": 9}, caps(on_exceed="clamp"))


def test_apply_caps_without_caps_checks_only_agreement() -> None:
    body: dict[str, object] = {"max_tokens": 10**9, "n": 10**6}
    apply_caps(body, caps(None, None))
    assert body == {"max_tokens": 10**9, "n": 10**6}


def test_remembered_answers_follow_the_catalog() -> None:
    policy = ModelPolicy(teams()["search"])
    before = set(CHAT_IDS)
    assert policy.resolve("fast", before) == "claude-sonnet-4-6"
    assert policy.resolve("fast", before) == "claude-sonnet-4-6"  # remembered
    with pytest.raises(ModelNotAllowed):  # refusals are never remembered as answers
        policy.resolve("claude-sonnet-4-5", before)
    with pytest.raises(ModelNotAllowed):
        policy.resolve("claude-sonnet-4-5", before)
    # A new catalog snapshot without the model: the remembered answer is not used.
    after = before - {"claude-sonnet-4-6"}
    with pytest.raises(ModelNotFound):
        policy.resolve("fast", after)
    with pytest.raises(ModelNotFound):
        policy.resolve("claude-sonnet-4-6", after)
    assert policy.resolve("gpt-5.5", after) == "gpt-5.5"

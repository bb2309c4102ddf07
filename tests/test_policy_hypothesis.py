"""Property tests of the model policy: through HTTP (model names) and on ModelPolicy itself.

Served ⇒ the emulator received a ``model`` byte-equal to a chat-model id the team may use;
refused ⇒ nothing reached the emulator. The stack runs in a background thread's loop
(conftest's ``ThreadStack``) so Hypothesis can drive it from a plain synchronous test.
"""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipia_proxy.config import parse_config
from clipia_proxy.emulator import CATALOG
from clipia_proxy.errors import ModelNotAllowed, ModelNotFound
from clipia_proxy.policy import ModelPolicy
from tests.conftest import TEAMS_YAML, Stack, ThreadStack

CHAT_IDS = frozenset(str(e["id"]) for e in CATALOG if "architecture" in e)
MEDIA_IDS = frozenset(str(e["id"]) for e in CATALOG if "architecture" not in e)
SEARCH_MAY_USE = frozenset({"gpt-5.5", "claude-sonnet-4-6"})
RESEARCH_MAY_USE = frozenset(CHAT_IDS - {"claude-opus-4-8"})
MAY_USE = {"search": SEARCH_MAY_USE, "research": RESEARCH_MAY_USE}
ALIASES = {"search": {"fast": "claude-sonnet-4-6"}, "research": {"smart": "gpt-5.5"}}

LOOKALIKES = [
    "gpt-5.5",
    "fast",
    "smart",
    "claude-sonnet-4-6",
    "claude-sonnet-4-5",
    "claude-opus-4-8",
    "GPT-5.5",
    " gpt-5.5",
    "gpt-5.5\n",
    "gpt-5.5\u0000",
    "gpt\u200b-5.5",
    "\uff47pt-5.5",
    "cl\u0430ude-sonnet-4-6",
    "gpt-5x5",
    "gpt-5.5x",
    "claude-sonnet-*",
    "*",
    "gpt-?.?",
    "claude-sonnet-4-6/../claude-opus-4-8",
    "anthropic/claude-sonnet-4-6",
    "flux-2-pro",
    "",
    *sorted(CHAT_IDS),
    *sorted(MEDIA_IDS),
]
pieces = st.sampled_from(
    [
        "gpt",
        "-",
        "5",
        ".",
        "claude",
        "sonnet",
        "4",
        "6",
        "*",
        "?",
        "[",
        "]",
        "/",
        "..",
        "\u200b",
        "\u0430",
        " ",
        "\n",
        "fast",
        "smart",
        "opus",
    ]
)
MODEL_NAMES = st.one_of(
    st.sampled_from(LOOKALIKES),
    st.text(max_size=40),
    st.lists(pieces, max_size=8).map("".join),
    st.sampled_from(LOOKALIKES).flatmap(
        lambda base: st.tuples(st.text(max_size=3), st.text(max_size=3)).map(
            lambda affix: affix[0] + base + affix[1]
        )
    ),
)


@pytest.fixture(scope="module")
def threaded() -> Iterator[ThreadStack]:
    made = ThreadStack()
    try:
        yield made
    finally:
        made.close()


async def _post(stack: Stack, team: str, model: str) -> tuple[int, dict[str, object]]:
    body = msgspec.json.encode(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.base_url}/chat/completions",
            data=body,
            headers={**stack.auth(team), "Content-Type": "application/json"},
        ) as response,
    ):
        document = msgspec.json.decode(await response.read())
        assert isinstance(document, dict)
        return response.status, document


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(model=MODEL_NAMES, team=st.sampled_from(["search", "research"]))
@example(model="fast", team="search")
@example(model="smart", team="research")
@example(model="smart", team="search")
@example(model="claude-sonnet-4-5", team="search")
def test_served_model_is_an_allowed_chat_id(threaded: ThreadStack, model: str, team: str) -> None:
    stack = threaded.stack
    before = len(stack.emulator.requests)
    status, document = threaded.call(_post(stack, team, model))
    new = stack.emulator.requests[before:]
    if status == 200:
        assert len(new) == 1
        assert new[0].path == "/v1/chat/completions"
        received = new[0].json
        assert isinstance(received, dict)
        forwarded = received["model"]
        assert isinstance(forwarded, str)
        assert forwarded in MAY_USE[team]
        assert forwarded == ALIASES[team].get(model, model)
        assert f'"model":"{forwarded}"'.encode() in new[0].body
    else:
        assert new == [], (model, status)
        assert status in {400, 403, 404}, (model, status, document)
        error = document["error"]
        assert isinstance(error, dict)
        assert error["code"] in {"invalid_request", "model_not_allowed", "model_not_found"}
        assert model not in MAY_USE[team]
        assert ALIASES[team].get(model) is None


def _policies() -> dict[str, ModelPolicy]:
    text = TEAMS_YAML.format(search="a" * 64, research="b" * 64)
    config = parse_config(
        "upstream: {api_key_env: null}\n" + text, source="t.yaml", resolve_secrets=False
    )
    return {team.id: ModelPolicy(team) for team in config.teams}


POLICIES = _policies()


@settings(max_examples=500, deadline=None)
@given(model=MODEL_NAMES, team=st.sampled_from(["search", "research"]))
def test_model_policy_resolve_property(model: str, team: str) -> None:
    policy = POLICIES[team]
    try:
        canonical = policy.resolve(model, CHAT_IDS)
    except ModelNotAllowed:
        assert not policy.allows(policy.canonical(model))
        return
    except ModelNotFound:
        assert policy.allows(policy.canonical(model))
        assert policy.canonical(model) not in CHAT_IDS
        return
    assert canonical in MAY_USE[team]
    assert canonical == ALIASES[team].get(model, model)


@settings(max_examples=500, deadline=None)
@given(model=MODEL_NAMES)
def test_search_allows_exactly_its_globs(model: str) -> None:
    """search: allow claude-sonnet-* and gpt-5.5, deny claude-sonnet-4-5; case-sensitive."""
    expected = (
        model.startswith("claude-sonnet-") or model == "gpt-5.5"
    ) and model != "claude-sonnet-4-5"
    assert POLICIES["search"].allows(model) is expected
    if expected and model.upper() != model:
        assert not POLICIES["search"].allows(model.upper())


@settings(max_examples=300, deadline=None)
@given(model=st.text(max_size=30), pattern=st.text(alphabet="ab*?.-", max_size=8))
def test_allows_is_fnmatchcase_on_the_exact_string(model: str, pattern: str) -> None:
    text = f"""
upstream: {{api_key_env: null}}
teams:
  - id: t
    models: {{allow: [{msgspec.json.encode(pattern or "x").decode()}]}}
"""
    config = parse_config(text, source="t.yaml", resolve_secrets=False)
    policy = ModelPolicy(config.teams[0])
    assert policy.allows(model) is fnmatchcase(model, pattern or "x")

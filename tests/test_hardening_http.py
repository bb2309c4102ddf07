"""Bad input through the real HTTP entry point: credentials, model names, paths, bodies, injection.

Every case talks to a running gateway (``stack``) over a real socket, with the emulator as the
only upstream (docs/hardening.md lists the behaviours). Every refusal is checked the same way
(:func:`tests.http_client.assert_refused`): status, the OpenAI envelope with its error code
(docs/architecture.md §5.3), an ``X-Request-Id``, nothing new in the emulator's log (∅), and a
valid request served afterwards on a new connection.
"""

from __future__ import annotations

import ast
import base64
import datetime as dt
import gzip
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from multidict import CIMultiDict
from yarl import URL

from clipia_proxy.auth import generate_key, hash_key
from clipia_proxy.emulator import Fault
from clipia_proxy.wire import decode_json
from tests.harness import Stack, start_stack, stop_stack
from tests.http_client import (
    HELLO,
    REQUEST_ID_RE,
    Reply,
    assert_envelope,
    assert_refused,
    assert_refused_or_parser_400,
    assert_served,
    bearer,
    chat,
    encode,
    http,
    post_chat,
    raw_http,
    raw_request,
)

StackFactory = Callable[..., Awaitable[Stack]]

PACKAGE = Path(__file__).resolve().parent.parent / "clipia_proxy"


# --------------------------------------------------------------------------- helpers


def emulator_headers(stack: Stack, index: int = -1) -> CIMultiDict[str]:
    return CIMultiDict(stack.chat_requests()[index].headers)


@pytest.fixture
async def small_stack() -> Any:
    """A stack whose ``server.max_body_bytes`` is 4096."""
    made = await start_stack(server={"max_body_bytes": 4096})
    try:
        yield made
    finally:
        await stop_stack(made)


# --------------------------------------------------------------------------- credentials


async def test_baseline_valid_request_is_served(stack: Stack) -> None:
    reply = await assert_served(stack)
    assert REQUEST_ID_RE.fullmatch(reply.headers["X-Request-Id"])
    assert stack.chat_requests()[-1].request_id == reply.headers["X-Request-Id"]


def _one_char_off(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


BAD_CREDENTIALS: list[tuple[str, Callable[[Stack], dict[str, str]]]] = [
    ("missing", lambda s: {}),
    ("empty", lambda s: {"Authorization": ""}),
    ("bearer_alone", lambda s: {"Authorization": "Bearer"}),
    ("bearer_space", lambda s: {"Authorization": "Bearer "}),
    ("unknown", lambda s: {"Authorization": f"Bearer {generate_key()}"}),
    ("one_char_off", lambda s: {"Authorization": f"Bearer {_one_char_off(s.keys['search'])}"}),
    ("prefix_only", lambda s: {"Authorization": f"Bearer {s.keys['search'][:20]}"}),
    ("key_plus_suffix", lambda s: {"Authorization": f"Bearer {s.keys['search']}x"}),
    ("long_8000", lambda s: {"Authorization": "Bearer cpx_" + "a" * 8000}),
    ("sql_bare", lambda s: {"Authorization": "' OR 1=1 --"}),
    ("sql_bearer", lambda s: {"Authorization": "Bearer ' OR 1=1 --"}),
    ("sql_in_key", lambda s: {"Authorization": f"Bearer {s.keys['search']}' OR '1'='1"}),
    ("clipia_key_as_bearer", lambda s: {"Authorization": f"Bearer {s.clipia_key}"}),
    ("clipia_looking_key", lambda s: {"Authorization": "Bearer clipia_live_" + "0" * 32}),
    (
        "basic",
        lambda s: {
            "Authorization": "Basic " + base64.b64encode(f"{s.keys['search']}:".encode()).decode()
        },
    ),
    (
        "basic_password",
        lambda s: {
            "Authorization": "Basic " + base64.b64encode(f"x:{s.keys['search']}".encode()).decode()
        },
    ),
    ("token_scheme", lambda s: {"Authorization": f"Token {s.keys['search']}"}),
    ("raw_key_no_scheme", lambda s: {"Authorization": s.keys["search"]}),
    ("cookie", lambda s: {"Cookie": f"api_key={s.keys['search']}; session={s.keys['search']}"}),
    ("x_api_key_empty", lambda s: {"X-Api-Key": ""}),
    ("api_key_header_variant", lambda s: {"Api-Key": s.keys["search"]}),
    ("proxy_authorization", lambda s: {"Proxy-Authorization": f"Bearer {s.keys['search']}"}),
]
# A valid Bearer key next to another X-Api-Key is served as the Bearer key's team (Authorization
# wins): see test_client_surprises.py.


@pytest.mark.parametrize(
    "make_headers", [case for _, case in BAD_CREDENTIALS], ids=[name for name, _ in BAD_CREDENTIALS]
)
async def test_bad_credentials_are_identical_401(
    stack: Stack, make_headers: Callable[[Stack], dict[str, str]]
) -> None:
    """CVE-2026-42208 shape: every refusal is the same 401, echoing neither value nor hash."""
    reference = await http(stack, "POST", "/v1/chat/completions", body=chat())
    assert_envelope(reference, 401, "invalid_api_key")
    # The search key is accepted once first: the gateway then knows it (a shortcut for known
    # keys), and the refusals below must hold all the same.
    warm = await http(stack, "POST", "/v1/chat/completions", headers=stack.auth(), body=chat())
    assert warm.status == 200
    before = len(stack.emulator.requests)
    headers = make_headers(stack)
    reply = await http(stack, "POST", "/v1/chat/completions", headers=headers, body=chat())
    await assert_refused(stack, before, reply, 401, "invalid_api_key")
    assert reply.body == reference.body  # byte-identical bar X-Request-Id
    for value in headers.values():
        token = value.split(" ")[-1]
        if len(token) >= 8:
            assert token.encode() not in reply.body
            assert hash_key(token).encode() not in reply.body


@pytest.mark.parametrize(
    ("params", "name"),
    [("api_key", "api_key"), ("key", "key"), ("token", "token"), ("access_token", "access_token")],
)
async def test_key_in_query_string_is_refused(stack: Stack, params: str, name: str) -> None:
    before = len(stack.emulator.requests)
    path = f"/v1/chat/completions?{name}={stack.keys['search']}"
    reply = await http(stack, "POST", path, body=chat())
    await assert_refused(stack, before, reply, 401, "invalid_api_key")
    assert stack.keys["search"].encode() not in reply.body


async def test_key_in_query_string_is_not_logged(stack: Stack, log_capture: list[str]) -> None:
    """Query strings (where a confused client may put a key) never reach the logs."""
    key = stack.keys["search"]
    await http(stack, "GET", f"/v1/models?api_key={key}")
    await http(stack, "GET", f"/v1/models?key={key}", headers=dict([bearer(stack)]))
    assert log_capture
    for line in log_capture:
        assert key[4:12] not in line


@pytest.mark.parametrize(
    "make_headers",
    [
        lambda s: {"X-Api-Key": s.keys["search"]},
        lambda s: {"x-api-key": f"  {s.keys['search']}  "},
        lambda s: {"Authorization": f"Key {s.keys['search']}"},
        lambda s: {"Authorization": f"bearer {s.keys['search']}"},
        lambda s: {"Authorization": f"Bearer {s.keys['search']}", "X-Api-Key": s.keys["search"]},
    ],
    ids=[
        "x_api_key",
        "x_api_key_padded",
        "authorization_key",
        "bearer_lowercase",
        "same_key_twice",
    ],
)
async def test_accepted_key_channels_are_served_under_same_policy(
    stack: Stack, make_headers: Callable[[Stack], dict[str, str]]
) -> None:
    """CVE-2026-45339: a channel the README accepts gets exactly the Bearer channel's policy."""
    headers = make_headers(stack)
    reply = await http(stack, "POST", "/v1/chat/completions", headers=headers, body=chat())
    assert reply.status == 200, reply.body
    forwarded = emulator_headers(stack)
    assert forwarded.getall("Authorization") == [f"Bearer {stack.clipia_key}"]
    assert "X-Api-Key" not in forwarded
    # The same policy: a denied model is refused through this channel too.
    before = len(stack.emulator.requests)
    denied = await http(
        stack, "POST", "/v1/chat/completions", headers=headers, body=chat("claude-sonnet-4-5")
    )
    await assert_refused(stack, before, denied, 403, "model_not_allowed")


async def test_litellm_32202_client_credential_headers_not_forwarded(stack: Stack) -> None:
    """BerriAI/litellm#32202: the upstream sees one Authorization, ours, and no client secret."""
    team_key = stack.keys["search"]
    headers = {
        "Authorization": f"Bearer {team_key}",
        "OpenAI-Organization": "org-evil",
        "OpenAI-Project": "proj-evil",
        "Cookie": f"session=abc; api_key={team_key}",
        "Proxy-Authorization": "Basic ZXZpbDpldmls",
        "X-Custom-Auth": "secret-value",
        "Connection": "keep-alive, X-Request-Id",
    }
    reply = await http(stack, "POST", "/v1/chat/completions", headers=headers, body=chat())
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1]
    forwarded = CIMultiDict(received.headers)
    assert forwarded.getall("Authorization") == [f"Bearer {stack.clipia_key}"]
    for name in (
        "OpenAI-Organization",
        "OpenAI-Project",
        "Cookie",
        "Proxy-Authorization",
        "X-Custom-Auth",
        "X-Api-Key",
    ):
        assert name not in forwarded, name
    everything = "\n".join(f"{k}: {v}" for k, v in received.headers) + received.body.decode()
    assert team_key not in everything
    assert team_key[4:12] not in everything
    assert received.request_id == reply.headers["X-Request-Id"]


@pytest.mark.parametrize(
    "extra",
    [
        {"Host": "evil.example"},
        {"X-Forwarded-Host": "evil.example"},
        {"Forwarded": "host=evil.example;proto=https"},
        {"X-Original-URL": "/v1/models"},
        {"X-Rewrite-URL": "http://evil.example/v1/chat/completions"},
        {"X-Forwarded-Proto": "https", "X-Forwarded-Port": "1"},
    ],
    ids=["host", "x_forwarded_host", "forwarded", "x_original_url", "x_rewrite_url", "proto_port"],
)
async def test_cve_2024_6587_host_selecting_headers_ignored(
    stack: Stack, extra: dict[str, str]
) -> None:
    """Headers that pick a host or a path change nothing: the configured upstream, our route."""
    reply = await http(
        stack, "POST", "/v1/chat/completions", headers={**stack.auth(), **extra}, body=chat()
    )
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1]
    assert received.path == "/v1/chat/completions"
    assert received.query_string == ""
    forwarded = CIMultiDict(received.headers)
    assert forwarded["Host"] == URL(stack.emulator_url).raw_authority
    for name in extra:
        if name != "Host":
            assert name not in forwarded


async def test_absolute_form_target_goes_to_configured_upstream(stack: Stack) -> None:
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "http://evil.example/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json")],
            chat(),
        ),
    )
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1]
    assert CIMultiDict(received.headers)["Host"] == URL(stack.emulator_url).raw_authority


async def test_client_request_id_is_echoed_never_used_as_ours(stack: Stack) -> None:
    """A client's valid X-Request-Id comes back; the ledger and the upstream use a fresh id."""
    first = await assert_served(stack)
    first_id = first.headers["X-Request-Id"]
    for client_id, kept in (
        (first_id, True),  # another request's id: echoed, yet served under a fresh id
        ("attacker-chosen", True),
        ("a\tb", False),
        ("x" * 129, False),
        ("../etc", False),
    ):
        reply = await http(
            stack,
            "POST",
            "/v1/chat/completions",
            headers={**stack.auth(), "X-Request-Id": client_id},
            body=chat(),
        )
        assert reply.status == 200
        ours = reply.headers["X-Clipia-Proxy-Request-Id"] if kept else reply.headers["X-Request-Id"]
        assert reply.headers["X-Request-Id"] == (client_id if kept else ours)
        assert ("X-Clipia-Proxy-Request-Id" in reply.headers) is kept
        assert ours not in {first_id, client_id}
        assert REQUEST_ID_RE.fullmatch(ours)
        assert stack.chat_requests()[-1].request_id == ours
        assert CIMultiDict(stack.chat_requests()[-1].headers).getall("X-Request-Id") == [ours]


def _assert_no_upstream_session_headers(reply: Reply) -> None:
    for name in reply.headers:
        lowered = name.lower()
        assert lowered != "set-cookie", name
        assert not lowered.startswith("ratelimit"), name
    assert "clipia_session" not in str(reply.headers)


async def test_upstream_set_cookie_and_ratelimit_not_relayed(stack: Stack) -> None:
    """The emulator sets Set-Cookie and RateLimit-* of the company key on every answer."""
    reply = await assert_served(stack)
    _assert_no_upstream_session_headers(reply)
    stream = await post_chat(stack, chat(stream=True))
    assert stream.status == 200
    _assert_no_upstream_session_headers(stream)
    upstream_id = reply.json()["id"]
    generation = await http(stack, "GET", f"/v1/generation?id={upstream_id}", headers=stack.auth())
    assert generation.status == 200
    _assert_no_upstream_session_headers(generation)
    stack.emulator.push_fault(Fault(status=400))
    passed_through = await post_chat(stack, chat())
    assert passed_through.status == 400
    _assert_no_upstream_session_headers(passed_through)


async def test_upstream_retry_after_is_the_only_error_header_relayed(stack: Stack) -> None:
    stack.emulator.push_fault(Fault(status=429, retry_after="30", times=3))
    reply = await post_chat(stack, chat())
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "30"
    _assert_no_upstream_session_headers(reply)
    assert_envelope(reply, 429, "rate_limit_exceeded")


# Raw-socket credential cases: bytes no HTTP client would send.


async def test_authorization_twice_is_refused(stack: Stack) -> None:
    for second in (stack.keys["search"], stack.keys["research"], "junk"):
        before = len(stack.emulator.requests)
        reply = await raw_http(
            stack,
            raw_request(
                "POST",
                "/v1/chat/completions",
                [
                    bearer(stack),
                    ("Authorization", f"Bearer {second}"),
                    ("Content-Type", "application/json"),
                ],
                chat(),
            ),
        )
        await assert_refused(
            stack, before, reply, {400, 401}, {"invalid_api_key", "invalid_request"}
        )


async def test_x_api_key_twice_is_refused(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    key = stack.keys["search"]
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [("X-Api-Key", key), ("X-Api-Key", key), ("Content-Type", "application/json")],
            chat(),
        ),
    )
    await assert_refused(stack, before, reply, {400, 401}, {"invalid_api_key", "invalid_request"})


@pytest.mark.parametrize(
    "value",
    [b"Bearer a\r\nX-Injected: y", "Bearer é".encode(), b"Bearer \xff\xfe", b"Bearer \x7f"],
    ids=["crlf_split", "utf8", "latin1_junk", "del"],
)
async def test_junk_authorization_bytes_refused(stack: Stack, value: bytes) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [(b"Authorization", value), (b"Content-Type", b"application/json")],
            chat(),
        ),
    )
    # Refused by the application (401) or by aiohttp's HTTP parser (400): an envelope either way.
    await assert_refused(stack, before, reply, {400, 401}, {"invalid_api_key", "invalid_request"})


@pytest.mark.parametrize(
    "value",
    [b"Bearer \x00", b"Bearer " + b"a" * 65536, b"Bearer cpx_" + b"a" * 9000],
    ids=["nul", "64kib", "9000"],
)
async def test_parser_level_authorization_junk_refused(stack: Stack, value: bytes) -> None:
    """NUL and over-long header lines stop in aiohttp's parser: 400 (or 431/401) ∅, alive."""
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request("POST", "/v1/chat/completions", [(b"Authorization", value)], b""),
    )
    assert reply.status in {400, 401, 431}
    assert len(stack.emulator.requests) == before
    await assert_served(stack)


async def test_parser_level_refusal_has_openai_envelope(stack: Stack) -> None:
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Content-Length", "1")],
            chat(),
        ),
    )
    assert_envelope(reply, 400, "invalid_request")


@pytest.mark.parametrize(
    "framing",
    [
        [("Content-Length", "5")],  # duplicate (ours is added too)
    ],
    ids=["duplicate_content_length"],
)
async def test_bad_content_length_refused(stack: Stack, framing: list[tuple[str, str]]) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), *framing],
            chat(),
        ),
    )
    assert reply.status == 400
    assert len(stack.emulator.requests) == before
    await assert_served(stack)


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "0x10", " 12 3"])
async def test_non_numeric_content_length_refused(stack: Stack, length: str) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Content-Length", length)],
            chat(),
            content_length=False,
        ),
    )
    assert reply.status == 400
    assert len(stack.emulator.requests) == before
    await assert_served(stack)


async def test_content_length_below_body_excess_never_parsed(stack: Stack) -> None:
    """A Content-Length shorter than the body: the short body is refused, the excess ignored."""
    smuggled = raw_request(
        "POST",
        "/v1/chat/completions",
        [bearer(stack), ("Content-Type", "application/json")],
        chat(),
    )
    body = chat() + smuggled
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Content-Length", "10")],
            body,
            content_length=False,
        ),
    )
    await assert_refused_or_parser_400(stack, before, reply)


# --------------------------------------------------------------------------- identity modes

HEADER_MODE = "auth: {mode: header, header: X-Clipia-Team, trusted_proxies: [127.0.0.1/32]}"


async def _team_of(stack: Stack, headers: Mapping[str, str]) -> str:
    reply = await http(stack, "GET", "/v1/key", headers=headers)
    assert reply.status == 200, reply.body
    team: str = reply.json()["data"]["team"]
    return team


async def test_header_mode_trusted_peer(stacks: StackFactory) -> None:
    stack = await stacks(extra=HEADER_MODE)
    assert await _team_of(stack, {"X-Clipia-Team": "research"}) == "research"
    assert await _team_of(stack, {"X-Clipia-Team": "search"}) == "search"
    reply = await http(
        stack,
        "POST",
        "/v1/chat/completions",
        headers={"X-Clipia-Team": "research"},
        body=chat("smart"),
    )
    assert reply.status == 200
    received = stack.chat_requests()[-1].json
    assert isinstance(received, dict)
    assert received["model"] == "gpt-5.5"
    for bad in (
        {},
        {"X-Clipia-Team": "nobody"},
        {"X-Clipia-Team": ""},
        {"X-Clipia-Team": "Research"},
        {"X-Clipia-Team": "research,search"},
        {"Authorization": f"Bearer {stack.keys['search']}"},
    ):
        before = len(stack.emulator.requests)
        refused = await http(stack, "POST", "/v1/chat/completions", headers=bad, body=chat())
        assert_envelope(refused, 401, "invalid_api_key")
        assert len(stack.emulator.requests) == before


async def test_header_mode_identity_header_twice_is_400(stacks: StackFactory) -> None:
    stack = await stacks(extra=HEADER_MODE)
    for pair in (("research", "research"), ("search", "research")):
        before = len(stack.emulator.requests)
        reply = await raw_http(
            stack,
            raw_request(
                "POST",
                "/v1/chat/completions",
                [
                    ("X-Clipia-Team", pair[0]),
                    ("X-Clipia-Team", pair[1]),
                    ("Content-Type", "application/json"),
                ],
                chat(),
            ),
        )
        assert_envelope(reply, 400, "invalid_request")
        assert len(stack.emulator.requests) == before
    served = await http(
        stack, "POST", "/v1/chat/completions", headers={"X-Clipia-Team": "search"}, body=chat()
    )
    assert served.status == 200


async def test_header_mode_untrusted_peer_is_401(stacks: StackFactory) -> None:
    """Trust is the socket peer: X-Forwarded-For naming a trusted address changes nothing."""
    stack = await stacks(
        extra="auth: {mode: header, header: X-Clipia-Team, trusted_proxies: [10.0.0.0/8]}"
    )
    for extra in (
        {},
        {"X-Forwarded-For": "10.0.0.1"},
        {"X-Real-IP": "10.0.0.1"},
        {"Forwarded": "for=10.0.0.1"},
    ):
        before = len(stack.emulator.requests)
        reply = await http(
            stack,
            "POST",
            "/v1/chat/completions",
            headers={"X-Clipia-Team": "research", **extra},
            body=chat(),
        )
        assert_envelope(reply, 401, "invalid_api_key")
        assert len(stack.emulator.requests) == before


async def test_fixed_mode_every_request_is_the_fixed_team(stacks: StackFactory) -> None:
    stack = await stacks(extra="auth: {mode: fixed, team: research}")
    assert await _team_of(stack, {}) == "research"
    assert await _team_of(stack, stack.auth("search")) == "research"
    assert await _team_of(stack, {"X-Clipia-Team": "search"}) == "research"
    # research's policy applies whatever key is shown: its cap and its deny list.
    before = len(stack.emulator.requests)
    reply = await http(
        stack,
        "POST",
        "/v1/chat/completions",
        headers=stack.auth("search"),
        body=chat("claude-opus-4-8"),
    )
    assert_envelope(reply, 403, "model_not_allowed")
    reply = await http(
        stack,
        "POST",
        "/v1/chat/completions",
        headers=stack.auth("search"),
        body=chat("gpt-5.5", max_tokens=1001),
    )
    assert_envelope(reply, 400, "invalid_request")
    assert len(stack.emulator.requests) == before
    served = await http(stack, "POST", "/v1/chat/completions", body=chat("gemini-3-pro"))
    assert served.status == 200  # search could not use gemini; research can


def _teams_yaml(extra_hash: str, expires: str) -> str:
    return f"""
teams:
  - id: search
    keys:
      - id: search-1
        sha256: {{search}}
        expires: {expires}
    models:
      allow: ["gpt-5.5"]
  - id: research
    keys:
      - id: research-1
        sha256: {{research}}
      - id: research-2
        sha256: {extra_hash}
    models:
      allow: ["*"]
"""


@pytest.mark.parametrize(
    ("expires", "served"),
    [
        ("2000-01-01", False),
        ((dt.date.today() - dt.timedelta(days=1)).isoformat(), False),
        (dt.date.today().isoformat(), True),
        ("2999-12-31", True),
    ],
    ids=["long_ago", "yesterday", "today", "future"],
)
async def test_key_expiry(stacks: StackFactory, expires: str, served: bool) -> None:
    stack = await stacks(teams=_teams_yaml(hash_key(generate_key()), expires))
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat())
    if served:
        assert reply.status == 200
        return
    reference = await http(stack, "POST", "/v1/chat/completions", body=chat())
    await assert_refused(stack, before, reply, 401, "invalid_api_key", serve_team="research")
    assert reply.body == reference.body


async def test_key_rotation_two_keys_of_one_team(stacks: StackFactory) -> None:
    second = generate_key()
    stack = await stacks(teams=_teams_yaml(hash_key(second), "2999-12-31"))
    first_reply = await post_chat(stack, chat(), team="research")
    assert first_reply.status == 200
    second_reply = await http(
        stack,
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {second}"},
        body=chat(),
    )
    assert second_reply.status == 200
    key_view = await http(stack, "GET", "/v1/key", headers={"Authorization": f"Bearer {second}"})
    assert key_view.json()["data"]["team"] == "research"
    assert key_view.json()["data"]["key_id"] == "research-2"
    assert second not in key_view.body.decode()


# --------------------------------------------------------------------------- model names

LOOKALIKES: list[str] = [
    "GPT-5.5",
    "Gpt-5.5",
    " gpt-5.5",
    "gpt-5.5 ",
    "gpt-5.5\n",
    "gpt-5.5\r\n",
    "gpt-5.5\t",
    "gpt-5.5\u0000",
    "gpt-5.5\u200b",
    "gpt\u200d-5.5",
    "\ufeffgpt-5.5",
    "\uff47\uff50\uff54-5.5",  # fullwidth
    "gpt-5\uff0e5",  # NFKC twin of '.'
    "gpt\u20115.5",  # non-breaking hyphen
    "claude-sonnet-4-6\u0301",  # combining mark
    "cl\u0430ude-sonnet-4-6",  # Cyrillic a (U+0430)
    "g\u0440t-5.5",  # Cyrillic er (U+0440)
    "\u202egpt-5.5",  # RTL override
    "gpt-5.5\u202c",
    "gpt-5x5",
    "gpt-5.5x",
    "gpt-5.5-pro",
    "gpt-5.5-mini",
    "gpt-5",
    "claude-sonnetx",
    "claude-sonnet",
    "claude-sonnet-*",
    "claude-sonnet-4-6/../claude-opus-4-8",
    "claude-sonnet-4-6/",
    "claude-sonnet-4-6?x=1",
    "claude-sonnet-4-6#x",
    "../claude-opus-4-8",
    "anthropic/claude-sonnet-4-6",
    "openai/gpt-5.5",
    "*",
    "?",
    "gpt-?.?",
    "gpt-5.[5]",
    "[g]pt-5.5",
    "claude-sonnet-4-5",
    "claude-opus-4-8",
    "gemini-3-pro",
    "FAST",
    "fast ",
    "Fast",
    "smart",
    "flux-2-pro",
    "x" * 10000,
]


@pytest.mark.parametrize("model", LOOKALIKES, ids=[repr(m)[:40] for m in LOOKALIKES])
async def test_model_lookalikes_refused(stack: Stack, model: str) -> None:
    """litellm#33030: anchored, case-sensitive, no normalisation; 403 or 404, ∅."""
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat(model))
    error = await assert_refused(
        stack, before, reply, {403, 404}, {"model_not_allowed", "model_not_found"}
    )
    assert error["param"] == "model"
    for bad in ("\r", "\n"):
        assert bad not in error["message"]


async def test_deny_beats_allow(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat("claude-sonnet-4-5"))
    await assert_refused(stack, before, reply, 403, "model_not_allowed")


async def test_allowed_models_and_alias_served_as_canonical(stack: Stack) -> None:
    for requested, canonical in (
        ("gpt-5.5", "gpt-5.5"),
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
        ("fast", "claude-sonnet-4-6"),
    ):
        reply = await post_chat(stack, chat(requested))
        assert reply.status == 200, reply.body
        received = stack.chat_requests()[-1].json
        assert isinstance(received, dict)
        assert received["model"] == canonical
        assert f'"model":"{canonical}"'.encode() in stack.chat_requests()[-1].body


async def test_other_teams_alias_refused(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat("smart"), team="search")
    await assert_refused(stack, before, reply, {403, 404}, {"model_not_allowed", "model_not_found"})
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat("fast"), team="research")
    await assert_refused(
        stack,
        before,
        reply,
        {403, 404},
        {"model_not_allowed", "model_not_found"},
        serve_team="research",
    )


MODEL_SHAPES: list[tuple[str, bytes]] = [
    ("missing", encode({"messages": HELLO})),
    ("null", chat(None)),
    ("int", chat(123)),
    ("float", b'{"model":1.5,"messages":[{"role":"user","content":"hi"}]}'),
    ("bool", chat(True)),
    ("list", chat(["gpt-5.5"])),
    ("object", chat({"id": "gpt-5.5"})),
    ("empty", chat("")),
    (
        "dup_allowed_first",
        b'{"model":"gpt-5.5","model":"claude-opus-4-8","messages":[{"role":"user","content":"hi"}]}',
    ),
    (
        "dup_denied_first",
        b'{"model":"claude-opus-4-8","model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}',
    ),
    (
        "dup_same",
        b'{"model":"gpt-5.5","model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}',
    ),
    (
        "dup_escaped_key_denied_first",
        b'{"mod\\u0065l":"claude-opus-4-8","model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}',
    ),
    (
        "dup_escaped_key_allowed_first",
        b'{"model":"gpt-5.5","\\u006dodel":"claude-opus-4-8","messages":[{"role":"user","content":"hi"}]}',
    ),
]


@pytest.mark.parametrize("body", [b for _, b in MODEL_SHAPES], ids=[n for n, _ in MODEL_SHAPES])
async def test_model_field_shape_refused(stack: Stack, body: bytes) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, body)
    await assert_refused(stack, before, reply, 400, "invalid_request")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("models", ["claude-opus-4-8"]),
        ("fallbacks", ["claude-opus-4-8"]),
        ("route", "fallback"),
        ("provider", {"order": ["anthropic"]}),
        ("extra_body", {"model": "claude-opus-4-8"}),
        ("api_base", "http://127.0.0.1:1/v1"),
        ("base_url", "http://127.0.0.1:1/v1"),
        ("api_key", "clipia_live_other"),
    ],
)
async def test_second_model_channel_refused(stack: Stack, field: str, value: object) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat("gpt-5.5", **{field: value}))
    error = await assert_refused(stack, before, reply, 400, "invalid_request")
    assert error["param"] == field


async def test_cve_2024_6587_api_base_override_ignored(stack: Stack) -> None:
    """GHSA-g26j-5385-hhw3: api_base at the top is refused; nested, it is inert data."""
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat(api_base="http://127.0.0.1:1/v1"))
    await assert_refused(stack, before, reply, 400, "invalid_request")
    nested = chat(metadata={"api_base": "http://127.0.0.1:1/v1", "model": "claude-opus-4-8"})
    reply = await post_chat(stack, nested)
    assert reply.status == 200
    received = stack.chat_requests()[-1]
    assert received.path == "/v1/chat/completions"
    assert CIMultiDict(received.headers)["Host"] == URL(stack.emulator_url).raw_authority
    assert CIMultiDict(received.headers).getall("Authorization") == [f"Bearer {stack.clipia_key}"]
    assert isinstance(received.json, dict)
    assert received.json["model"] == "gpt-5.5"


async def test_model_in_query_or_header_is_ignored(stack: Stack) -> None:
    reply = await http(
        stack,
        "POST",
        "/v1/chat/completions?model=claude-opus-4-8",
        headers={**stack.auth(), "X-Model": "claude-opus-4-8", "OpenAI-Model": "claude-opus-4-8"},
        body=chat("gpt-5.5"),
    )
    assert reply.status == 200
    received = stack.chat_requests()[-1]
    assert received.query_string == ""
    assert isinstance(received.json, dict)
    assert received.json["model"] == "gpt-5.5"
    assert "claude-opus" not in "".join(v for _, v in received.headers)


async def test_media_model_is_not_found(stack: Stack) -> None:
    for model in ("flux-2-pro", "veo-4", "nano-banana-3"):
        before = len(stack.emulator.requests)
        reply = await post_chat(stack, chat(model), team="research")
        await assert_refused(stack, before, reply, 404, "model_not_found", serve_team="research")


async def test_glob_allowed_but_not_in_catalog_is_not_found(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat("claude-sonnet-9-9"))
    await assert_refused(stack, before, reply, 404, "model_not_found")


async def test_list_models_shows_only_allowed(stack: Stack) -> None:
    before = len(stack.emulator.requests)
    reply = await http(stack, "GET", "/v1/models", headers=stack.auth())
    assert reply.status == 200
    ids = [entry["id"] for entry in reply.json()["data"]]
    assert sorted(ids) == ["claude-sonnet-4-6", "fast", "gpt-5.5"]
    research = await http(stack, "GET", "/v1/models", headers=stack.auth("research"))
    research_ids = {entry["id"] for entry in research.json()["data"]}
    assert "claude-opus-4-8" not in research_ids
    assert {"flux-2-pro", "veo-4", "nano-banana-3"}.isdisjoint(research_ids)
    assert {"gpt-5.5", "smart", "claude-sonnet-4-5", "gemini-3-pro"} <= research_ids
    assert len(stack.emulator.requests) == before


@pytest.mark.parametrize(
    "model_id",
    [
        "claude-sonnet-4-5",
        "claude-opus-4-8",
        "gpt-5.5-mini",
        "flux-2-pro",
        "no-such-model",
        "smart",
        "FAST",
        "claude-sonnet-%2A",
    ],
)
async def test_retrieve_denied_model_is_404_like_unknown(stack: Stack, model_id: str) -> None:
    unknown = await http(stack, "GET", "/v1/models/definitely-unknown", headers=stack.auth())
    before = len(stack.emulator.requests)
    reply = await http(stack, "GET", f"/v1/models/{model_id}", headers=stack.auth())
    await assert_refused(stack, before, reply, 404, "model_not_found")
    assert reply.json()["error"]["type"] == unknown.json()["error"]["type"]
    shown = reply.json()["error"]["message"].replace(repr(URL(f"/{model_id}").path[1:]), "X")
    assert shown == unknown.json()["error"]["message"].replace("'definitely-unknown'", "X")


@pytest.mark.parametrize("model_id", ["gpt-5.5", "claude-sonnet-4-6", "fast"])
async def test_retrieve_allowed_model(stack: Stack, model_id: str) -> None:
    reply = await http(stack, "GET", f"/v1/models/{model_id}", headers=stack.auth())
    assert reply.status == 200
    assert reply.json()["id"] == model_id


CAP_CASES: list[tuple[str, dict[str, object], str]] = [
    ("max_tokens_over", {"max_tokens": 1001}, "max_tokens"),
    ("max_completion_tokens_over", {"max_completion_tokens": 1001}, "max_completion_tokens"),
    ("max_tokens_huge", {"max_tokens": 10**9}, "max_tokens"),
    ("n_over", {"n": 3}, "n"),
    ("n_huge", {"n": 10**6}, "n"),
    ("disagree", {"max_tokens": 10, "max_completion_tokens": 20}, "max_tokens"),
    ("negative", {"max_tokens": -1}, "max_tokens"),
    ("zero", {"max_tokens": 0}, "max_tokens"),
    ("n_zero", {"n": 0}, "n"),
    ("string", {"max_tokens": "1e9"}, "max_tokens"),
    ("string_small", {"max_tokens": "10"}, "max_tokens"),
    ("bool", {"max_tokens": True}, "max_tokens"),
    ("n_bool", {"n": True}, "n"),
    ("list", {"max_tokens": [10]}, "max_tokens"),
    ("over_2_31", {"max_tokens": 2**31 + 1}, "max_tokens"),
    ("over_2_64", {"max_tokens": 2**64}, "max_tokens"),
]


@pytest.mark.parametrize(
    ("fields", "param"), [(f, p) for _, f, p in CAP_CASES], ids=[n for n, _, _ in CAP_CASES]
)
async def test_caps_refused(stack: Stack, fields: dict[str, object], param: str) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, chat(**fields), team="research")
    error = await assert_refused(
        stack, before, reply, 400, "invalid_request", serve_team="research"
    )
    assert error["param"] == param


@pytest.mark.parametrize(
    "raw_field",
    [b'"max_tokens":1.5', b'"max_tokens":1e3', b'"max_tokens":100.0', b'"n":2.0', b'"n":-0'],
)
async def test_caps_float_spellings_refused(stack: Stack, raw_field: bytes) -> None:
    body = b'{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}],' + raw_field + b"}"
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, body, team="research")
    await assert_refused(stack, before, reply, 400, "invalid_request", serve_team="research")


async def test_cap_message_names_the_cap(stack: Stack) -> None:
    reply = await post_chat(stack, chat(max_tokens=1001), team="research")
    error = assert_envelope(reply, 400, "invalid_request")
    assert "1000" in error["message"]
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 1000},
        {"n": 2},
        {"max_tokens": 7, "max_completion_tokens": 7},
        {"max_tokens": None},
        {"n": 1, "max_completion_tokens": 1},
    ],
)
async def test_caps_within_limits_served(stack: Stack, fields: dict[str, object]) -> None:
    reply = await post_chat(stack, chat(**fields), team="research")
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1].json
    assert isinstance(received, dict)
    bound = "max_tokens" in fields or "max_completion_tokens" in fields
    # A request without a bound gets the team's cap (1000) as max_tokens: a budget is a bound.
    expected = (
        fields
        if bound and fields.get("max_tokens", 1) is not None
        else {**fields, "max_tokens": 1000}
    )
    for name, value in expected.items():
        assert received.get(name) == value


# --------------------------------------------------------------------------- paths

PATH_TRICKS = [
    ("GET", "/v1/../metrics"),
    ("GET", "/v1/%2e%2e/admin"),
    ("GET", "/v1/%2E%2E/%2E%2E/metrics"),
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/v1/chat%2fcompletions"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/V1/Chat/Completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1/chat/completions;x=y"),
    ("POST", "/v1/./chat/completions"),
    ("POST", "/v1/chat/./completions"),
    ("POST", "/v1\\chat\\completions"),
    ("POST", "/v1/chat/completions%00"),
    ("POST", "/v1/chat/completions%20"),
    ("GET", "/v1/%c0%ae%c0%ae/metrics"),
    ("GET", "/v1/models/../key/x"),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
]


@pytest.mark.parametrize(
    "path", ["/v1/%63hat/completions", "/%76%31/chat/%63ompletions", "/v1/chat/completion%73"]
)
async def test_percent_encoded_unreserved_is_the_canonical_route(stack: Stack, path: str) -> None:
    """Pinned (RFC 3986 §6.2.2.2): %-encoded unreserved characters name the same route.

    The upstream URL is still base_url + the route's constant.
    """
    reply = await raw_http(
        stack,
        raw_request("POST", path, [bearer(stack), ("Content-Type", "application/json")], chat()),
    )
    assert reply.status == 200
    assert stack.chat_requests()[-1].path == "/v1/chat/completions"
    assert stack.chat_requests()[-1].query_string == ""


@pytest.mark.parametrize(("method", "path"), PATH_TRICKS, ids=[p for _, p in PATH_TRICKS])
async def test_path_tricks_are_404(stack: Stack, method: str, path: str) -> None:
    before = len(stack.emulator.requests)
    headers = [bearer(stack), ("Content-Type", "application/json")]
    reply = await raw_http(
        stack, raw_request(method, path, headers, chat() if method == "POST" else b"")
    )
    await assert_refused(stack, before, reply, 404, {"not_found", "model_not_found"})


@pytest.mark.parametrize(
    "path",
    [
        "/metrics",
        "/healthz",
        "/readyz",
        "/admin",
        "/config",
        "/debug",
        "/guardrails/x",
        "/",
        "/v1",
        "/v1/",
        "/_emulator/requests",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/account",
        "/v1/requests/x",
        "/v1/credits",
        "/v1/auth/key",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/files",
        "/v1/keys",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_routes_are_404(stack: Stack, path: str, method: str) -> None:
    before = len(stack.emulator.requests)
    reply = await http(
        stack, method, path, headers=stack.auth(), body=chat() if method == "POST" else None
    )
    await assert_refused(stack, before, reply, 404, "not_found")
    # Without identity the same paths say nothing about which routes exist.
    anonymous = await http(stack, method, path, body=chat() if method == "POST" else None)
    assert_envelope(anonymous, 401, "invalid_api_key")
    assert len(stack.emulator.requests) == before + 1  # only assert_served's request


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/models/x"),
        ("POST", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/v1/key"),
        ("PATCH", "/v1/generation"),
        ("HEAD", "/v1/chat/completions"),
        ("OPTIONS", "/v1/chat/completions"),
    ],
)
async def test_wrong_method_is_405(stack: Stack, method: str, path: str) -> None:
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            method,
            path,
            [bearer(stack), ("Content-Type", "application/json")],
            chat() if method in {"POST", "PUT", "PATCH"} else b"",
        ),
        head=method == "HEAD",
    )
    if method == "HEAD":
        assert reply.status == 405
        assert len(stack.emulator.requests) == before
        return
    await assert_refused(stack, before, reply, 405, "method_not_allowed")


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "FOO"])
async def test_odd_methods_are_4xx(stack: Stack, method: str) -> None:
    before = len(stack.emulator.requests)
    target = "127.0.0.1:443" if method == "CONNECT" else "/v1/chat/completions"
    reply = await raw_http(stack, raw_request(method, target, [bearer(stack)]))
    assert 400 <= reply.status < 500
    if reply.headers.get("Content-Type", "").startswith("application/json"):
        assert_envelope(
            reply, {400, 404, 405}, {"not_found", "method_not_allowed", "invalid_request"}
        )
    assert len(stack.emulator.requests) == before
    await assert_served(stack)


async def test_generation_lookup_is_team_scoped(stack: Stack) -> None:
    created = await assert_served(stack, team="search")
    own_id = created.json()["id"]
    bill = stack.emulator.bills[own_id]
    reply = await http(stack, "GET", f"/v1/generation?id={own_id}", headers=stack.auth("search"))
    assert reply.status == 200, reply.body
    data = reply.json()["data"]
    assert data["id"] == own_id
    assert data["model"] == bill.model
    assert data["tokens_prompt"] == bill.prompt_tokens
    # Its settled cost was Clipia's own: answered from the ledger, Clipia not asked.
    assert [r for r in stack.emulator.requests if r.path == "/v1/generation"] == []

    for query, team in (
        (f"id={own_id}", "research"),  # another team's real id
        ("id=chatcmpl-000000000000", "search"),
        (f"id={own_id}&id={own_id}", "search"),
        ("id=../x", "search"),
        (f"id=../generation?id={own_id}", "search"),
        (f"id={own_id}%00", "search"),
        ("id=", "search"),
        ("", "search"),
        (f"ID={own_id}", "search"),
    ):
        before = len(stack.emulator.requests)
        refused = await http(stack, "GET", f"/v1/generation?{query}", headers=stack.auth(team))
        await assert_refused(stack, before, refused, 404, "not_found")


async def test_admin_port_serves_health_only(stack: Stack) -> None:
    for path in ("/healthz", "/readyz"):
        reply = await http(stack, "GET", path, admin=True)
        assert reply.status == 200, (path, reply.body)
    before = len(stack.emulator.requests)
    for method, path in (
        ("GET", "/admin"),
        ("GET", "/config"),
        ("GET", "/debug"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/healthz/"),
        ("GET", "/"),
        ("GET", "/v1/key"),
        ("POST", "/config"),
        ("GET", "/../healthz/x"),
    ):
        reply = await http(
            stack,
            method,
            path,
            admin=True,
            body=chat() if method == "POST" else None,
            headers=stack.auth(),
        )
        assert reply.status in {404, 405}, (method, path, reply.status)
    assert len(stack.emulator.requests) == before


# --------------------------------------------------------------------------- body


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=" + "-" * 70,
        'multipart/form-data; boundary="a\r\nb"'.replace("\r\n", ""),
        "application/json; charset=latin1",
        "application/json; charset=iso-8859-1",
        "application/json; charset=utf-16",
        "application/jsonx",
        "application/json-patch+json",
        "application/x-json",
        "text/json",
        "json",
        "",
        "application/octet-stream",
    ],
)
async def test_unsupported_media_type_is_415(stack: Stack, content_type: str | None) -> None:
    headers: list[tuple[str, str]] = [bearer(stack)]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    before = len(stack.emulator.requests)
    reply = await raw_http(stack, raw_request("POST", "/v1/chat/completions", headers, chat()))
    await assert_refused(stack, before, reply, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "APPLICATION/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/json ",
    ],
)
async def test_json_media_type_variants_served(stack: Stack, content_type: str) -> None:
    """Pinned: the media type is case-insensitive; only a UTF-8 charset is accepted."""
    reply = await raw_http(
        stack,
        raw_request(
            "POST", "/v1/chat/completions", [bearer(stack), ("Content-Type", content_type)], chat()
        ),
    )
    assert reply.status == 200, reply.body


async def test_over_max_body_bytes_is_413(small_stack: Stack) -> None:
    stack = small_stack
    big = chat(padding="x" * 5000)
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, big)
    await assert_refused(stack, before, reply, 413, "request_too_large")
    # Chunked, so no Content-Length to judge it by: the read cap still holds.
    chunked = (
        b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n"
            for part in (big[i : i + 1000] for i in range(0, len(big), 1000))
        )
        + b"0\r\n\r\n"
    )
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
            chunked,
            content_length=False,
        ),
    )
    await assert_refused(stack, before, reply, 413, "request_too_large")
    # Just under the cap is served.
    fits = chat(padding="x" * (4096 - len(chat(padding="")) - 1))
    assert len(fits) < 4096
    assert (await post_chat(stack, fits)).status == 200


@pytest.mark.parametrize("size", [4096, 4097])
@pytest.mark.parametrize("late", [False, True], ids=["whole", "late"])
async def test_the_body_cap_is_exact_whether_the_body_came_whole_or_late(
    small_stack: Stack, size: int, late: bool
) -> None:
    """A chunked body of exactly the cap is served and one byte more is 413.

    Both when it arrives with the headers and when it is still arriving as the handler reads.
    """
    stack = small_stack
    body = chat(padding="x" * (size - len(chat(padding=""))))
    assert len(body) == size
    head = raw_request(
        "POST",
        "/v1/chat/completions",
        [bearer(stack), ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        b"",
        content_length=False,
    )
    chunks = [f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:100], body[100:])]
    before = len(stack.emulator.requests)
    if late:
        reply = await raw_http(stack, [head + chunks[0], chunks[1] + b"0\r\n\r\n"])
    else:
        reply = await raw_http(stack, head + b"".join(chunks) + b"0\r\n\r\n")
    if size == 4096:
        assert reply.status == 200, reply.body
    else:
        await assert_refused(stack, before, reply, 413, "request_too_large")


async def test_refusal_order_401_before_415_before_413(small_stack: Stack) -> None:
    """Pinned order: identity (401), then media type (415), then size (413), then JSON (400)."""
    stack = small_stack
    big = b"x" * 10000
    anonymous = await http(
        stack, "POST", "/v1/chat/completions", body=big, content_type="text/plain"
    )
    assert_envelope(anonymous, 401, "invalid_api_key")
    wrong_type = await post_chat(stack, big, headers={"Content-Type": "text/plain"})
    assert_envelope(wrong_type, 415, "unsupported_media_type")
    too_big = await post_chat(stack, big)
    assert_envelope(too_big, 413, "request_too_large")
    bad_json = await post_chat(stack, b"x")
    assert_envelope(bad_json, 400, "invalid_request")
    assert stack.chat_requests() == []


@pytest.mark.parametrize(
    "encoding", ["gzip", "deflate", "br", "gzip, gzip", "x-gzip", "compress", "GZIP"]
)
async def test_content_encoding_is_415(stack: Stack, encoding: str) -> None:
    payload = chat()
    if "gzip" in encoding.lower():
        payload = gzip.compress(payload)
    elif encoding == "deflate":
        payload = zlib.compress(payload)
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Content-Encoding", encoding)],
            payload,
        ),
    )
    # Without the Brotli package aiohttp's parser refuses `br` itself: the same 415 envelope.
    await assert_refused(stack, before, reply, 415, "unsupported_media_type")


async def test_gzip_bomb_is_refused_without_inflating(stack: Stack) -> None:
    bomb = gzip.compress(b"{" + b" " * (20 * 1024 * 1024) + b"}", compresslevel=9)
    assert len(bomb) < 64 * 1024
    before = len(stack.emulator.requests)
    reply = await raw_http(
        stack,
        raw_request(
            "POST",
            "/v1/chat/completions",
            [bearer(stack), ("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
            bomb,
        ),
    )
    await assert_refused(stack, before, reply, 415, "unsupported_media_type")


_MSG = b'"messages":[{"role":"user","content":"hi"}]'
BAD_BODIES: list[tuple[str, bytes]] = [
    (
        "deep_nesting",
        b'{"model":"gpt-5.5",' + _MSG + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ),
    (
        "deep_objects",
        b'{"model":"gpt-5.5",' + _MSG + b',"x":' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}",
    ),
    ("nan", b'{"model":"gpt-5.5",' + _MSG + b',"temperature":NaN}'),
    ("infinity", b'{"model":"gpt-5.5",' + _MSG + b',"temperature":Infinity}'),
    ("neg_infinity", b'{"model":"gpt-5.5",' + _MSG + b',"temperature":-Infinity}'),
    ("huge_exponent", b'{"model":"gpt-5.5",' + _MSG + b',"temperature":1e999999}'),
    ("tiny_exponent", b'{"model":"gpt-5.5",' + _MSG + b',"temperature":1e-999999}'),
    ("10000_digit_int", b'{"model":"gpt-5.5",' + _MSG + b',"seed":' + b"9" * 10_000 + b"}"),
    ("lone_surrogate", b'{"model":"gpt-5.5","messages":[{"role":"user","content":"\\ud800"}]}'),
    (
        "lone_low_surrogate",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"a\\udc00b"}]}',
    ),
    ("invalid_utf8", b'{"model":"gpt-5.5","messages":[{"role":"user","content":"\xff\xfe"}]}'),
    ("overlong_utf8", b'{"model":"gpt-5.5","messages":[{"role":"user","content":"\xc0\xaf"}]}'),
    (
        "raw_surrogate_utf8",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
    ),
    ("bom", b"\xef\xbb\xbf" + chat()),
    (
        "utf16",
        msgspec.json.encode({"model": "gpt-5.5", "messages": HELLO}).decode().encode("utf-16"),
    ),
    (
        "utf16_le",
        msgspec.json.encode({"model": "gpt-5.5", "messages": HELLO}).decode().encode("utf-16-le"),
    ),
    ("top_array", b'[{"model":"gpt-5.5",' + _MSG + b"}]"),
    ("top_string", b'"gpt-5.5"'),
    ("top_number", b"42"),
    ("top_null", b"null"),
    ("top_true", b"true"),
    ("empty", b""),
    ("whitespace", b"   \r\n "),
    ("trailing_garbage", chat() + b"garbage"),
    ("two_documents", chat() + chat()),
    ("two_documents_newline", chat() + b"\n" + chat()),
    ("block_comment", b'{/* c */"model":"gpt-5.5",' + _MSG + b"}"),
    ("line_comment", b'// c\n{"model":"gpt-5.5",' + _MSG + b"}"),
    ("trailing_comma_object", b'{"model":"gpt-5.5",' + _MSG + b",}"),
    ("trailing_comma_array", b'{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"},]}'),
    ("single_quotes", b"{'model':'gpt-5.5'," + _MSG + b"}"),
    ("unquoted_key", b'{model:"gpt-5.5",' + _MSG + b"}"),
    (
        "control_char_in_string",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"a\x01b"}]}',
    ),
    ("truncated", chat()[:-5]),
    ("nul_byte", b"\x00" + chat()),
    ("hex_number", b'{"model":"gpt-5.5",' + _MSG + b',"seed":0x10}'),
    ("leading_zero", b'{"model":"gpt-5.5",' + _MSG + b',"seed":007}'),
    ("plus_number", b'{"model":"gpt-5.5",' + _MSG + b',"seed":+1}'),
    ("messages_missing", b'{"model":"gpt-5.5"}'),
    ("messages_empty", b'{"model":"gpt-5.5","messages":[]}'),
    ("messages_string", b'{"model":"gpt-5.5","messages":"hi"}'),
    ("messages_of_strings", b'{"model":"gpt-5.5","messages":["hi"]}'),
    ("stream_string", b'{"model":"gpt-5.5",' + _MSG + b',"stream":"true"}'),
    ("stream_int", b'{"model":"gpt-5.5",' + _MSG + b',"stream":1}'),
    ("stream_options_list", b'{"model":"gpt-5.5",' + _MSG + b',"stream":true,"stream_options":[]}'),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
async def test_malformed_bodies_are_400(stack: Stack, body: bytes) -> None:
    before = len(stack.emulator.requests)
    reply = await post_chat(stack, body)
    error = await assert_refused(stack, before, reply, 400, "invalid_request")
    assert len(error["message"]) < 300  # no echo of a huge body


async def test_nul_in_content_is_served(stack: Stack) -> None:
    body = b'{"model":"gpt-5.5","messages":[{"role":"user","content":"a\\u0000b"}]}'
    reply = await post_chat(stack, body)
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1].json
    assert isinstance(received, dict)
    assert received["messages"][0]["content"] == "a\x00b"


async def test_large_exact_integer_seed_is_served(stack: Stack) -> None:
    """A 20-digit integer (beyond int64, within msgspec's range) is passed through exactly."""
    reply = await post_chat(stack, chat(seed=2**64 - 1))
    assert reply.status == 200
    assert str(2**64 - 1).encode() in stack.chat_requests()[-1].body


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city — «quoted» ünïcödé",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
FIDELITY_CASES: list[tuple[str, bytes]] = [
    ("tools", chat(tools=[WEATHER_TOOL], tool_choice="auto", parallel_tool_calls=False)),
    (
        "json_schema",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "strict": True,
                    "schema": {
                        "type": "object",
                        "properties": {"a": {"type": "number", "maximum": 1.5}},
                        "required": ["a"],
                    },
                },
            }
        ),
    ),
    (
        "image_parts",
        encode(
            {
                "model": "gpt-5.5",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64,iVBORw0KGgo=",
                                    "detail": "low",
                                },
                            },
                        ],
                    }
                ],
            }
        ),
    ),
    ("seed_max", chat(seed=2**63 - 1)),
    ("seed_min", chat(seed=-(2**63))),
    ("logit_bias", chat(logit_bias={"50256": -100, "1234": 100})),
    (
        "unicode",
        encode(
            {
                "model": "gpt-5.5",
                "messages": [
                    {
                        "role": "system",
                        "content": "Ты — помощник. 你好 🌍 \u2028\u2029 \U0001f600 é",
                    },
                    {"role": "user", "content": '\\ " / \b \f \t', "name": "ünï"},
                ],
            }
        ),
    ),
    (
        "temperature_070",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}],'
        b'"temperature":0.70,"top_p":1.0,"presence_penalty":-0.5,'
        b'"frequency_penalty":1e-3}',
    ),
    (
        "stop_metadata_user",
        chat(
            stop=["\n\n", "END"],
            user="user-42",
            metadata={"trace": "a b", "nested": {"deep": [1, 2, None]}},
        ),
    ),
    (
        "escaped_unicode",
        b'{"model":"gpt-5.5","messages":[{"role":"user","content":"\\u00e9\\ud83d\\ude00"}]}',
    ),
    ("alias_model", chat("fast", temperature=0)),
]


@pytest.mark.parametrize("body", [b for _, b in FIDELITY_CASES], ids=[n for n, _ in FIDELITY_CASES])
async def test_forwarded_body_equals_client_body(stack: Stack, body: bytes) -> None:
    reply = await post_chat(stack, body)
    assert reply.status == 200, reply.body
    received = stack.chat_requests()[-1]
    expected = decode_json(body)
    assert isinstance(expected, dict)
    if expected["model"] == "fast":
        expected["model"] = "claude-sonnet-4-6"
    assert received.json == expected
    # Numbers keep the client's exact spelling (Decimal text, big ints).
    for token in re.findall(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d{10,}", body):
        assert token in received.body, token


async def test_stream_body_equals_client_body_apart_from_usage_option(stack: Stack) -> None:
    body = chat(stream=True, temperature=0.25, tools=[WEATHER_TOOL])
    reply = await post_chat(stack, body)
    assert reply.status == 200
    received = stack.chat_requests()[-1].json
    expected = decode_json(body)
    assert isinstance(received, dict)
    assert isinstance(expected, dict)
    assert received.pop("stream_options") == {"include_usage": True}
    assert received == expected


# --------------------------------------------------------------------------- injection

CRLF_VALUES = [
    "a\r\nX-Injected: 1",
    "a\nX-Injected: 1",
    "a\rX-Injected: 1",
    "\r\n\r\nGET /evil HTTP/1.1",
    "a\u2028X-Injected: 1",
    "a\x85X-Injected: 1",
]


def _assert_clean_outbound(stack: Stack, before: int) -> None:
    for record in stack.emulator.requests[before:]:
        for name, value in record.headers:
            assert "injected" not in name.lower()
            assert "\r" not in value
            assert "\n" not in value
            assert "X-Injected" not in value
        assert record.path in {"/v1/chat/completions", "/v1/generation", "/v1/models"}


def _assert_json_lines(lines: list[str]) -> None:
    assert lines
    for line in lines:
        assert "\n" not in line
        assert "\r" not in line
        document = msgspec.json.decode(line)
        assert isinstance(document, dict)
        assert not any("injected" in str(key).lower() for key in document)


@pytest.mark.parametrize("value", CRLF_VALUES)
async def test_crlf_in_body_fields_never_reaches_headers_or_splits_logs(
    stack: Stack, log_capture: list[str], value: str
) -> None:
    before = len(stack.emulator.requests)
    served = await post_chat(stack, chat(user=value, metadata={value: value, "k": value}))
    assert served.status == 200
    refused = await post_chat(stack, chat("gpt-5.5" + value))
    assert_envelope(refused, {403, 404}, {"model_not_allowed", "model_not_found"})
    for name, header_value in refused.headers.items():
        assert "injected" not in name.lower()
        assert "\n" not in header_value
    stream = await post_chat(stack, chat(user=value, stream=True))
    assert stream.status == 200
    _assert_clean_outbound(stack, before)
    _assert_json_lines(log_capture)


async def test_crlf_in_identity_header_is_refused_not_reflected(
    stacks: StackFactory, log_capture: list[str]
) -> None:
    stack = await stacks(extra=HEADER_MODE)
    before = len(stack.emulator.requests)
    for value in (b"research\rX-Injected: 1", b"research\x0bx", b"research\x00"):
        reply = await raw_http(
            stack,
            raw_request(
                "POST",
                "/v1/chat/completions",
                [(b"X-Clipia-Team", value), (b"Content-Type", b"application/json")],
                chat(),
            ),
        )
        assert reply.status in {400, 401}
        assert b"X-Injected" not in b"".join(v.encode() for v in reply.headers.values())
    assert len(stack.emulator.requests) == before
    _assert_json_lines(log_capture)


def _calls(tree: ast.AST) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                yield func.id
            elif (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "builtins"
            ):
                yield func.attr


def test_no_eval_exec_compile_in_package() -> None:
    """Config is data; the package never evaluates text as code."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    offenders: list[str] = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for name in _calls(ast.parse(source, filename=str(path))):
            if name in {"eval", "exec", "compile", "__import__"}:
                offenders.append(f"{path.name}: {name}(")
        if re.search(r"(?<![\w.])(eval|exec)\s*\(", source):
            offenders.append(f"{path.name}: textual eval/exec")
        if re.search(r"yaml\.(?:unsafe_)?load\((?![^)]*Loader=_UniqueKeyLoader)", source):
            offenders.append(f"{path.name}: yaml.load without the safe loader")
        if "pickle" in source or "marshal.loads" in source:
            offenders.append(f"{path.name}: pickle/marshal")
    assert offenders == []

"""Unit tests of clipia_proxy.auth (the HTTP path is covered by test_hardening_http.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import pytest
from multidict import CIMultiDict

from clipia_proxy.auth import (
    KEY_PREFIX,
    UNAUTHORIZED_MESSAGE,
    Authenticator,
    Principal,
    Refusal,
    generate_key,
    hash_key,
)
from clipia_proxy.config import Config, parse_config
from clipia_proxy.errors import InvalidApiKey, InvalidRequest

KEY_A = generate_key()
KEY_B = generate_key()
KEY_OLD = generate_key()
TODAY = dt.date(2026, 6, 15)


def config(auth: str = "") -> Config:
    text = f"""
upstream: {{api_key_env: null}}
{auth}
teams:
  - id: alpha
    keys:
      - {{id: a-1, sha256: {hash_key(KEY_A)}}}
      - {{id: a-old, sha256: {hash_key(KEY_OLD)}, expires: 2026-06-14}}
  - id: beta
    keys: [{{id: b-1, sha256: {hash_key(KEY_B)}, expires: 2026-06-15}}]
"""
    return parse_config(text, source="t.yaml", resolve_secrets=False)


def keys_auth() -> Authenticator:
    return Authenticator(config(), today=lambda: TODAY)


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_generate_key_format_and_uniqueness() -> None:
    made = {generate_key() for _ in range(200)}
    assert len(made) == 200
    for key in made:
        assert key.startswith(KEY_PREFIX)
        assert re.fullmatch(r"cpx_[A-Za-z0-9_-]{43}", key)
        assert "=" not in key


def test_hash_key_is_hex_sha256_of_whole_key() -> None:
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(key))
    assert hash_key(key) != hash_key(key[:-1])


@pytest.mark.parametrize(
    "pairs",
    [
        (("Authorization", f"Bearer {KEY_A}"),),
        (("Authorization", f"bearer {KEY_A}"),),
        (("Authorization", f"BEARER   {KEY_A}  "),),
        (("Authorization", f"Key {KEY_A}"),),
        (("X-Api-Key", KEY_A),),
        (("x-api-key", f" {KEY_A} "),),
        (("Authorization", f"Bearer {KEY_A}"), ("X-Api-Key", KEY_A)),
    ],
)
def test_accepted_channels(pairs: tuple[tuple[str, str], ...]) -> None:
    assert keys_auth().authenticate(headers(*pairs), "10.1.2.3") == Principal(
        team="alpha", key_id="a-1"
    )


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ((), "no credentials"),
        ((("Authorization", ""),), "malformed key"),
        ((("Authorization", "Bearer"),), "malformed key"),
        ((("Authorization", f"Basic {KEY_A}"),), "malformed key"),
        ((("Authorization", KEY_A),), "malformed key"),
        ((("Authorization", f"Bearer {KEY_A[:-1]}"),), "malformed key"),
        ((("Authorization", f"Bearer {KEY_A}x"),), "malformed key"),
        ((("Authorization", f"Bearer {generate_key()}"),), "unknown key"),
        ((("Authorization", "Bearer ' OR 1=1 --"),), "malformed key"),
        ((("Authorization", "Bearer " + "a" * 100_000),), "malformed key"),
        ((("Authorization", f"Bearer {generate_key()}"), ("X-Api-Key", KEY_B)), "unknown key"),
        (
            (("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_A}")),
            "sent twice",
        ),
        ((("X-Api-Key", KEY_A), ("X-Api-Key", KEY_A)), "sent twice"),
        ((("X-Api-Key", ""),), "malformed key"),
        ((("Authorization", f"Bearer {KEY_OLD}"),), "expired"),
    ],
)
def test_refusals(pairs: tuple[tuple[str, str], ...], reason: str) -> None:
    with pytest.raises(Refusal) as caught:
        keys_auth().authenticate(headers(*pairs), None)
    assert reason in caught.value.detail
    assert caught.value.message == UNAUTHORIZED_MESSAGE
    assert isinstance(caught.value, InvalidApiKey)
    assert caught.value.status == 401
    for _, value in pairs:
        token = value.split(" ")[-1]
        if len(token) >= 8:
            assert token not in caught.value.body().decode()


def test_refusal_bodies_are_identical() -> None:
    bodies = set()
    for pairs in (
        (),
        (("Authorization", f"Bearer {generate_key()}"),),
        (("Authorization", f"Bearer {KEY_OLD}"),),
        (("X-Api-Key", "x"),),
    ):
        with pytest.raises(Refusal) as caught:
            keys_auth().authenticate(headers(*pairs), None)
        bodies.add(caught.value.body())
    assert len(bodies) == 1


def test_expiry_is_inclusive_of_the_day() -> None:
    auth = keys_auth()
    assert auth.authenticate(headers(("X-Api-Key", KEY_B)), None).team == "beta"
    later = Authenticator(config(), today=lambda: TODAY + dt.timedelta(days=1))
    with pytest.raises(Refusal):
        later.authenticate(headers(("X-Api-Key", KEY_B)), None)


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        (
            (("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_B}")),
            "sent twice",
        ),
        (
            (("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_A}")),
            "sent twice",
        ),
    ],
)
def test_a_known_key_is_still_refused_next_to_other_credentials(
    pairs: tuple[tuple[str, str], ...], reason: str
) -> None:
    # Once a key has been accepted, later requests take a shortcut; it must not skip the
    # checks on the other channels.
    auth = keys_auth()
    for _ in range(2):
        assert (
            auth.authenticate(headers(("Authorization", f"Bearer {KEY_A}")), None).team == "alpha"
        )
        with pytest.raises(Refusal) as caught:
            auth.authenticate(headers(*pairs), None)
        assert reason in caught.value.detail


@pytest.mark.parametrize("leftover", [KEY_B, "sk-other-tool-key", "", "clipia_live_other"])
def test_authorization_wins_over_a_leftover_x_api_key(leftover: str) -> None:
    """An X-Api-Key left over from another tool never changes who a valid Bearer key is."""
    auth = keys_auth()
    for _ in range(2):  # the full path, then the shortcut for a known key
        principal = auth.authenticate(
            headers(("Authorization", f"Bearer {KEY_A}"), ("X-Api-Key", leftover)), None
        )
        assert principal.team == "alpha"


def test_a_known_key_still_expires() -> None:
    day = [TODAY]
    auth = Authenticator(config(), today=lambda: day[0])
    presented = headers(("Authorization", f"Bearer {KEY_B}"))
    assert auth.authenticate(presented, None) == Principal(team="beta", key_id="b-1")
    assert auth.authenticate(presented, None) == Principal(team="beta", key_id="b-1")
    day[0] = TODAY + dt.timedelta(days=1)
    with pytest.raises(Refusal) as caught:
        auth.authenticate(presented, None)
    assert "expired" in caught.value.detail


def test_the_shortcut_accepts_only_what_the_full_check_accepted() -> None:
    auth = keys_auth()
    unknown = generate_key()
    for _ in range(2):
        with pytest.raises(Refusal):
            auth.authenticate(headers(("Authorization", f"Bearer {unknown}")), None)
    # A key accepted through X-Api-Key is then also known in the Authorization channel.
    assert auth.authenticate(headers(("X-Api-Key", KEY_A)), None).key_id == "a-1"
    assert auth.authenticate(headers(("Authorization", f"Bearer {KEY_A}")), None).key_id == "a-1"
    # A reload builds a new authenticator: a removed key is not remembered.
    without_a = parse_config(
        "upstream: {api_key_env: null}\nteams: [{id: beta, keys: []}]\n",
        source="t.yaml",
        resolve_secrets=False,
    )
    with pytest.raises(Refusal):
        Authenticator(without_a, today=lambda: TODAY).authenticate(
            headers(("Authorization", f"Bearer {KEY_A}")), None
        )


def test_plain_mapping_headers_work() -> None:
    assert keys_auth().authenticate({"Authorization": f"Bearer {KEY_A}"}, None).team == "alpha"


HEADER_MODE = "auth: {mode: header, header: X-Team, trusted_proxies: [127.0.0.1/32, 'fd00::/8']}"


@pytest.mark.parametrize("peer", ["127.0.0.1", "fd00::1"])
def test_header_mode_trusted(peer: str) -> None:
    auth = Authenticator(config(HEADER_MODE))
    assert auth.authenticate(headers(("X-Team", "beta")), peer) == Principal(team="beta")


@pytest.mark.parametrize("peer", [None, "127.0.0.2", "10.0.0.1", "::1", "not-an-ip", ""])
def test_header_mode_untrusted_peer(peer: str | None) -> None:
    auth = Authenticator(config(HEADER_MODE))
    with pytest.raises(Refusal):
        auth.authenticate(headers(("X-Team", "beta"), ("X-Forwarded-For", "127.0.0.1")), peer)


@pytest.mark.parametrize("team", ["", "gamma", "Beta", "beta ", "alpha,beta"])
def test_header_mode_unknown_team(team: str) -> None:
    with pytest.raises(Refusal):
        Authenticator(config(HEADER_MODE)).authenticate(headers(("X-Team", team)), "127.0.0.1")


def test_header_mode_missing_and_twice() -> None:
    auth = Authenticator(config(HEADER_MODE))
    with pytest.raises(Refusal):
        auth.authenticate(headers(("Authorization", f"Bearer {KEY_A}")), "127.0.0.1")
    with pytest.raises(InvalidRequest):
        auth.authenticate(headers(("X-Team", "beta"), ("x-team", "beta")), "127.0.0.1")
    # Twice is refused even from an untrusted peer (400 before the trust check).
    with pytest.raises(InvalidRequest):
        auth.authenticate(headers(("X-Team", "beta"), ("X-Team", "alpha")), "10.0.0.1")


def test_fixed_mode_ignores_every_credential() -> None:
    auth = Authenticator(config("auth: {mode: fixed, team: beta}"))
    for pairs in ((), (("Authorization", f"Bearer {KEY_A}"),), (("X-Clipia-Team", "alpha"),)):
        assert auth.authenticate(headers(*pairs), None) == Principal(team="beta")

"""Config loading: every problem reported at once, with its path, and never a secret echoed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from clipia_proxy.config import ConfigError, Secret, load_config, parse_config, read_api_key

HASH = "ab" * 32
OK_TEAM = f"teams:\n  - id: a\n    keys: [{{id: k1, sha256: {HASH}}}]\n    models: {{allow: ['gpt-5.5']}}\n"
ENV = {"CLIPIA_API_KEY": "clipia_test_x", "R": "redis://127.0.0.1:1/0"}


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.yaml", environ=ENV)
    return list(info.value.problems)


def test_example_config_is_valid() -> None:
    config = load_config(
        Path(__file__).parent.parent / "config.example.yaml", resolve_secrets=False
    )
    assert [team.id for team in config.teams] == ["search", "research"]
    assert config.teams[0].keys[0].expires == dt.date(2027, 6, 1)


def test_defaults_match_design() -> None:
    config = parse_config("", environ=ENV)
    assert config.server.port == 8080
    assert config.server.admin_port == 9090
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert config.upstream.base_url == "https://api.clipia.ai/v1"
    assert config.upstream.retries == 2
    assert config.catalog.ttl_seconds == 300
    assert config.auth.mode == "keys"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: {port: lots}", "c.yaml: server.port: expected int (got 'lots')"),
        ("server: {bogus: 1}", "c.yaml: server.bogus: unknown key"),
        ("nonsense: {}", "c.yaml: nonsense: unknown section"),
        ("server: {port: 70000}", "c.yaml: server.port: must be a TCP port 0-65535 (got 70000)"),
        ("server: {port: 9090}", "c.yaml: server.admin_port: must differ from server.port"),
        (
            "server: {max_body_bytes: 0}",
            "c.yaml: server.max_body_bytes: must be a positive number of bytes",
        ),
        (
            "upstream: {base_url: 'ftp://x'}",
            "c.yaml: upstream.base_url: must be an http(s) URL without query or fragment",
        ),
        ("upstream: {retries: 99}", "c.yaml: upstream.retries: must be between 0 and 10 (got 99)"),
        (
            "upstream: {api_key_file: /k}",
            "c.yaml: upstream: set only one of api_key_env and api_key_file",
        ),
        (
            "catalog: {ttl_seconds: 10, max_stale_seconds: 5}",
            "c.yaml: catalog.max_stale_seconds: must be at least catalog.ttl_seconds",
        ),
        ("auth: {mode: magic}", "c.yaml: auth.mode: invalid enum value 'magic'"),
        (
            "auth: {mode: fixed}",
            "c.yaml: auth.team: mode fixed needs the team every request belongs to",
        ),
        ("auth: {mode: fixed, team: nobody}", "c.yaml: auth.team: no team with id 'nobody'"),
        (
            "auth: {mode: header, trusted_proxies: []}",
            "c.yaml: auth.trusted_proxies: mode header needs at least one trusted proxy",
        ),
        (
            "auth: {trusted_proxies: [not-an-ip]}",
            "c.yaml: auth.trusted_proxies[0]: not an IP network: 'not-an-ip'",
        ),
        (
            "auth: {header: Authorization}",
            "c.yaml: auth.header: must not be a credential or routing header",
        ),
        (
            "store: {backend: sqlite, replicas: 2}",
            "c.yaml: store.backend: sqlite serves one replica only (store.replicas is 2); use redis",
        ),
        ("store: {backend: mongo}", "c.yaml: store.backend: invalid enum value 'mongo'"),
        ("ledger: {backend: mysql}", "c.yaml: ledger.backend: invalid enum value 'mysql'"),
        (
            "store: {backend: redis, redis_url_env: R}",
            "c.yaml: store.backend: redis counters need the PostgreSQL ledger (Redis keeps no "
            "records): set ledger.backend: postgres and ledger.postgres_dsn_env (the env var "
            "with the DSN)",
        ),
        (
            "ledger: {retention_months: 1}",
            "c.yaml: ledger.retention_months: must be at least 2 (the current and the previous "
            "month are always kept)",
        ),
        ("ledger: {pool_size: 0}", "c.yaml: ledger.pool_size: must be between 1 and 100 (got 0)"),
        (
            "ledger: {postgres_dsn_env: 'not a name'}",
            "c.yaml: ledger.postgres_dsn_env: must be an environment variable name",
        ),
        (
            "ledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_NO_DSN}",
            "c.yaml: ledger.postgres_dsn_env: the environment variable CLIPIA_TEST_NO_DSN is not set",
        ),
        (
            "accounting: {timezone: Mars/Olympus}",
            "c.yaml: accounting.timezone: unknown time zone 'Mars/Olympus'",
        ),
        (
            "accounting: {rubles_per_credit: 0}",
            "c.yaml: accounting.rubles_per_credit: must be a positive number",
        ),
        (
            "accounting: {lease_seconds: 10}",
            "c.yaml: accounting.lease_seconds: must be longer than upstream.first_byte_timeout_seconds (a reservation must outlive the wait for Clipia's answer)",
        ),
        (
            "accounting: {on_disconnect: ignore}",
            "c.yaml: accounting.on_disconnect: invalid enum value 'ignore'",
        ),
        ("teams: {a: 1}", "c.yaml: teams: expected a list of teams"),
        (
            "teams:\n  - id: a\n    keys: [{id: k, sha256: nothex}]",
            "c.yaml: teams[0].keys[0].sha256: must be 64 lowercase hex characters (a SHA-256)",
        ),
        (OK_TEAM + "  - id: a\n", "c.yaml: teams[1].id: duplicate team id 'a' (also teams[0])"),
        (
            OK_TEAM + f"  - id: b\n    keys: [{{id: k2, sha256: {HASH}}}]\n",
            "c.yaml: teams[1].keys[0].sha256: the same key hash is used by teams[0].keys[0]",
        ),
        (
            "teams:\n  - id: a\n    models: {allow: ['*'], aliases: {x: y, y: x}}",
            "c.yaml: teams[0].models.aliases.x: alias cycle: x -> y -> x",
        ),
        (
            "teams:\n  - id: a\n    models: {allow: ['*'], deny: [bad], aliases: {x: bad}}",
            "c.yaml: teams[0].models.aliases.x: alias points at 'bad', which the team's deny list refuses",
        ),
        (
            "teams:\n  - id: a\n    models: {allow: ['gpt-*'], aliases: {x: claude}}",
            "c.yaml: teams[0].models.aliases.x: alias points at 'claude', which the team's allow list lacks",
        ),
        (
            "teams:\n  - id: a\n    models: {allow: [gpt-5.5], aliases: {gpt-5.5: gpt-5.5}}",
            "c.yaml: teams[0].models.aliases.gpt-5.5: alias shadows a model id named in this team's policy",
        ),
        (
            "teams:\n  - id: a\n    caps: {max_tokens: -1}",
            "c.yaml: teams[0].caps.max_tokens: must be a positive number of tokens",
        ),
        (
            "teams:\n  - id: a\n    budget: {month: lots}",
            "c.yaml: teams[0].budget.month: must be a number (got 'lots')",
        ),
        (
            "teams:\n  - id: a\n    budget: {day: -5}",
            "c.yaml: teams[0].budget.day: must be a positive number (got -5)",
        ),
        ("teams:\n  - id: a\n    budget: {hour: 5}", "c.yaml: teams[0].budget.hour: unknown key"),
        (
            "teams:\n  - id: a\n    limits: {rpm: 0}",
            "c.yaml: teams[0].limits.rpm: must be a positive integer (got 0)",
        ),
        (
            "teams:\n  - id: 'bad id'",
            "c.yaml: teams[0].id: must be 1-63 characters of letters, digits, '.', '_', '-'",
        ),
        (
            "server: {port: 1}\nserver: {port: 2}",
            "c.yaml: invalid YAML (line 2): duplicate key 'server' (line 2)",
        ),
        (
            "!!python/object:os.system {}",
            "c.yaml: invalid YAML (line 1): could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
        ("- a\n- b", "c.yaml: the top level must be a mapping of sections"),
    ],
)
def test_each_problem_has_its_message(text: str, expected: str) -> None:
    assert expected in problems(text)


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        "server: {port: lots, bogus: 1}\nauth: {mode: fixed}\n"
        "teams:\n  - id: a\n    keys: [{id: k, sha256: nothex}]\n    models: {allow: x}\n"
    )
    assert found == [
        "c.yaml: server.port: expected int (got 'lots')",
        "c.yaml: server.bogus: unknown key",
        "c.yaml: teams[0].models.allow: expected array (got 'x')",
        "c.yaml: auth.team: mode fixed needs the team every request belongs to",
        "c.yaml: teams[0].keys[0].sha256: must be 64 lowercase hex characters (a SHA-256)",
    ]


def test_inline_secret_is_refused_and_never_echoed() -> None:
    secret = "clipia_live_" + "0123456789abcdef0123"  # built: no key-shaped literal in the repo
    found = problems(f"upstream:\n  api_key: {secret}\n")
    assert any("upstream.api_key: looks like a secret written inline" in p for p in found)
    assert all(secret[:12] not in p and secret[-8:] not in p for p in found)


def test_a_file_path_that_spells_a_key_prefix_is_not_an_inline_secret(tmp_path: Path) -> None:
    """``/run/secrets/clipia_live_key`` names a file; a key pasted into a path setting does not."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    key_file = secrets_dir / ("clipia_live_" + "key")
    key_file.write_text("clipia_test_fromfile\n")
    ledger = tmp_path / ("cpx_" + "data") / "ledger.db"
    config = parse_config(
        f"upstream: {{api_key_env: null, api_key_file: {key_file}}}\n"
        f"store: {{backend: sqlite, sqlite_path: {ledger}}}\n",
        environ={},
    )
    assert read_api_key(config.upstream).reveal() == "clipia_test_fromfile"
    assert config.store.sqlite_path == str(ledger)
    pasted = "clipia_live_" + "0123456789abcdef0123"
    found = problems(f"upstream: {{api_key_env: null, api_key_file: {pasted}}}\n")
    assert any("upstream.api_key_file: looks like a secret written inline" in p for p in found)


def test_missing_key_is_an_error_for_serve_and_a_warning_for_check() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("", source="c.yaml", environ={})
    assert info.value.problems == (
        "c.yaml: upstream.api_key_env: the environment variable CLIPIA_API_KEY is not set",
    )
    config = parse_config("", source="c.yaml", environ={}, resolve_secrets=False)
    assert config.warnings == (
        "c.yaml: upstream.api_key_env: the environment variable CLIPIA_API_KEY is not set",
    )


def test_api_key_from_file_and_env(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("clipia_test_fromfile\n")
    config = parse_config(f"upstream: {{api_key_env: null, api_key_file: {key_file}}}", environ={})
    assert read_api_key(config.upstream).reveal() == "clipia_test_fromfile"
    config = parse_config("", environ=ENV)
    assert read_api_key(config.upstream, ENV).reveal() == "clipia_test_x"


def test_secret_never_shows_itself() -> None:
    secret = Secret("clipia_live_" + "supersecretvalue")
    assert "supersecret" not in repr(secret)
    assert "supersecret" not in str(secret)
    assert "supersecret" not in repr(parse_config("", environ=ENV))


def test_fixed_mode_off_loopback_warns() -> None:
    config = parse_config(OK_TEAM + "auth: {mode: fixed, team: a}\n", source="c.yaml", environ=ENV)
    assert config.warnings == (
        "c.yaml: server.host: auth.mode fixed serves anyone who can connect; bind the sidecar to 127.0.0.1",
    )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert info.value.problems == ("missing.yaml: cannot read: FileNotFoundError",)


def test_ledger_section_defaults_to_the_sqlite_file() -> None:
    config = parse_config("store: {sqlite_path: /data/l.db}", environ=ENV)
    assert config.ledger.backend == "sqlite"
    assert config.ledger.postgres_dsn_env == "CLIPIA_LEDGER_DSN"
    assert config.ledger.retention_months is None
    assert config.ledger.pool_size == 4


def test_postgres_ledger_dsn_missing_is_a_warning_for_check_config() -> None:
    config = parse_config(
        "ledger: {backend: postgres, postgres_dsn_env: CLIPIA_TEST_NO_DSN}",
        source="c.yaml",
        resolve_secrets=False,
        environ=ENV,
    )
    assert config.warnings == (
        "c.yaml: ledger.postgres_dsn_env: the environment variable CLIPIA_TEST_NO_DSN is not set",
    )
    ok = parse_config(
        "ledger: {backend: postgres, postgres_dsn_env: DSN, retention_months: 13}",
        environ={**ENV, "DSN": "postgresql://u:p@h/db"},
    )
    assert ok.ledger.backend == "postgres"
    assert ok.ledger.retention_months == 13

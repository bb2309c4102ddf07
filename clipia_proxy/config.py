"""Configuration: YAML (plus named secrets from the environment or files) → a frozen, typed Config.

Loading has two stages. First every section (and every team) is converted into msgspec Structs
(`frozen`, `forbid_unknown_fields`, `kw_only`); a section with several problems is converted
again without the offending field until all of its problems are known. Then a cross-field pass
checks what no single field can (duplicate ids and hashes, alias cycles, identity modes): one
``_check_<section>`` function per section, listed in ``_SECTION_CHECKS``, and ``_check_teams``
(a new key adds its field to the section's Struct and its rules to that function). Every
problem is collected and raised at once as one :class:`ConfigError`, each line shaped
``config.yaml: teams[2].models.allow: expected array, got str``. Secret values are never echoed:
they are named (``api_key_env`` / ``api_key_file``) and read once into a :class:`Secret`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

__all__ = [
    "AccountingConfig",
    "AttributionConfig",
    "AuthConfig",
    "BudgetConfig",
    "CapsConfig",
    "CatalogConfig",
    "Config",
    "ConfigError",
    "KeyConfig",
    "LedgerConfig",
    "LimitsConfig",
    "LoggingConfig",
    "McpConfig",
    "ModelsConfig",
    "Secret",
    "ServerConfig",
    "StoreConfig",
    "TagConfig",
    "TeamConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "read_admin_token",
    "read_api_key",
    "read_test_api_key",
]

_STRUCT: Final = {"frozen": True, "forbid_unknown_fields": True, "kw_only": True}
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_INLINE_SECRET_RE: Final = re.compile(r"clipia_(?:live|test)_|cpx_[A-Za-z0-9]|Bearer\s")
_MAX_FIX_ROUNDS: Final = 64


class Secret:
    """A secret value that never shows itself in ``repr``, ``str`` or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret; call only where it is put on the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ServerConfig(msgspec.Struct, **_STRUCT):
    """``server``: the listening sockets and request limits."""

    host: str = "0.0.0.0"  # noqa: S104 - a gateway serves the cluster; sidecars set 127.0.0.1
    port: int = 8080
    admin_port: int = 9090
    admin_host: str | None = None
    """The admin port's listen address (default: ``host``): a sidecar keeps the API on
    127.0.0.1 and may open ``/metrics`` and the probes to the pod network."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Sized for vision requests (base64 images): a body is held whole while it is checked."""
    shutdown_grace_seconds: float = 25.0
    header_timeout_seconds: float = 10.0
    """A connection's request head must be complete this long after it opened (or after the
    first byte following the previous answer), else the connection is closed."""
    body_timeout_seconds: float = 60.0
    """A request body must have arrived whole this long after its head, else 408."""
    keepalive_timeout_seconds: float = 75.0
    """An idle kept-alive connection is closed after this long."""
    max_header_bytes: int = 64 * 1024
    """Cap on a request head in all (request line and every header): 431 and closed past it."""
    max_connections: int = 4096
    """Open connections on the data port; past it new ones get 503 ``overloaded`` and close.
    Lowered at start-up (with a warning) when the file descriptor limit cannot hold it."""
    admin_max_connections: int = 64
    """Open connections on the admin port (its own cap: probes answer at the data port's)."""
    admin_token_env: str | None = None
    """An environment variable holding a bearer token: ``/metrics`` then answers only
    ``Authorization: Bearer <token>`` (``/healthz`` and ``/readyz`` stay open for probes)."""


class UpstreamConfig(msgspec.Struct, **_STRUCT):
    """``upstream``: where Clipia is and how the gateway talks to it."""

    base_url: str = "https://api.clipia.ai/v1"
    api_key_env: str | None = "CLIPIA_API_KEY"
    api_key_file: str | None = None
    connect_timeout_seconds: float = 5.0
    first_byte_timeout_seconds: float = 600.0
    """From the request sent to Clipia's first byte; as long as the openai SDK's own wait."""
    idle_timeout_seconds: float = 120.0
    max_connections: int = 512
    max_connections_per_team: int | None = None
    """Most requests one team may have in the gateway at once (reading its body, waiting for
    or holding an upstream connection); also every team's default concurrency. ``None``: a
    fair fraction of ``max_connections`` — all of it with one team, else 1/2, 1/3 or 1/4."""
    retries: int = 2
    """Extra attempts for what never reached Clipia (and for ``retry_on_status``)."""
    retry_on_status: list[int] = msgspec.field(default_factory=list)
    """Upstream statuses the gateway retries itself (opt-in; default: the client retries)."""
    max_retry_wait_seconds: float = 5.0
    """Longest upstream ``Retry-After`` the gateway waits out itself (``retry_on_status``)."""
    test_api_key_env: str | None = None
    """The environment variable holding Clipia's sandbox key (``clipia_test_…``), used for the
    requests of ``environment: test`` teams only (and never for the others)."""
    proxy_url: str | None = None
    """Egress proxy for every upstream connection (``CONNECT`` for an https upstream)."""
    trust_env: bool = False
    """Without ``proxy_url``: use ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` from the environment."""
    transport: Literal["httptools", "aiohttp"] = "httptools"
    """How requests reach Clipia: asyncio + the httptools parser (default, the cheaper in CPU),
    or one ``aiohttp.ClientSession``. Both keep the same timeouts, retries and proxy rules."""


class CatalogConfig(msgspec.Struct, **_STRUCT):
    """``catalog``: the cached ``GET /v1/models``."""

    ttl_seconds: float = 300.0
    max_stale_seconds: float = 3600.0


class StoreConfig(msgspec.Struct, **_STRUCT):
    """``store``: where quota state and the ledger live."""

    backend: Literal["memory", "sqlite", "redis"] = "sqlite"
    sqlite_path: str = "./clipia-proxy.db"
    redis_url_env: str = "REDIS_URL"
    redis_key_prefix: str = "clipia-proxy"
    """Every Redis key starts with this (one Redis can serve several gateways)."""
    timeout_seconds: float = 2.0
    """Longest wait for one store operation before ``on_error`` applies."""
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    journal_path: str | None = None
    """The outage journal: requests served under ``fail_open`` and settlements the store could
    not take wait here (fsync'd in batches) until the store answers again. Default:
    ``clipia-proxy-outage.jsonl`` in the directory of ``sqlite_path``."""
    journal_max_bytes: int = 64 * 1024 * 1024
    """Bound on the journal; when full, ``fail_open`` refuses (503) instead of serving."""
    replicas: int = 1
    """How many gateway processes share this store (the chart sets it); sqlite allows one."""


class LedgerConfig(msgspec.Struct, **_STRUCT):
    """``ledger``: where the durable per-request records live (``store`` holds the counters)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    """``sqlite``: the file ``store.sqlite_path`` (one replica); ``postgres``: a server."""
    postgres_dsn_env: str = "CLIPIA_LEDGER_DSN"
    """The env var holding the PostgreSQL DSN (it may carry a password)."""
    retention_months: int | None = None
    """Whole months kept by ``clipia-proxy ledger prune`` (``None``: keep everything)."""
    pool_size: int = 4
    """PostgreSQL connections per replica (the pool's upper bound)."""
    statement_cache: bool = True
    """Prepared statements (asyncpg's cache); set false behind PgBouncer < 1.21 in
    transaction mode."""


class TagConfig(msgspec.Struct, **_STRUCT):
    """``attribution.tags.<name>``: one declared tag key."""

    values: tuple[str, ...] = ()
    """The values recorded as given; any other value is recorded as ``other``."""
    metric: bool = False
    """Also count spend per value in ``clipia_proxy_tag_spend_credits_total``."""


class AttributionConfig(msgspec.Struct, **_STRUCT):
    """``attribution``: who below the team spent it (tags, end user)."""

    tags: dict[str, TagConfig] = msgspec.field(default_factory=dict)
    """Tag keys recorded from ``X-Clipia-Tags`` / ``metadata``; undeclared keys are dropped."""
    end_user: Literal["record", "hash", "ignore"] = "hash"
    """``user`` / ``safety_identifier``: recorded as given, as a keyed hash, or not at all."""
    end_user_hash_key_env: str | None = None
    """Env var with the key of the end-user hash (default: derived from the Clipia key)."""


class McpConfig(msgspec.Struct, **_STRUCT):
    """``mcp``: the MCP chat tool at ``/mcp``."""

    allowed_origins: tuple[str, ...] = ()
    """Browser origins that may call ``/mcp`` (``scheme://host[:port]``, or ``:*`` for any
    port). A request with another ``Origin`` gets 403 (DNS-rebinding protection); one without
    ``Origin`` (agents, SDKs) is not affected."""


class AccountingConfig(msgspec.Struct, **_STRUCT):
    """``accounting``: periods, estimates and what happens when a client hangs up."""

    timezone: str = "Europe/Moscow"
    rubles_per_credit: Decimal = Decimal(3)
    default_output_reserve_tokens: int = 4096
    image_reserve_tokens: int = 2000
    """Reserved per image part: an image's token cost is not bounded by its URL's bytes."""
    on_disconnect: Literal["drain", "cancel"] = "cancel"
    """``cancel``: close the upstream once its id is known and settle from /v1/generation;
    ``drain``: read on (at most ``drain_timeout_seconds``) for the usage in the stream."""
    drain_timeout_seconds: float = 60.0
    drift_sample_rate: float = 0.01
    """Share of settled requests checked against ``GET /v1/generation`` (0 to 1); settlements
    whose cost did not come from the upstream (counted, reserved) are always checked."""
    drift_check_delay_seconds: float = 60.0
    """How long after its settlement a request is checked (Clipia's records may lag)."""
    key_usage_snapshot_seconds: float = 300.0
    """How often ``GET /v1/key``'s ``usage`` is snapshotted for ``reconcile`` (0: never)."""
    key_usage_path: str | None = None
    """Where the snapshots go (JSON lines). Default: ``clipia-proxy-key-usage.jsonl`` in the
    directory of ``store.sqlite_path``."""
    lease_seconds: float = 900.0
    """A reservation's lease; renewed while a stream runs, so only a crashed replica's expire."""


class LoggingConfig(msgspec.Struct, **_STRUCT):
    """``logging``: level and format of every log line (access lines included)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    """One line per request on the ``clipia_proxy.access`` logger (at INFO)."""


class AuthConfig(msgspec.Struct, **_STRUCT):
    """``auth``: how a request's team is known."""

    mode: Literal["keys", "header", "fixed"] = "keys"
    header: str = "X-Clipia-Team"
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32",)
    team: str | None = None


class BudgetConfig(msgspec.Struct, **_STRUCT):
    """``teams[].budget``: credits per calendar period (``None``: no budget for that period)."""

    day: Decimal | None = None
    week: Decimal | None = None
    month: Decimal | None = None
    total: Decimal | None = None


class LimitsConfig(msgspec.Struct, **_STRUCT):
    """``teams[].limits`` (and ``teams[].keys[].limits``): request and token rates per sliding minute, and concurrency."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


class KeyConfig(msgspec.Struct, **_STRUCT):
    """``teams[].keys[]``: one team key, stored as the hex SHA-256 of the whole key."""

    id: str
    sha256: str
    expires: dt.date | None = None
    budget: BudgetConfig | None = None
    """The key's own credits per period, on top of the team's (a request needs room in both)."""
    limits: LimitsConfig | None = None
    """The key's own RPM, TPM and concurrency, on top of the team's (the same all-or-nothing)."""


class ModelsConfig(msgspec.Struct, **_STRUCT):
    """``teams[].models``: the team's model policy (globs on canonical catalog ids)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    aliases: dict[str, str] = msgspec.field(default_factory=dict)


class CapsConfig(msgspec.Struct, **_STRUCT):
    """``teams[].caps``: per-request ceilings."""

    max_tokens: int | None = None
    n: int | None = None
    on_exceed: Literal["reject", "clamp"] = "reject"
    max_request_credits: Decimal | None = None
    """Reserved for a model whose catalog price is unknown (otherwise such requests fail closed)."""


class TeamConfig(msgspec.Struct, **_STRUCT):
    """``teams[]``: one team."""

    id: str
    label: str | None = None
    keys: tuple[KeyConfig, ...] = ()
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    caps: CapsConfig = msgspec.field(default_factory=CapsConfig)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    shadow: bool = False
    """Evaluate every limit and count would-be refusals, but block nothing."""
    environment: Literal["live", "test"] = "live"
    """``test``: the team's requests go upstream with the sandbox key only, and its spend is
    recorded apart from live spend."""


class Config(msgspec.Struct, **_STRUCT):
    """The whole validated configuration. ``upstream_api_key`` is resolved, never serialised."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    catalog: CatalogConfig = msgspec.field(default_factory=CatalogConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    accounting: AccountingConfig = msgspec.field(default_factory=AccountingConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    attribution: AttributionConfig = msgspec.field(default_factory=AttributionConfig)
    mcp: McpConfig = msgspec.field(default_factory=McpConfig)
    teams: tuple[TeamConfig, ...] = ()
    source: str = "<config>"
    """Where the config came from (a file name), for messages."""
    warnings: tuple[str, ...] = ()
    """Problems that do not stop the gateway (printed by ``check-config``, logged by ``serve``)."""

    def team(self, team_id: str) -> TeamConfig | None:
        """Return the team with this id, or ``None``."""
        for team in self.teams:
            if team.id == team_id:
                return team
        return None


class ConfigError(Exception):
    """Every problem found in a configuration, one ``file: path: problem`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: Final = tuple(problems)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

_SECTIONS: Final[dict[str, type[msgspec.Struct]]] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "catalog": CatalogConfig,
    "store": StoreConfig,
    "ledger": LedgerConfig,
    "accounting": AccountingConfig,
    "auth": AuthConfig,
    "logging": LoggingConfig,
    "attribution": AttributionConfig,
    "mcp": McpConfig,
}


def load_config(path: str | os.PathLike[str], *, resolve_secrets: bool = True) -> Config:
    """Read, validate and return the configuration at ``path``.

    With ``resolve_secrets`` the Clipia key is read (from ``upstream.api_key_env`` or
    ``upstream.api_key_file``) and a missing one is an error; without, it is a warning.
    Raises :class:`ConfigError` listing every problem.
    """
    source = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc.__class__.__name__}"]) from exc
    return parse_config(text, source=source, resolve_secrets=resolve_secrets)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    resolve_secrets: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate YAML text into a :class:`Config`; raise :class:`ConfigError` with every problem."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "invalid"
        raise ConfigError([f"{source}: invalid YAML{where}: {problem}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections"])
    problems: list[str] = []
    warnings: list[str] = []
    _scan_inline_secrets(raw, "", source, problems)
    values, team_paths = _convert_sections(raw, source, problems)
    config = Config(**values, source=source)
    _check(config, team_paths, source, problems, warnings)
    _check_environment(config, source, environ, problems if resolve_secrets else warnings)
    _check_sandbox(config, team_paths, source, environ, resolve_secrets, problems, warnings)
    if problems:
        raise ConfigError(problems)
    return msgspec.structs.replace(config, warnings=tuple(warnings))


def _convert_sections(
    raw: dict[Any, Any], source: str, problems: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Convert each top-level section; return the converted ones and the teams' paths."""
    values: dict[str, Any] = {}
    team_paths: list[str] = []
    for key, section in raw.items():
        if key in _SECTIONS:
            converted = (
                None
                if section is None
                else _convert(section, _SECTIONS[key], str(key), source, problems)
            )
            if converted is not None:
                values[key] = converted
        elif key == "teams":
            teams = _convert_teams(section, source, problems)
            if teams is not None:
                team_paths = [path for path, _ in teams]
                values["teams"] = tuple(team for _, team in teams)
        else:
            problems.append(f"{source}: {key}: unknown section")
    return values, team_paths


def _check_environment(
    config: Config, source: str, environ: Mapping[str, str] | None, found: list[str]
) -> None:
    """The secrets the config names must be there (problems, or warnings when not resolved)."""
    api_key_problem = _check_secret_source(config.upstream, source, environ)
    if api_key_problem:
        found.append(api_key_problem)
    env = os.environ if environ is None else environ
    token_env = config.server.admin_token_env
    if token_env is not None and not env.get(token_env, "").strip():
        found.append(
            f"{source}: server.admin_token_env: the environment variable {token_env} is not set"
        )
    if config.store.backend == "redis" and not env.get(config.store.redis_url_env, "").strip():
        found.append(
            f"{source}: store.redis_url_env: the environment variable "
            f"{config.store.redis_url_env} is not set"
        )
    ledger = config.ledger
    if ledger.backend == "postgres" and not env.get(ledger.postgres_dsn_env, "").strip():
        found.append(
            f"{source}: ledger.postgres_dsn_env: the environment variable "
            f"{ledger.postgres_dsn_env} is not set"
        )


_LIVE_PREFIX: Final = "clipia_live_"
_TEST_PREFIX: Final = "clipia_test_"


def _live_key_value(upstream: UpstreamConfig, env: Mapping[str, str]) -> str | None:
    if upstream.api_key_file:
        try:
            return Path(upstream.api_key_file).read_text(encoding="utf-8").strip()
        except OSError:
            return None
    return env.get(upstream.api_key_env, "").strip() if upstream.api_key_env else None


def _check_sandbox(
    config: Config,
    team_paths: list[str],
    source: str,
    environ: Mapping[str, str] | None,
    resolve: bool,
    problems: list[str],
    warnings: list[str],
) -> None:
    """Sandbox teams need the sandbox key, and neither key variable may hold the other kind."""
    env = os.environ if environ is None else environ
    upstream = config.upstream
    test_teams = [
        (path, team)
        for path, team in zip(team_paths, config.teams, strict=False)
        if team.environment == "test"
    ]
    if upstream.test_api_key_env is None:
        problems.extend(
            f"{source}: {path}.environment: a test team needs the sandbox key: set "
            "upstream.test_api_key_env"
            for path, _ in test_teams
        )
        return
    if upstream.test_api_key_env == upstream.api_key_env:
        problems.append(
            f"{source}: upstream.test_api_key_env: must name another variable than api_key_env"
        )
        return
    test_value = env.get(upstream.test_api_key_env, "").strip()
    if not test_value:
        if test_teams:
            (problems if resolve else warnings).append(
                f"{source}: upstream.test_api_key_env: the environment variable "
                f"{upstream.test_api_key_env} is not set"
            )
    elif test_value.startswith(_LIVE_PREFIX):
        problems.append(
            f"{source}: upstream.test_api_key_env: {upstream.test_api_key_env} holds a live key "
            f"({_LIVE_PREFIX}…); it must hold the sandbox key ({_TEST_PREFIX}…)"
        )
    live_value = _live_key_value(upstream, env)
    if live_value and live_value.startswith(_TEST_PREFIX):
        where = "api_key_file" if upstream.api_key_file else "api_key_env"
        problems.append(
            f"{source}: upstream.{where}: the live key is a sandbox key ({_TEST_PREFIX}…) while "
            "upstream.test_api_key_env is set; it must hold the live key "
            f"({_LIVE_PREFIX}…)"
        )


def read_test_api_key(
    upstream: UpstreamConfig, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """Return the sandbox key named by ``upstream.test_api_key_env``, or ``None`` (unset/empty)."""
    if upstream.test_api_key_env is None:
        return None
    env = os.environ if environ is None else environ
    value = env.get(upstream.test_api_key_env, "").strip()
    return Secret(value) if value else None


def read_admin_token(
    server: ServerConfig, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """Return the admin port's ``/metrics`` token named by ``server.admin_token_env``, or None.

    Raises :class:`ConfigError` when the variable is named but unset (never serve ``/metrics``
    openly by accident).
    """
    if server.admin_token_env is None:
        return None
    env = os.environ if environ is None else environ
    value = env.get(server.admin_token_env, "").strip()
    if not value:
        raise ConfigError(
            [
                f"server.admin_token_env: the environment variable {server.admin_token_env} "
                "is not set"
            ]
        )
    return Secret(value)


def read_api_key(upstream: UpstreamConfig, environ: Mapping[str, str] | None = None) -> Secret:
    """Return the Clipia key named by the config; raise :class:`ConfigError` if it is missing."""
    problem = _check_secret_source(upstream, "config", environ)
    if problem:
        raise ConfigError([problem])
    env = os.environ if environ is None else environ
    if upstream.api_key_file:
        value = Path(upstream.api_key_file).read_text(encoding="utf-8").strip()
    else:
        assert upstream.api_key_env is not None  # _check_secret_source guarantees one source
        value = env[upstream.api_key_env].strip()
    return Secret(value)


def _check_secret_source(
    upstream: UpstreamConfig, source: str, environ: Mapping[str, str] | None
) -> str | None:
    env = os.environ if environ is None else environ
    if upstream.api_key_file:
        path = Path(upstream.api_key_file)
        try:
            if not path.read_text(encoding="utf-8").strip():
                return f"{source}: upstream.api_key_file: the file {str(path)!r} is empty"
        except OSError:
            return f"{source}: upstream.api_key_file: cannot read {str(path)!r}"
        return None
    if upstream.api_key_env:
        if not env.get(upstream.api_key_env, "").strip():
            return (
                f"{source}: upstream.api_key_env: the environment variable "
                f"{upstream.api_key_env} is not set"
            )
        return None
    return f"{source}: upstream: name the Clipia key with api_key_env or api_key_file"


def _scan_inline_secrets(node: object, path: str, source: str, problems: list[str]) -> None:
    """Refuse anything that looks like a secret written inline (the value is never echoed)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _scan_inline_secrets(value, _join(path, str(key)), source, problems)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _scan_inline_secrets(value, f"{path}[{index}]", source, problems)
    elif isinstance(node, str) and _INLINE_SECRET_RE.search(node) and not _names_a_file(path, node):
        problems.append(
            f"{source}: {path}: looks like a secret written inline; name it instead "
            "(upstream.api_key_env / api_key_file; team keys are stored as sha256)"
        )


def _names_a_file(path: str, value: str) -> bool:
    """Whether ``value`` is a file's path in a ``*_path`` / ``*_file`` setting.

    Such a path may spell a key's prefix (``/run/secrets/clipia_live_key``, a directory named
    ``cpx_data``) without holding a key; a key pasted there holds no ``/`` and is refused.
    """
    return path.endswith(("_path", "_file")) and "/" in value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_MSGSPEC_PATH_RE: Final = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD_RE: Final = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")


def _convert(
    raw: object, kind: type[msgspec.Struct], path: str, source: str, problems: list[str]
) -> Any:
    """Convert ``raw`` into ``kind``, collecting every field problem, or return ``None``."""
    current = raw
    for _ in range(_MAX_FIX_ROUNDS):
        try:
            return msgspec.convert(current, kind, strict=True)
        except msgspec.ValidationError as exc:
            match = _MSGSPEC_PATH_RE.match(str(exc))
            assert match is not None  # the pattern matches any string
            message, sub = match["msg"], match["path"] or ""
            unknown = _UNKNOWN_FIELD_RE.match(message)
            if unknown:
                sub = f"{sub}.{unknown['field']}"
                message = "unknown key"
            full = path + sub
            problems.append(f"{source}: {full}: {_humanise(message, raw, sub)}")
            fixed = _without(current, sub)
            if fixed is None:
                return None
            current = fixed
    return None  # pragma: no cover - more problems than rounds; enough has been reported


def _humanise(message: str, raw: object, sub: str) -> str:
    text = message[0].lower() + message[1:] if message else message
    text = text.replace("`", "")
    if text.startswith("invalid decimal string"):
        text = "must be a number"
        value = _lookup(raw, sub)
        if isinstance(value, str) and len(value) <= 40 and not _INLINE_SECRET_RE.search(value):
            text += f" (got {value!r})"
        return text
    if text.startswith("expected"):
        value = _lookup(raw, sub)
        shown = isinstance(value, int | float) or (
            isinstance(value, str) and len(value) <= 40 and not _INLINE_SECRET_RE.search(value)
        )
        if shown:
            text = re.sub(r", got \w+$", "", text) + f" (got {value!r})"
    return text


_PATH_PART_RE: Final = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _parts(sub: str) -> list[str | int]:
    return [m[1] if m[1] is not None else int(m[2]) for m in _PATH_PART_RE.finditer(sub)]


def _lookup(raw: object, sub: str) -> object:
    node = raw
    for part in _parts(sub):
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return None
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _without(raw: object, sub: str) -> object | None:
    """Return a copy of ``raw`` without the element at ``sub``; ``None`` if it cannot go."""
    parts = _parts(sub)
    if not parts:
        return None

    def drop(node: object, rest: list[str | int]) -> object | None:
        head, tail = rest[0], rest[1:]
        if isinstance(node, dict) and isinstance(head, str) and head in node:
            copy = dict(node)
            if tail:
                child = drop(copy[head], tail)
                if child is None:
                    return None
                copy[head] = child
            else:
                del copy[head]
            return copy
        if isinstance(node, list) and isinstance(head, int) and head < len(node):
            items = list(node)
            if tail:
                child = drop(items[head], tail)
                if child is None:
                    return None
                items[head] = child
                return items
            return None  # removing a list element would shift later paths
        return None

    return drop(raw, parts)


def _convert_teams(
    raw: object, source: str, problems: list[str]
) -> list[tuple[str, TeamConfig]] | None:
    """Convert each team on its own; return ``(path, team)`` for those that converted."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append(f"{source}: teams: expected a list of teams")
        return None
    teams: list[tuple[str, TeamConfig]] = []
    for index, item in enumerate(raw):
        path = f"teams[{index}]"
        team = _convert(item, TeamConfig, path, source, problems)
        if team is not None:
            teams.append((path, team))
    return teams


class _Findings:
    """The problems and warnings of one load, each line prefixed with the config's name."""

    __slots__ = ("problems", "source", "warnings")

    def __init__(self, source: str, problems: list[str], warnings: list[str]) -> None:
        self.source = source
        self.problems = problems
        self.warnings = warnings

    def problem(self, path: str, message: str) -> None:
        """Record a problem that stops the gateway: ``source: path: message``."""
        self.problems.append(f"{self.source}: {path}: {message}")

    def warn(self, path: str, message: str) -> None:
        """Record a problem the gateway runs with (``check-config`` prints it)."""
        self.warnings.append(f"{self.source}: {path}: {message}")


def _check(
    config: Config, team_paths: list[str], source: str, problems: list[str], warnings: list[str]
) -> None:
    """The cross-field pass: what no single field can tell, one function per section."""
    found = _Findings(source, problems, warnings)
    for check in _SECTION_CHECKS:
        check(config, found)
    _check_teams(config, team_paths, found)


def _check_server(config: Config, found: _Findings) -> None:
    server = config.server
    for name in ("port", "admin_port"):
        port = getattr(server, name)
        if not 0 <= port <= 65535:
            found.problem(f"server.{name}", f"must be a TCP port 0-65535 (got {port})")
    if server.port == server.admin_port and server.port != 0:
        found.problem("server.admin_port", "must differ from server.port")
    if server.max_body_bytes <= 0:
        found.problem("server.max_body_bytes", "must be a positive number of bytes")
    if server.shutdown_grace_seconds < 0:
        found.problem("server.shutdown_grace_seconds", "must not be negative")
    for name in ("header_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        if getattr(server, name) <= 0:
            found.problem(f"server.{name}", "must be a positive number of seconds")
    if server.max_header_bytes < 1024:
        found.problem("server.max_header_bytes", "must be at least 1024 bytes")
    for name in ("max_connections", "admin_max_connections"):
        if getattr(server, name) < 1:
            found.problem(f"server.{name}", "must be at least 1")


def _check_upstream(config: Config, found: _Findings) -> None:
    upstream = config.upstream
    if not re.match(r"https?://[^/\s?#]+(/[^\s?#]*)?$", upstream.base_url):
        found.problem("upstream.base_url", "must be an http(s) URL without query or fragment")
    if upstream.api_key_env and upstream.api_key_file:
        found.problem("upstream", "set only one of api_key_env and api_key_file")
    for name in (
        "connect_timeout_seconds",
        "first_byte_timeout_seconds",
        "idle_timeout_seconds",
    ):
        if getattr(upstream, name) <= 0:
            found.problem(f"upstream.{name}", "must be a positive number of seconds")
    if upstream.max_connections <= 0:
        found.problem("upstream.max_connections", "must be positive")
    per_team = upstream.max_connections_per_team
    if per_team is not None and not 0 < per_team <= upstream.max_connections:
        found.problem(
            "upstream.max_connections_per_team", "must be between 1 and upstream.max_connections"
        )
    if not 0 <= upstream.retries <= 10:
        found.problem("upstream.retries", f"must be between 0 and 10 (got {upstream.retries})")
    if upstream.max_retry_wait_seconds < 0:
        found.problem("upstream.max_retry_wait_seconds", "must not be negative")
    for status in upstream.retry_on_status:
        if status != 429 and not 500 <= status <= 599:
            found.problem(
                "upstream.retry_on_status", f"only 429 and 5xx can be retried (got {status})"
            )
    if upstream.proxy_url is not None and not re.match(
        r"https?://([^/\s?#@]+@)?[^/\s?#@]+/?$", upstream.proxy_url
    ):
        found.problem("upstream.proxy_url", "must be an http(s) URL of a proxy: scheme, host, port")


def _check_catalog(config: Config, found: _Findings) -> None:
    if config.catalog.ttl_seconds <= 0:
        found.problem("catalog.ttl_seconds", "must be positive")
    if config.catalog.max_stale_seconds < config.catalog.ttl_seconds:
        found.problem("catalog.max_stale_seconds", "must be at least catalog.ttl_seconds")


def _check_store(config: Config, found: _Findings) -> None:
    store = config.store
    if store.backend == "sqlite" and store.replicas > 1:
        found.problem(
            "store.backend",
            f"sqlite serves one replica only (store.replicas is {store.replicas}); use redis",
        )
    if store.replicas < 1:
        found.problem("store.replicas", "must be at least 1")
    if store.timeout_seconds <= 0:
        found.problem("store.timeout_seconds", "must be a positive number of seconds")
    if store.journal_max_bytes < 64 * 1024:
        found.problem("store.journal_max_bytes", "must be at least 65536")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", store.redis_key_prefix):
        found.problem("store.redis_key_prefix", "must be 1-64 characters of letters, digits, _.:-")


def _check_ledger(config: Config, found: _Findings) -> None:
    ledger = config.ledger
    if config.store.backend == "redis" and ledger.backend != "postgres":
        found.problem(
            "store.backend",
            "redis counters need the PostgreSQL ledger (Redis keeps no records): set "
            "ledger.backend: postgres and ledger.postgres_dsn_env (the env var with the DSN)",
        )
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", ledger.postgres_dsn_env):
        found.problem("ledger.postgres_dsn_env", "must be an environment variable name")
    if ledger.retention_months is not None and ledger.retention_months < 2:
        found.problem(
            "ledger.retention_months",
            "must be at least 2 (the current and the previous month are always kept)",
        )
    if not 1 <= ledger.pool_size <= 100:
        found.problem("ledger.pool_size", f"must be between 1 and 100 (got {ledger.pool_size})")


def _check_accounting(config: Config, found: _Findings) -> None:
    accounting = config.accounting
    try:
        ZoneInfo(accounting.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        found.problem("accounting.timezone", f"unknown time zone {accounting.timezone[:40]!r}")
    if accounting.rubles_per_credit <= 0:
        found.problem("accounting.rubles_per_credit", "must be a positive number")
    for name in ("default_output_reserve_tokens", "image_reserve_tokens"):
        if getattr(accounting, name) <= 0:
            found.problem(f"accounting.{name}", "must be a positive number of tokens")
    if not 0 <= accounting.drift_sample_rate <= 1:
        found.problem("accounting.drift_sample_rate", "must be between 0 and 1")
    if accounting.key_usage_snapshot_seconds < 0:
        found.problem("accounting.key_usage_snapshot_seconds", "must not be negative")
    if accounting.drift_check_delay_seconds < 0:
        found.problem("accounting.drift_check_delay_seconds", "must not be negative")
    if accounting.drain_timeout_seconds < 0:
        found.problem("accounting.drain_timeout_seconds", "must not be negative")
    if accounting.lease_seconds <= config.upstream.first_byte_timeout_seconds:
        found.problem(
            "accounting.lease_seconds",
            "must be longer than upstream.first_byte_timeout_seconds "
            "(a reservation must outlive the wait for Clipia's answer)",
        )


def _check_auth(config: Config, found: _Findings) -> None:
    auth = config.auth
    for index, cidr in enumerate(auth.trusted_proxies):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            found.problem(f"auth.trusted_proxies[{index}]", f"not an IP network: {cidr!r}")
    if not re.fullmatch(r"[A-Za-z0-9-]+", auth.header):
        found.problem("auth.header", "must be an HTTP header name")
    elif auth.header.lower() in {"authorization", "x-api-key", "cookie", "host"}:
        found.problem("auth.header", "must not be a credential or routing header")
    if auth.mode == "header" and not auth.trusted_proxies:
        found.problem("auth.trusted_proxies", "mode header needs at least one trusted proxy")
    if auth.mode == "fixed":
        if not auth.team:
            found.problem("auth.team", "mode fixed needs the team every request belongs to")
        elif config.team(auth.team) is None:
            found.problem("auth.team", f"no team with id {auth.team!r}")
        if config.server.host not in {"127.0.0.1", "::1", "localhost"}:
            found.warn(
                "server.host",
                "auth.mode fixed serves anyone who can connect; bind the sidecar to 127.0.0.1",
            )
    elif auth.team is not None:
        found.problem("auth.team", "only used with auth.mode fixed")


_MAX_TAGS: Final = 16
_MAX_TAG_VALUES: Final = 256
_TAG_VALUE_RE: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,63}")


_ORIGIN_RE: Final = re.compile(
    r"[a-z][a-z0-9+.-]*://(?:\[[0-9a-f:.]+\]|[^\s/?#@:\[\]A-Z]+)(?::(?:[0-9]{1,5}|\*))?"
)


def _check_mcp(config: Config, found: _Findings) -> None:
    """``mcp.allowed_origins``: each one origin as browsers send it (no path, no slash)."""
    for index, origin in enumerate(config.mcp.allowed_origins):
        if not _ORIGIN_RE.fullmatch(origin):
            found.problem(
                f"mcp.allowed_origins[{index}]",
                f"{origin[:60]!r}: an origin is scheme://host or scheme://host:port in lowercase, "
                "no path (':*' for any port), e.g. 'https://chat.example.com'",
            )


def _check_attribution(config: Config, found: _Findings) -> None:
    """Tag names and values are short identifiers, and few: they bound the metric's series."""
    tags = config.attribution.tags
    if len(tags) > _MAX_TAGS:
        found.problem("attribution.tags", f"at most {_MAX_TAGS} tag keys")
    for name, tag in tags.items():
        path = f"attribution.tags.{name}"
        if not _ID_RE.fullmatch(name):
            found.problem(path, "a tag key is letters, digits, '.', '_' or '-' (at most 63)")
        if tag.metric and not tag.values:
            found.problem(f"{path}.metric", "a metric tag needs its values declared (bounded)")
        if len(tag.values) > _MAX_TAG_VALUES:
            found.problem(f"{path}.values", f"at most {_MAX_TAG_VALUES} values")
        for value in tag.values:
            if not _TAG_VALUE_RE.fullmatch(value) or value == "other":
                found.problem(
                    f"{path}.values",
                    f"{value[:40]!r}: a value is 1-63 of letters, digits, '.', '_', ':', '/', "
                    "'-' (and not 'other', which stands for every undeclared value)",
                )


_SECTION_CHECKS: Final = (
    _check_server,
    _check_upstream,
    _check_catalog,
    _check_store,
    _check_ledger,
    _check_accounting,
    _check_auth,
    _check_attribution,
    _check_mcp,
)
"""The per-section checks, run in this order (a new section adds its function here)."""


def _check_teams(config: Config, team_paths: list[str], found: _Findings) -> None:
    """Team ids and key hashes unique across teams; each team's own fields."""
    seen_ids: dict[str, str] = {}
    seen_hashes: dict[str, str] = {}
    for path, team in zip(team_paths, config.teams, strict=True):
        if not _ID_RE.fullmatch(team.id):
            found.problem(f"{path}.id", "must be 1-63 characters of letters, digits, '.', '_', '-'")
        if team.id in seen_ids:
            found.problem(f"{path}.id", f"duplicate team id {team.id!r} (also {seen_ids[team.id]})")
        seen_ids.setdefault(team.id, path)
        if config.auth.mode == "keys" and not team.keys:
            found.warn(f"{path}.keys", f"team {team.id!r} has no key and cannot call")
        _check_team_keys(team, path, seen_hashes, found)
        _check_models(team, path, found.problem)
        _check_team_numbers(team, path, found)


def _check_team_keys(
    team: TeamConfig, path: str, seen_hashes: dict[str, str], found: _Findings
) -> None:
    key_ids: set[str] = set()
    for k_index, key in enumerate(team.keys):
        k_path = f"{path}.keys[{k_index}]"
        if key.id in key_ids:
            found.problem(f"{k_path}.id", f"duplicate key id {key.id!r} in this team")
        key_ids.add(key.id)
        if not _SHA256_RE.fullmatch(key.sha256):
            found.problem(f"{k_path}.sha256", "must be 64 lowercase hex characters (a SHA-256)")
        elif key.sha256 in seen_hashes:
            found.problem(
                f"{k_path}.sha256", f"the same key hash is used by {seen_hashes[key.sha256]}"
            )
        else:
            seen_hashes[key.sha256] = k_path


def _check_team_numbers(team: TeamConfig, path: str, found: _Findings) -> None:
    """Caps, budgets and limits: positive where set."""
    caps = team.caps
    if caps.max_tokens is not None and caps.max_tokens <= 0:
        found.problem(f"{path}.caps.max_tokens", "must be a positive number of tokens")
    if caps.n is not None and caps.n <= 0:
        found.problem(f"{path}.caps.n", "must be positive")
    if caps.max_request_credits is not None and caps.max_request_credits <= 0:
        found.problem(f"{path}.caps.max_request_credits", "must be a positive number")
    _check_budget(team.budget, f"{path}.budget", found)
    _check_limits(team.limits, f"{path}.limits", found)
    for k_index, key in enumerate(team.keys):
        k_path = f"{path}.keys[{k_index}]"
        if key.budget is not None:
            _check_budget(key.budget, f"{k_path}.budget", found)
        if key.limits is None:
            continue
        _check_limits(key.limits, f"{k_path}.limits", found)
        for name in ("rpm", "tpm", "concurrency"):
            own, shared = getattr(key.limits, name), getattr(team.limits, name)
            if own is not None and shared is not None and 0 < shared < own:
                found.warn(
                    f"{k_path}.limits.{name}",
                    f"key {key.id!r} allows {own} but its team {team.id!r} only {shared}: the "
                    "team's limit binds first",
                )


def _check_budget(budget: BudgetConfig, path: str, found: _Findings) -> None:
    for period in ("day", "week", "month", "total"):
        amount = getattr(budget, period)
        if amount is not None and (not amount.is_finite() or amount < 0):
            found.problem(f"{path}.{period}", f"must be a positive number (got {amount})")


def _check_limits(limits: LimitsConfig, path: str, found: _Findings) -> None:
    for name in ("rpm", "tpm", "concurrency"):
        value = getattr(limits, name)
        if value is not None and value <= 0:
            found.problem(f"{path}.{name}", f"must be a positive integer (got {value})")


def _check_models(team: TeamConfig, path: str, problem: Callable[[str, str], None]) -> None:
    models = team.models
    for kind in ("allow", "deny"):
        for index, pattern in enumerate(getattr(models, kind)):
            if not pattern or pattern != pattern.strip() or any(ord(c) < 32 for c in pattern):
                problem(
                    f"{path}.models.{kind}[{index}]", "must be a non-empty pattern without spaces"
                )
    for alias in models.aliases:
        a_path = f"{path}.models.aliases.{alias}"
        if not alias or alias != alias.strip() or any(c in alias for c in "*?[]"):
            problem(a_path, "alias names must be plain, non-empty model names")
        if alias in models.allow or alias in models.deny or alias in models.aliases.values():
            problem(a_path, "alias shadows a model id named in this team's policy")
        message = _alias_target_problem(models, alias)
        if message:
            problem(a_path, message)


def _alias_target_problem(models: ModelsConfig, alias: str) -> str | None:
    """Follow ``alias`` to the model it names: a cycle, or a target the policy refuses."""
    aliases = models.aliases
    seen = [alias]
    current = aliases[alias]
    while current in aliases:
        if current in seen:
            return f"alias cycle: {' -> '.join([*seen, current])}"
        seen.append(current)
        current = aliases[current]
    if any(fnmatch.fnmatchcase(current, p) for p in models.deny):
        return f"alias points at {current!r}, which the team's deny list refuses"
    if not any(fnmatch.fnmatchcase(current, p) for p in models.allow):
        return f"alias points at {current!r}, which the team's allow list lacks"
    return None

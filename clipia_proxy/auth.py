"""Who is calling: team keys, a trusted identity header, or a fixed team → a Principal.

Pure functions of the request's headers and socket peer (no aiohttp, no I/O). Keys are
high-entropy random strings, so storing their SHA-256 is right (no slow hash needed); the
lookup hashes the presented key, finds the candidate by digest and confirms it with
``hmac.compare_digest``. Every refusal is the same :class:`InvalidApiKey` message, so a caller
learns nothing about why; the reason is kept on the exception for the logs.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Final

import msgspec

from .config import Config
from .errors import InvalidApiKey, InvalidRequest

__all__ = [
    "KEY_PREFIX",
    "Authenticator",
    "Principal",
    "generate_key",
    "hash_key",
]

KEY_PREFIX: Final = "cpx_"
"""Every team key starts with this, so a leaked key is easy to grep for and to tell apart."""
_KEY_RE: Final = re.compile(r"cpx_[A-Za-z0-9_-]{43}")
_MAX_CREDENTIAL_CHARS: Final = 512
UNAUTHORIZED_MESSAGE: Final = (
    "Invalid or missing team API key. Send it as 'Authorization: Bearer <key>'."
)


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The team a request belongs to, and the key id that proved it (``None`` without keys)."""

    team: str
    key_id: str | None = None


class _KeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    digest: bytes
    team: str
    key_id: str
    expires: dt.date | None
    principal: Principal


def generate_key() -> str:
    """Return a new team key: the prefix and 32 random bytes, base64url without padding."""
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_key(key: str) -> str:
    """Return the hex SHA-256 of the whole key (what ``teams[].keys[].sha256`` holds)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Refusal(InvalidApiKey):
    """An identity refusal; ``detail`` is for logs only, the client sees one fixed message."""

    def __init__(self, detail: str) -> None:
        super().__init__(UNAUTHORIZED_MESSAGE)
        self.detail: Final = detail


class Authenticator:
    """Turn request headers and the socket peer into a :class:`Principal` per ``config.auth``.

    ``authenticate`` never returns ``None``: it returns a principal or raises.
    """

    def __init__(self, config: Config, *, today: Callable[[], dt.date] | None = None) -> None:
        self._mode = config.auth.mode
        self._header = config.auth.header
        self._fixed_team = config.auth.team
        self._networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.auth.trusted_proxies
        )
        self._teams = frozenset(team.id for team in config.teams)
        self._keys: dict[bytes, _KeyEntry] = {}
        for team in config.teams:
            for key in team.keys:
                digest = bytes.fromhex(key.sha256)
                self._keys[digest] = _KeyEntry(
                    digest=digest,
                    team=team.id,
                    key_id=key.id,
                    expires=key.expires,
                    principal=Principal(team=team.id, key_id=key.id),
                )
        self._today = today or dt.date.today
        self._known: dict[str, _KeyEntry] = {}
        """Presented key -> its entry, for keys that already passed the full check once.
        Only configured keys get in (bounded by the config); rebuilt with each reload."""

    @property
    def needs_peer(self) -> bool:
        """Whether ``authenticate`` looks at the socket peer (only the identity-header mode)."""
        return self._mode == "header"

    def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        """Return who is calling, or raise :class:`Refusal` (401) / :class:`InvalidRequest`.

        ``headers`` must be a case-insensitive multi-dict view (``getall`` is used when present).
        """
        if self._mode == "keys":
            return self._by_key(headers)
        if self._mode == "header":
            return self._by_header(headers, peer)
        assert self._fixed_team is not None  # config validation guarantees it
        return Principal(team=self._fixed_team)

    def _by_key(self, headers: Mapping[str, str]) -> Principal:
        entry = self._fast_entry(headers)
        if entry is not None:
            if entry.expires is not None and self._today() > entry.expires:
                raise Refusal(f"key {entry.key_id} expired on {entry.expires.isoformat()}")
            return entry.principal
        presented = _credentials(headers)
        if not presented:
            raise Refusal("no credentials")
        if len(presented) > 1:
            raise Refusal("one credential channel sent twice")
        (key,) = presented
        if not _KEY_RE.fullmatch(key):
            raise Refusal("malformed key")
        digest = hashlib.sha256(key.encode()).digest()
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise Refusal("unknown key")
        if entry.expires is not None and self._today() > entry.expires:
            raise Refusal(f"key {entry.key_id} expired on {entry.expires.isoformat()}")
        self._known[key] = entry
        return entry.principal

    def _fast_entry(self, headers: Mapping[str, str]) -> _KeyEntry | None:
        """The common case, cheaply: one ``Authorization: Bearer <known key>`` and nothing else.

        Anything else (another channel, a repeated header, other spacing or scheme) takes the
        full path, which gives the same answer for the cases this one accepts.
        """
        authorization = headers.get("Authorization")
        if authorization is None or not authorization.startswith("Bearer "):
            return None
        entry = self._known.get(authorization[7:])
        if entry is None or len(_getall(headers, "Authorization")) != 1:
            return None
        return entry

    def _by_header(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        values = _getall(headers, self._header)
        if len(values) > 1:
            raise InvalidRequest(f"the {self._header} header was sent more than once")
        if peer is None or not self._is_trusted(peer):
            raise Refusal("identity header from an untrusted peer")
        if not values:
            raise Refusal("no identity header")
        team = values[0]
        if team not in self._teams:
            raise Refusal("unknown team in identity header")
        return Principal(team=team)

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)


def _getall(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = getall(name, [])
        return values
    value = headers.get(name)
    return [] if value is None else [value]


def _credentials(headers: Mapping[str, str]) -> set[str]:
    """Return the credential presented in the channels Clipia accepts (two: ambiguous).

    ``Authorization`` wins: when it is present, it alone is read, and an ``X-Api-Key`` left
    over from another tool is ignored (never forwarded either). ``X-Api-Key`` is read only
    without ``Authorization``. A channel sent twice is ambiguous and refused.
    """
    authorization = _getall(headers, "Authorization")
    if len(authorization) > 1:
        return {"<several>", "<ambiguous>"}
    if authorization:
        scheme, _, token = authorization[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() in {"bearer", "key"} and token:
            return {token[:_MAX_CREDENTIAL_CHARS]}
        return {"<unsupported authorization scheme>"}
    api_key = _getall(headers, "X-Api-Key")
    if len(api_key) > 1:
        return {"<several>", "<ambiguous>"}
    return {value.strip()[:_MAX_CREDENTIAL_CHARS] or "<empty>" for value in api_key}

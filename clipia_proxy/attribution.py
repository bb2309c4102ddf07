"""Attribution below the team: declared tags and the end user of each request.

Tags come from the ``X-Clipia-Tags: k=v,k2=v2`` header or the body's OpenAI ``metadata``
object (the header wins for a key given in both). Only keys declared in ``attribution.tags``
are kept; a key with declared ``values`` records one of them or ``other``, so its values are
bounded (and may be a metric label); a key without declared values records the value as given
when it is a short identifier, else ``other`` (ledger and report only, never a metric label).

The end user is the body's ``safety_identifier`` (else ``user``), recorded per
``attribution.end_user``: as given (``record``, cut to 256 characters), as a keyed hash
(``hash``, the default: HMAC-SHA256 under a key of the gateway's, so the same user always gets
the same id and the id cannot be reversed by guessing), or not at all (``ignore``). It is never
a metric label.

Pure functions of the headers and the decoded body; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Final

import msgspec

from .config import AttributionConfig

__all__ = ["OTHER", "TAGS_HEADER", "Attribution", "Attributor", "hash_key_from"]

TAGS_HEADER: Final = "X-Clipia-Tags"
OTHER: Final = "other"
_MAX_HEADER_CHARS: Final = 4096
"""A longer tags header is read up to this many characters (the rest is ignored)."""
_MAX_END_USER_CHARS: Final = 256
_FREE_VALUE_RE: Final = re.compile(r"[A-Za-z0-9_.:/-]{1,63}")


class Attribution(msgspec.Struct, frozen=True, kw_only=True):
    """What one request is attributed to, below its team and key."""

    tags: dict[str, str] = msgspec.field(default_factory=dict)
    end_user: str | None = None


class Attributor:
    """Turn a request's headers and body into its :class:`Attribution`, per the config."""

    def __init__(self, config: AttributionConfig, hash_key: bytes) -> None:
        self._hash_key = hash_key
        self.apply(config)

    def apply(self, config: AttributionConfig) -> None:
        """Take a (re)loaded ``attribution`` section."""
        self._mode = config.end_user
        self._tags = {
            name: frozenset(tag.values) if tag.values else None for name, tag in config.tags.items()
        }
        self._metric_tags = frozenset(
            name for name, tag in config.tags.items() if tag.metric and tag.values
        )

    def of(self, headers: Mapping[str, str], body: Mapping[str, object]) -> Attribution:
        """Return the request's attribution (never raises: bad tags are dropped)."""
        tags: dict[str, str] = {}
        if self._tags:
            metadata = body.get("metadata")
            if isinstance(metadata, dict):
                self._add(tags, ((k, v) for k, v in metadata.items() if isinstance(v, str)))
            getall = getattr(headers, "getall", None)
            values: list[str] = (
                getall(TAGS_HEADER, []) if getall is not None else [headers.get(TAGS_HEADER, "")]
            )
            text = ",".join(values)[:_MAX_HEADER_CHARS]
            self._add(tags, (pair.partition("=")[::2] for pair in text.split(",") if pair))
        return Attribution(tags=tags, end_user=self._end_user(body))

    def _add(self, tags: dict[str, str], pairs: Iterable[tuple[str, str]]) -> None:
        for raw_key, raw_value in pairs:
            key, value = str(raw_key).strip(), raw_value.strip()
            if key not in self._tags:
                continue  # undeclared: never recorded
            allowed = self._tags[key]
            if allowed is not None:
                tags[key] = value if value in allowed else OTHER
            else:
                tags[key] = value if _FREE_VALUE_RE.fullmatch(value) else OTHER

    def metric_tags(self, tags: Mapping[str, str]) -> dict[str, str]:
        """Return the tags that are metric labels (declared ``metric: true``, bounded values)."""
        return {name: value for name, value in tags.items() if name in self._metric_tags}

    def _end_user(self, body: Mapping[str, object]) -> str | None:
        if self._mode == "ignore":
            return None
        given = body.get("safety_identifier")
        if not isinstance(given, str) or not given:
            given = body.get("user")
        if not isinstance(given, str) or not given:
            return None
        if self._mode == "record":
            return given[:_MAX_END_USER_CHARS]
        digest = hmac.new(self._hash_key, given.encode(), hashlib.sha256).hexdigest()
        return "h:" + digest[:32]


def hash_key_from(secret: str) -> bytes:
    """Derive the end-user hash key from a secret (the named key, or the Clipia key)."""
    return hashlib.sha256(b"clipia-proxy end-user hash\0" + secret.encode()).digest()

r"""Whether upstream bytes quote the gateway's Clipia key: whole, in part, or escaped.

Clipia (or anything between it and the gateway) may echo the key it was sent: in an error
message, a header, a completion, a stream. Whatever quotes it is never relayed. The scan is
built once per key and is cheap enough for every answer and every stream chunk:

- the key's secret part (after ``clipia_live_`` / ``clipia_test_``) is cut into 8-character
  pieces end to end, plus its last 8: any quoted fragment of 15 characters or more (and the
  usual masks, its first or last 8 characters) contains one piece whole;
- one regular-expression pass over the raw bytes finds a piece, or an escape; only bytes
  holding an escape (``\u`` or ``%``) are also searched once decoded, so
  ``clipia\u005flive\u005f…`` or a percent-encoded key is found too (a key never holds
  ``/``, so ``\/`` needs no decoding).

A stream is scanned chunk by chunk with the end of the previous chunk kept, so a fragment
split across two reads is still found.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

__all__ = ["KeyScanner", "StreamScan"]

_PIECE: Final = 8
_STEP: Final = 8
_PREFIXES: Final = ("clipia_live_", "clipia_test_")
_JSON_ESCAPE: Final = re.compile(rb"\\u([0-9a-fA-F]{4})")
_CARRY: Final = 6 * 48
"""Bytes of a read holding escapes kept for the next one: a fragment written entirely as
``\\uXXXX`` escapes (6 bytes a character) still fits."""


def _unescape_json(match: re.Match[bytes]) -> bytes:
    code = int(match.group(1), 16)
    return chr(code).encode("utf-8", "surrogatepass") if code < 0x110000 else b""


class KeyScanner:
    """Find the gateway's Clipia keys (live, sandbox), or a fragment of one, in upstream bytes."""

    __slots__ = ("_first_pass", "_pieces")

    def __init__(self, *keys: str) -> None:
        pieces: set[bytes] = set()
        for key in keys:
            secret = key
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    secret = key[len(prefix) :]
            if len(secret) >= _PIECE:
                for start in range(0, len(secret) - _PIECE + 1, _STEP):
                    pieces.add(secret[start : start + _PIECE].encode())
                pieces.add(secret[-_PIECE:].encode())
            elif secret:
                pieces.add(secret.encode())
        self._pieces: Final = tuple(sorted(pieces))
        # One C-level pass finds a piece or a reason to look closer (an escape).
        self._first_pass: Final = re.compile(
            b"|".join([*map(re.escape, self._pieces), rb"\\u", b"%"])
        )

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def first_pass(self, data: bytes) -> re.Match[bytes] | None:
        """The first piece or escape in ``data`` (None: ``data`` cannot quote the key)."""
        return self._first_pass.search(data) if self._pieces else None

    def _raw_hit(self, data: bytes) -> bool:
        return any(piece in data for piece in self._pieces)

    def mentions_key(self, data: bytes) -> bool:
        """Whether ``data`` quotes the key or a fragment of it, as is or escaped."""
        found = self.first_pass(data)
        if found is None:
            return False
        if found.group() in self._pieces or self._raw_hit(data):
            return True
        if b"\\u" in data:
            decoded = _JSON_ESCAPE.sub(_unescape_json, data)
            if self._raw_hit(decoded):
                return True
            data = decoded
        if b"%" in data:
            return self._raw_hit(urllib.parse.unquote_to_bytes(data))
        return False

    def header_mentions_key(self, value: str) -> bool:
        """Whether a header value quotes the key (or a fragment of it)."""
        return self.mentions_key(value.encode("utf-8", "surrogateescape"))

    def stream(self) -> StreamScan:
        """Return a scan for one stream (it remembers the end of the previous chunk)."""
        return StreamScan(self)


class StreamScan:
    """``KeyScanner.mentions_key`` over a stream's chunks, fragments split across reads included."""

    __slots__ = ("_carry", "_scanner")

    def __init__(self, scanner: KeyScanner) -> None:
        self._scanner = scanner
        self._carry = b""

    def feed(self, chunk: bytes) -> bool:
        """Whether the stream so far, ending with ``chunk``, quotes the key."""
        data = self._carry + chunk
        scanner = self._scanner
        if scanner.first_pass(data) is None:
            # Nothing to look at: keep enough of the end for a piece split across reads.
            self._carry = data[-(_PIECE - 1) :]
            return False
        # A piece or an escape: keep a whole escaped fragment's worth, and look closer.
        self._carry = data[-_CARRY:]
        return scanner.mentions_key(data)

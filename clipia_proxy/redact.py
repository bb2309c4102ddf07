r"""Whether upstream bytes quote the gateway's Clipia key: whole, in part, or escaped.

Clipia (or anything between it and the gateway) may echo the key it was sent: in an error
message, a header, a completion, a stream. Whatever quotes it is never relayed. The scan is
built once per key and is cheap enough for every answer and every stream chunk:

- the key's secret part (after ``clipia_live_`` / ``clipia_test_``) is cut into 8-character
  pieces every 4 characters, plus its last 8: any quoted fragment of 11 characters or more
  (and the usual masks, its first or last 8 characters) contains one piece whole;
- the raw bytes are searched for each piece (``bytes.find``: C speed, no regex); only bytes
  holding an escape (``\u``, ``\/`` or ``%``) are also searched once decoded, so
  ``clipia\u005flive\u005f…`` or a percent-encoded key is found too.

A stream is scanned chunk by chunk with the end of the previous chunk kept, so a fragment
split across two reads is still found.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

__all__ = ["KeyScanner", "StreamScan"]

_PIECE: Final = 8
_STEP: Final = 4
_PREFIXES: Final = ("clipia_live_", "clipia_test_")
_JSON_ESCAPE: Final = re.compile(rb"\\u([0-9a-fA-F]{4})|\\(/)")
_CARRY: Final = 6 * 48
"""Bytes of the previous chunk kept for the next one: a fragment written entirely as
``\\uXXXX`` escapes (6 bytes a character) still fits."""


def _unescape_json(match: re.Match[bytes]) -> bytes:
    if match.group(2) is not None:
        return b"/"
    code = int(match.group(1), 16)
    return chr(code).encode("utf-8", "surrogatepass") if code < 0x110000 else b""


class KeyScanner:
    """Find the gateway's Clipia keys (live, sandbox), or a fragment of one, in upstream bytes."""

    __slots__ = ("_pieces",)

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

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def _raw_hit(self, data: bytes) -> bool:
        return any(piece in data for piece in self._pieces)

    def mentions_key(self, data: bytes) -> bool:
        """Whether ``data`` quotes the key or a fragment of it, as is or escaped."""
        if not self._pieces:
            return False
        if self._raw_hit(data):
            return True
        if b"\\u" in data or b"\\/" in data:
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
        data = self._carry + chunk if self._carry else chunk
        self._carry = data[-_CARRY:]
        return self._scanner.mentions_key(data)

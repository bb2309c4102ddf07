r"""Whether upstream bytes quote the gateway's Clipia key: whole, in part, or escaped.

Clipia (or anything between it and the gateway) may echo the key it was sent: in an error
message, a header, a completion, a stream. Whatever quotes it is never relayed. The scan is
built once per key and is cheap enough for every answer and every stream chunk:

- the key's secret part (after ``clipia_live_`` / ``clipia_test_``) is cut into 8-character
  pieces end to end, plus its last 8: any quoted fragment of 15 characters or more (and the
  usual masks, its first or last 8 characters) contains one piece whole;
- the raw bytes are searched for each piece (``bytes.count``, in C); only bytes
  holding an escape (``\u`` or ``%``) are also searched once decoded, so
  ``clipia\u005flive\u005f…`` or a percent-encoded key is found too (a key never holds
  ``/``, so ``\/`` needs no decoding). Those few substring searches cost about a third of
  one regular expression alternating the pieces over the same bytes.

A stream is scanned chunk by chunk with the end of the previous chunk kept, so a fragment
split across reads is still found. Its relay also holds back the end of each read that could
be the start of a fragment (characters of the key, raw or escaped, or an unfinished escape):
those bytes go out with the next read once it shows they are not the key, and never if it
shows they are. So no character of a fragment the scan finds reaches the client, however the
upstream splits its writes; a read ending in anything else (an SSE event's blank line) is
relayed whole at once.

The searches call ``bytes.count`` or ``bytes.find``, not ``in``: for ``sub in data`` CPython first tries ``sub``
as an integer (a byte value), so each miss raises and clears a ``TypeError`` inside (about
2,000 machine instructions, more than the search itself).
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
_HELD_CHARS: Final = 2 * _PIECE - 2
"""The longest run of key characters the scan can miss (any 15 hold a piece): the most a
stream's relay holds back, as characters (each raw, ``\\uXXXX`` or ``%XX``)."""
_UNFINISHED_ESCAPE: Final = re.compile(rb"(?:\\(?:u[0-9a-fA-F]{0,3})?|%[0-9a-fA-F]?)\Z")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_CARRY: Final = 6 * 48
"""Bytes of a read holding escapes kept for the next one: a fragment written entirely as
``\\uXXXX`` escapes (6 bytes a character) still fits."""


def _has_json_escape(data: bytes) -> bool:
    r"""Whether ``data`` holds ``\u``.

    The one-byte search first: a memchr, ~15 times faster than the two-byte search, and most
    answers hold no backslash at all.
    """
    return data.find(b"\\") != -1 and data.find(b"\\u") != -1


def _unescape_json(match: re.Match[bytes]) -> bytes:
    code = int(match.group(1), 16)
    return chr(code).encode("utf-8", "surrogatepass") if code < 0x110000 else b""


class KeyScanner:
    """Find the gateway's Clipia keys (live, sandbox), or a fragment of one, in upstream bytes."""

    __slots__ = (
        "_clean_headers",
        "_fragments",
        "_pieces",
        "_tail_bytes",
    )

    def __init__(self, *keys: str) -> None:
        pieces: set[bytes] = set()
        fragments: set[bytes] = set()
        for key in keys:
            secret = key
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    secret = key[len(prefix) :]
            raw = secret.encode()
            for length in range(1, _HELD_CHARS + 1):
                fragments.update(raw[i : i + length] for i in range(len(raw) - length + 1))
            if len(secret) >= _PIECE:
                for start in range(0, len(secret) - _PIECE + 1, _STEP):
                    pieces.add(secret[start : start + _PIECE].encode())
                pieces.add(secret[-_PIECE:].encode())
            elif secret:
                pieces.add(secret.encode())
        self._pieces: Final = tuple(sorted(pieces))
        self._fragments: Final = frozenset(fragments)
        """Every run of up to ``_HELD_CHARS`` characters of a secret part."""
        self._tail_bytes: Final = frozenset(b"".join(fragments)) | _HEX | frozenset(b"\\u%")
        """A read ending in any other byte holds nothing back."""
        self._clean_headers: Final[set[str]] = set()
        """Short header values already found clean (a few; cleared when full)."""

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def _raw_hit(self, data: bytes) -> bool:
        return any(map(data.count, self._pieces))  # C calls only: no generator to resume

    def mentions_key(self, data: bytes) -> bool:
        """Whether ``data`` quotes the key or a fragment of it, as is or escaped."""
        if self._raw_hit(data):
            return True
        if _has_json_escape(data):
            decoded = _JSON_ESCAPE.sub(_unescape_json, data)
            if self._raw_hit(decoded):
                return True
            data = decoded
        if data.find(b"%") != -1:
            return self._raw_hit(urllib.parse.unquote_to_bytes(data))
        return False

    def header_mentions_key(self, value: str) -> bool:
        """Whether a header value quotes the key (or a fragment of it)."""
        if value in self._clean_headers:  # ``application/json`` and the like, every answer
            return False
        found = self.mentions_key(value.encode("utf-8", "surrogateescape"))
        if not found and len(value) <= 64:
            if len(self._clean_headers) >= 32:
                self._clean_headers.clear()
            self._clean_headers.add(value)
        return found

    def held_from(self, data: bytes) -> int:
        r"""Where the end of ``data`` that could start a fragment of the key begins.

        That end is the longest run of key characters (raw, ``\uXXXX`` or ``%XX``) that is
        a piece of a secret part, plus an unfinished escape after it; ``len(data)`` if none.
        Bytes that read as an escape may also be text followed by raw key characters
        (``%0`` then a key starting with ``d``): every reading counts, the earliest wins.
        """
        end = len(data)
        if not end or data[-1] not in self._tail_bytes or not self._pieces:
            return end
        unfinished = _UNFINISHED_ESCAPE.search(data, max(0, end - 5))
        stop = unfinished.start() if unfinished is not None else end
        return self._fragment_start(data, stop, b"")

    def _fragment_start(self, data: bytes, pos: int, suffix: bytes) -> int:
        """The earliest start of a fragment of the key that ends ``suffix`` at ``pos``.

        ``suffix`` (the characters from ``pos`` on, decoded) is a fragment already, or empty.
        A run that is no fragment has no longer one ending it either, so each reading of the
        byte(s) before ``pos`` is followed only while it stays a fragment: a few steps.
        """
        earliest = pos
        if len(suffix) >= _HELD_CHARS:
            return earliest
        for char, begin in _readings(data, pos):
            longer = bytes((char,)) + suffix
            if longer in self._fragments:
                earliest = min(earliest, self._fragment_start(data, begin, longer))
        return earliest

    def stream(self) -> StreamScan:
        """Return a scan for one stream (it remembers the end of the previous chunk)."""
        return StreamScan(self)


def _readings(data: bytes, pos: int) -> list[tuple[int, int]]:
    r"""Each way the bytes before ``pos`` end in one character: (character, where it begins).

    The byte itself, and, when they are there, the ``%XX`` or ``\uXXXX`` escape ending at
    ``pos`` (a ``\u`` escape of a character outside one byte names no key character).
    """
    if pos <= 0:
        return []
    found = [(data[pos - 1], pos - 1)]
    if pos >= 3 and data[pos - 3] == 0x25 and _is_hex(data[pos - 2 : pos]):  # %XX
        found.append((int(data[pos - 2 : pos], 16), pos - 3))
    if (
        pos >= 6
        and data[pos - 6] == 0x5C  # backslash
        and data[pos - 5] == 0x75  # u
        and _is_hex(data[pos - 4 : pos])
    ):
        code = int(data[pos - 4 : pos], 16)
        if code < 0x100:
            found.append((code, pos - 6))
    return found


def _is_hex(digits: bytes) -> bool:
    return all(byte in _HEX for byte in digits)


class StreamScan:
    """``KeyScanner.mentions_key`` over a stream's reads, and what of them to relay when.

    ``feed`` each read; relay what it returns (the read, less an end held back because it
    could start a fragment of the key, plus what was held before), or cut the stream when it
    returns None. At the stream's natural end, relay ``flush()``.
    """

    __slots__ = ("_carry", "_held", "_scanner")

    def __init__(self, scanner: KeyScanner) -> None:
        self._scanner = scanner
        self._carry = b""
        self._held = b""

    def feed(self, chunk: bytes) -> bytes | None:
        """Take the next read; return the bytes to relay now, or None if the stream quotes the key."""
        data = self._carry + chunk
        scanner = self._scanner
        if scanner.mentions_key(data):
            self._held = b""
            return None
        # Keep enough of the end for a fragment split across reads: a piece's worth, or a
        # whole escaped fragment's when the bytes hold escapes.
        escaped = data.find(b"%") != -1 or _has_json_escape(data)
        self._carry = data[-_CARRY:] if escaped else data[-(_PIECE - 1) :]
        pending = self._held + chunk if self._held else chunk
        cut = scanner.held_from(pending)
        if cut == len(pending):
            self._held = b""
            return pending
        self._held = pending[cut:]
        return pending[:cut]

    def flush(self) -> bytes:
        """Return the bytes still held back (the stream ended: they did not start the key)."""
        held, self._held = self._held, b""
        return held

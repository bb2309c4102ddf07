"""The outage journal: what the store could not take, kept in a local file until it can.

When the quota store is unreachable, three things would otherwise be lost:

- a request served under ``store.on_error: fail_open`` (no reservation, no record): its
  admission (``reserve``) and, once it ends, its settlement (``settle``) are journaled;
- a settlement whose write kept failing (``settle``): the request was served and its cost
  is known;
- a request refused before it was sent, whose reservation may have reached the store before
  its reply was lost (``void``): it must be settled at 0, never charged.

Entries are JSON lines appended to ``store.journal_path``; writes are buffered and flushed
with one ``fsync`` per batch (every ``_FLUSH_SECONDS``, on a worker thread: the event loop never
blocks on the disk). The file is bounded (``store.journal_max_bytes``): when it is full,
``fail_open`` stops serving unrecorded requests (they get 503 ``quota_store_unavailable``).

:meth:`Journal.replay` runs when the store answers again (and at start-up, for a journal a
previous process left): for each request, idempotent by request id, it writes the record with
its reservation (``reserve`` with no limits: the request was served already) and its
settlement, so the spend then counts against the team's budgets. Requests still in flight stay
in the journal for the next replay; the file is then rewritten with what remains.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Final, TypeVar

import msgspec

from .model import (
    Micro,
    Outcome,
    Period,
    ReserveRequest,
    Settlement,
    TeamLimits,
    UsageSource,
)
from .store import Store, StoreUnavailable

__all__ = ["Journal", "JournalEntry", "JournalFull"]

_LOGGER: Final = logging.getLogger(__name__)
_T = TypeVar("_T")
_FLUSH_SECONDS: Final = 0.05
"""Entries wait at most this long (in memory) before their batch is written and fsync'd."""


class JournalFull(Exception):
    """The journal reached ``store.journal_max_bytes``: nothing more can be kept."""


class JournalEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of the journal."""

    op: str
    """``reserve`` | ``settle`` | ``void``."""
    request_id: str
    team: str = ""
    key_id: str | None = None
    model: str = ""
    stream: bool = False
    amount: int = 0
    tokens: int = 0
    periods: dict[str, str] = msgspec.field(default_factory=dict)
    at: float = 0.0
    cost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_source: str = UsageSource.COUNTED.value
    outcome: str = Outcome.COMPLETED.value
    upstream_id: str | None = None


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(JournalEntry)


class Journal:
    """An append-only, bounded, batch-fsync'd file of entries the store still has to take."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int,
        lease_seconds: float = 600.0,
        timeout: float | None = None,
    ) -> None:
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._lease = lease_seconds
        self._timeout = timeout
        self._open: set[str] = set()
        """Requests journaled by this process whose settlement is not journaled yet."""
        self._size = 0
        self._buffer: list[bytes] = []
        self._flushing: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.pending = 0
        """Entries written since the last replay emptied the journal."""
        self.replayed = 0
        """Requests written into the store by replays (exported as a metric)."""

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    async def start(self) -> None:
        """Open (or find) the file; count what a previous process left."""
        self._size, self.pending = await asyncio.to_thread(self._scan)

    def _scan(self) -> tuple[int, int]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if not self._path.exists():
            return 0, 0
        data = self._path.read_bytes()
        return len(data), data.count(b"\n")

    def has_room(self) -> bool:
        """Whether one more request's entries fit under ``max_bytes``."""
        return self._size + 2048 <= self._max_bytes

    def append(self, entry: JournalEntry) -> None:
        """Queue one entry; it is on disk (fsync'd) within ``_FLUSH_SECONDS``.

        Raises :class:`JournalFull` for a ``reserve`` past the bound (settlements and voids of
        requests already journaled are always kept).
        """
        line = _ENCODER.encode(entry) + b"\n"
        if entry.op == "reserve" and self._size + len(line) > self._max_bytes:
            raise JournalFull(str(self._path))
        self._size += len(line)
        self.pending += 1
        if entry.op == "reserve":
            self._open.add(entry.request_id)
        else:
            self._open.discard(entry.request_id)
        self._buffer.append(line)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(
                self._flush_soon(), name="journal-flush"
            )

    async def _flush_soon(self) -> None:
        await asyncio.sleep(_FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Write and fsync everything queued so far."""
        async with self._lock:
            if not self._buffer:
                return
            lines, self._buffer = self._buffer, []
            await asyncio.to_thread(self._write, b"".join(lines))

    def _write(self, data: bytes) -> None:
        with self._path.open("ab") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())

    def _read(self) -> list[JournalEntry]:
        if not self._path.exists():
            return []
        entries: list[JournalEntry] = []
        for line in self._path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                entries.append(_DECODER.decode(line))
            except msgspec.DecodeError:
                _LOGGER.error("journal %s: an unreadable line was skipped", self._path)  # noqa: TRY400 - a torn last line, no traceback needed
        return entries

    def _rewrite(self, entries: list[JournalEntry]) -> int:
        data = b"".join(_ENCODER.encode(e) + b"\n" for e in entries)
        temporary = self._path.with_name(self._path.name + ".tmp")
        with temporary.open("wb") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
        temporary.replace(self._path)
        return len(data)

    def is_journaled(self, request_id: str) -> bool:
        """Whether this request was admitted through the journal (its settlement goes here)."""
        return request_id in self._open

    async def _call(self, operation: Awaitable[_T]) -> _T:
        if self._timeout is None:
            return await operation
        async with asyncio.timeout(self._timeout):
            return await operation

    async def replay(self, store: Store, *, now: float) -> int:
        """Write the journaled requests into ``store``; return how many were completed.

        Idempotent by request id (a replay interrupted half-way is simply run again). Raises
        :class:`StoreUnavailable` (or ``TimeoutError``) when the store is still down; the
        journal is then left as it was.
        """
        async with self._lock:
            if self._buffer:
                lines, self._buffer = self._buffer, []
                await asyncio.to_thread(self._write, b"".join(lines))
            entries = await asyncio.to_thread(self._read)
            if not entries:
                return 0
            by_request: dict[str, list[JournalEntry]] = {}
            for entry in entries:
                by_request.setdefault(entry.request_id, []).append(entry)
            kept: list[JournalEntry] = []
            done = 0
            for request_id, group in by_request.items():
                if await self._replay_one(store, request_id, group, now):
                    done += 1
                else:
                    kept.extend(group)
            self._size = await asyncio.to_thread(self._rewrite, kept)
            # Entries appended while the store was being written (a settlement giving up its
            # retries meanwhile) wait in the buffer for the next flush: still pending, or the
            # replay loop, which runs only while something is pending, would never take them.
            self._size += sum(map(len, self._buffer))
            self.pending = len(kept) + len(self._buffer)
            self.replayed += done
            if done:
                _LOGGER.warning("journal: %d request(s) written into the store", done)
            return done

    async def _replay_one(
        self,
        store: Store,
        request_id: str,
        group: list[JournalEntry],
        now: float,
    ) -> bool:
        reserve = next((e for e in group if e.op == "reserve"), None)
        final = next((e for e in reversed(group) if e.op in ("settle", "void")), None)
        if final is None and request_id in self._open:
            return False  # still being served here: its settlement will be journaled
        if reserve is not None:
            counted = await self._call(
                store.reserve(
                    ReserveRequest(
                        request_id=request_id,
                        team=reserve.team,
                        amount=Micro(reserve.amount),
                        tokens=reserve.tokens,
                        periods={Period(p): key for p, key in reserve.periods.items()},
                        now=reserve.at,
                        lease_seconds=self._lease,
                        # Served already: it is recorded whatever the limits say now.
                        limits=TeamLimits(),
                        enforce=False,
                        model=reserve.model,
                        key_id=reserve.key_id,
                        stream=reserve.stream,
                    )
                )
            )
            if not counted.applied:  # pragma: no cover - not enforced: always applied
                raise StoreUnavailable(f"journal replay of {request_id} was refused")
        if final is None:
            # Journaled by a process that died before the request ended: the reconciler
            # settles the record (now written) like any other crashed one.
            return True
        settlement = Settlement(
            cost=Micro(final.cost),
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            usage_source=UsageSource(final.usage_source),
            outcome=Outcome(final.outcome),
            upstream_id=final.upstream_id,
            now=final.at or now,
        )
        # False when settled already (an earlier replay, or the request's own settlement).
        await self._call(store.settle(request_id, settlement))
        return True

    # -- entry builders --------------------------------------------------------------------
    @staticmethod
    def reserve_entry(request: ReserveRequest) -> JournalEntry:
        """The entry of a request served without a reservation (fail_open)."""
        return JournalEntry(
            op="reserve",
            request_id=request.request_id,
            team=request.team,
            key_id=request.key_id,
            model=request.model,
            stream=request.stream,
            amount=request.amount,
            tokens=request.tokens,
            periods={p.value: key for p, key in request.periods.items()},
            at=request.now,
        )

    @staticmethod
    def settle_entry(request_id: str, settlement: Settlement) -> JournalEntry:
        """The entry of a settlement the store has not taken."""
        return JournalEntry(
            op="settle",
            request_id=request_id,
            cost=settlement.cost,
            prompt_tokens=settlement.prompt_tokens,
            completion_tokens=settlement.completion_tokens,
            usage_source=settlement.usage_source.value,
            outcome=settlement.outcome.value,
            upstream_id=settlement.upstream_id,
            at=settlement.now,
        )

    @staticmethod
    def void_entry(request_id: str, now: float) -> JournalEntry:
        """The entry of a request refused before sending whose reservation may exist."""
        return JournalEntry(
            op="void",
            request_id=request_id,
            usage_source=UsageSource.COUNTED.value,
            outcome=Outcome.NOT_SENT.value,
            at=now,
        )

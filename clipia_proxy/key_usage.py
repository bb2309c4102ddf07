"""What Clipia says the key spent, snapshotted, and the ``reconcile`` comparison with the ledger.

While serving, the gateway reads ``GET /v1/key`` every ``accounting.key_usage_snapshot_seconds``
and appends ``{"at": epoch seconds, "usage": credits}`` to ``accounting.key_usage_path`` (JSON
lines, fsync'd on a worker thread). Clipia's ``usage`` is the key's running total, so what Clipia
charged between two snapshots is their difference.

``clipia-proxy reconcile --day D`` takes the snapshots that bracket day ``D`` (in
``accounting.timezone``): the last one at or before the day's start (else the day's first) and
the first one at or after its end (else the latest), sums the ledger's settled costs of the
requests admitted in that same span, and prints both and their difference. An empty
difference answers "is Clipia's bill right?" for the day; a positive one is spend Clipia
charged that the ledger does not have (requests that bypassed the gateway, or lost records).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Final, TextIO

import msgspec

from .errors import ProxyError
from .ledgers import LedgerStore
from .quotas.model import RecordState, credits
from .upstream import UpstreamClient, read_body
from .wire import decode_json

__all__ = ["KeyUsage", "Reconciliation", "reconcile", "snapshot_forever", "write_reconciliation"]

_LOGGER: Final = logging.getLogger(__name__)
_MAX_BODY: Final = 64 * 1024


class KeyUsage(msgspec.Struct, frozen=True):
    """One snapshot of the key's running usage (credits) at ``at`` (epoch seconds)."""

    at: float
    usage: Decimal


_DECODER: Final = msgspec.json.Decoder(KeyUsage)
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")


async def fetch_usage(upstream: UpstreamClient) -> Decimal | None:
    """Return ``GET /v1/key``'s ``usage`` (credits), or None when Clipia does not say."""
    try:
        response = await upstream.send(
            "GET", "/key", request_id=f"key-usage-{uuid.uuid4().hex[:12]}"
        )
    except ProxyError as exc:
        _LOGGER.info("key usage not read: %s", exc)
        return None
    try:
        body = await read_body(response, _MAX_BODY) if response.status == 200 else b""
    finally:
        response.release()
    try:
        decoded = decode_json(body) if body else None
    except (msgspec.DecodeError, ValueError):
        return None
    data = decoded.get("data") if isinstance(decoded, dict) else None
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, bool) or not isinstance(usage, Decimal | int):
        return None
    return Decimal(usage)


def _append(path: Path, line: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as sink:
        sink.write(line)
        sink.flush()
        os.fsync(sink.fileno())


async def snapshot_forever(
    upstream: UpstreamClient,
    path: Path,
    *,
    every: float,
    clock: Callable[[], float],
    pause: Callable[[float], Awaitable[bool]],
) -> None:
    """Append a snapshot every ``every`` seconds (the first after ``every``) until draining."""
    while not await pause(every):
        usage = await fetch_usage(upstream)
        if usage is not None:
            line = _ENCODER.encode(KeyUsage(at=clock(), usage=usage)) + b"\n"
            await asyncio.to_thread(_append, path, line)


def read_snapshots(path: Path) -> list[KeyUsage]:
    """Return the snapshots of ``path``, oldest first (unreadable lines skipped)."""
    if not path.exists():
        return []
    found: list[KeyUsage] = []
    for line in path.read_bytes().splitlines():
        try:
            found.append(_DECODER.decode(line))
        except msgspec.DecodeError:
            continue
    return sorted(found, key=lambda snapshot: snapshot.at)


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True):
    """Clipia's charge and the ledger's over one span of time (credits)."""

    start: KeyUsage
    end: KeyUsage
    clipia: Decimal
    ledger: Decimal
    requests: int
    still_open: int

    @property
    def difference(self) -> Decimal:
        """Clipia minus the ledger (positive: charged by Clipia, missing from the ledger)."""
        return self.clipia - self.ledger


async def reconcile(
    ledger: LedgerStore, snapshots: list[KeyUsage], *, since: float, until: float
) -> Reconciliation | None:
    """Compare Clipia's usage over the snapshots bracketing ``[since, until)`` with the ledger."""
    if len(snapshots) < 2:
        return None
    before = [s for s in snapshots if s.at <= since]
    start = before[-1] if before else next((s for s in snapshots if s.at < until), None)
    after = [s for s in snapshots if s.at >= until]
    end = after[0] if after else snapshots[-1]
    if start is None or end.at <= start.at:
        return None
    total, requests, still_open = 0, 0, 0
    async for record in ledger.export(since=start.at, until=end.at):
        requests += 1
        if record.state is RecordState.SETTLED:
            total += record.cost
        else:
            still_open += 1
    return Reconciliation(
        start=start,
        end=end,
        clipia=end.usage - start.usage,
        ledger=credits(total),
        requests=requests,
        still_open=still_open,
    )


def write_reconciliation(out: TextIO, result: Reconciliation, *, day: str, zone: dt.tzinfo) -> None:
    """Print a reconciliation for people."""

    def when(snapshot: KeyUsage) -> str:
        return dt.datetime.fromtimestamp(snapshot.at, zone).isoformat(timespec="seconds")

    out.write(
        f"day {day}: from {when(result.start)} to {when(result.end)}\n"
        f"clipia: {result.clipia} credits (key usage {result.start.usage} -> {result.end.usage})\n"
        f"ledger: {result.ledger} credits ({result.requests} request(s)"
        f"{f', {result.still_open} not settled yet' if result.still_open else ''})\n"
        f"difference: {result.difference} credits (clipia - ledger)\n"
    )

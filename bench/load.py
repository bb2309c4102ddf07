"""The load generator: a fixed number of requests at a fixed concurrency, timed per request.

Latency is measured from just before ``session.post`` to the last body byte. For streams,
time to first token (TTFT) is the time until the received bytes first contain a non-empty
``"content"`` string (the emulator's first event is the role-only delta with ``"content":""``,
which does not count). A response counts as ok when it is 200 and complete: a JSON body with
``choices``, or a stream that ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp

from clipia_proxy.wire import encode_json

_FIRST_TOKEN: Final = re.compile(rb'"content"\s*:\s*"[^"]')
_DONE: Final = b"data: [DONE]"
_MAX_ERRORS_KEPT: Final = 5
REQUEST_TIMEOUT: Final = aiohttp.ClientTimeout(total=60, sock_connect=10)


@dataclass(frozen=True)
class Target:
    """Where the load goes: ``direct`` (the emulator), ``gateway`` or ``litellm``."""

    name: str
    base_url: str
    """``http://127.0.0.1:PORT/v1``."""
    api_key: str
    model: str

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}


def chat_body(model: str, *, stream: bool, max_tokens: int) -> bytes:
    """Return the request body every scenario sends (pre-encoded once)."""
    body: dict[str, object] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return encode_json(body)


@dataclass
class LoadResult:
    """The raw outcome of one load run."""

    requests: int = 0
    ok: int = 0
    errors: int = 0
    wall_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    """Seconds, ok requests only."""
    ttfts: list[float] = field(default_factory=list)
    """Seconds, ok streamed requests only."""
    error_samples: list[str] = field(default_factory=list)

    def note_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < _MAX_ERRORS_KEPT:
            self.error_samples.append(message)


def percentile(values: list[float], q: float) -> float | None:
    """Return the nearest-rank ``q`` quantile (0 < q <= 1) of ``values``, or ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    headers: dict[str, str],
    *,
    stream: bool,
    result: LoadResult,
) -> None:
    start = time.perf_counter()
    try:
        async with session.post(
            target.chat_url, data=body, headers=headers, timeout=REQUEST_TIMEOUT
        ) as resp:
            if not stream:
                data = await resp.read()
                elapsed = time.perf_counter() - start
                if resp.status != 200 or b'"choices"' not in data:
                    result.note_error(f"HTTP {resp.status}: {data[:200]!r}")
                    return
                result.ok += 1
                result.latencies.append(elapsed)
                return
            if resp.status != 200:
                data = await resp.read()
                result.note_error(f"HTTP {resp.status}: {data[:200]!r}")
                return
            ttft: float | None = None
            head = b""
            tail = b""
            async for chunk in resp.content.iter_any():
                if ttft is None:
                    head += chunk
                    if _FIRST_TOKEN.search(head):
                        ttft = time.perf_counter() - start
                        head = b""
                tail = (tail + chunk)[-64:]
            elapsed = time.perf_counter() - start
            if ttft is None or _DONE not in tail:
                result.note_error(f"incomplete stream (first token: {ttft is not None}): {tail!r}")
                return
            result.ok += 1
            result.latencies.append(elapsed)
            result.ttfts.append(ttft)
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.note_error(repr(exc))


async def run_load(
    session: aiohttp.ClientSession,
    target: Target,
    *,
    stream: bool,
    concurrency: int,
    requests: int,
    max_tokens: int,
    max_seconds: float,
) -> LoadResult:
    """Send ``requests`` chat requests with ``concurrency`` in flight; stop early at ``max_seconds``."""
    body = chat_body(target.model, stream=stream, max_tokens=max_tokens)
    headers = target.headers()
    result = LoadResult()
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            await _one(session, target, body, headers, stream=stream, result=result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_seconds = time.perf_counter() - start
    result.requests = issued
    return result

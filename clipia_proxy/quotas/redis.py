"""The ``redis`` counters: shared by every replica and sidecar, records in PostgreSQL.

Redis holds no per-request records: only counters and leases, O(teams, periods and requests
in flight), so its memory does not grow with traffic. Each operation is one Lua script (names
carry a version: ``clipia_reserve_v1``), atomic on the server; leases and the RPM/TPM windows
run on the server's ``TIME``, so replica clock skew changes nothing. The durable record is the
PostgreSQL ledger's (``ledger.backend: postgres`` is required): ``reserve`` decides in Redis,
then commits the record before returning (a failed commit undoes the reservation);
``settle`` flips the record once in the ledger (idempotent by request id), then applies the
cost to the counters from the request's lease, which lives until it is settled (so a retry
after a failure in between applies it exactly once).

Counters are never trusted alone. ``P:epoch`` (no TTL) is written last by a rebuild; every
script refuses to touch counters while it is missing (Redis flushed, restarted empty or failed
over to an empty replica). A replica that finds it missing takes the ``P:rebuild`` lock,
clears stale counters, reads one consistent snapshot of the ledger (spent per team and window,
open reservations, the last minute for RPM/TPM) and writes it back with the epoch in one
script; the others wait for the epoch. Admissions meanwhile wait (and past
``store.timeout_seconds`` get 503 ``quota_store_unavailable``); ``/readyz`` says why.

Keys, under ``store.redis_key_prefix`` (P): ``P:epoch``, ``P:rebuild``, ``P:lease:{id}`` (hash:
team, amount, windows of a request not yet settled: its money stays reserved until then),
``P:live:{team}`` (zset id→lease end: the concurrency slots; a lease that runs out or
``release_slot`` frees the slot only),
``P:reserved:{team}:{window}`` and ``P:spent:{team}:{window}`` (integers, micro-credits),
``P:win:{team}`` / ``P:wtok:{team}`` / ``P:wsum:{team}`` (the 60-second request log, its tokens
and their sum), and for a team key with its own ``limits`` the same under ``{team}:{key id}``:
``P:klive:…`` (its slots), ``P:kwin:…`` / ``P:kwtok:…`` / ``P:kwsum:…`` (its log); such a
request's lease names that scope in its ``key`` field. Every key but the epoch has a TTL,
refreshed on write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from typing import Any, Final

import msgspec
import redis
import redis.asyncio as aioredis
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from clipia_proxy.config import StoreConfig

from .ledgered import CALENDAR_HORIZON_SECONDS as _CALENDAR_HORIZON_SECONDS
from .memory import RATE_WINDOW_SECONDS
from .model import Micro, Period, Reason, RecordState, ReserveRequest, ReserveResult, Settlement
from .store import LedgerRecord, LedgerStore, Store, StoreUnavailable, WindowUsage

__all__ = ["CountersLost", "RedisStore"]

_LOGGER: Final = logging.getLogger(__name__)
_TOTAL_TTL: Final = 400 * 86400
_LEASE_TTL: Final = 30 * 86400
"""A lease outlives its request until settled (the reconciler settles crashed ones)."""
_WINDOW_TTL: Final = (31 + 40) * 86400
"""A window's counters outlive its reset (at most a month away) by 40 days."""
_WINDOW_TTLS: Final = {
    "day": _WINDOW_TTL,
    "week": _WINDOW_TTL,
    "month": _WINDOW_TTL,
    "total": _TOTAL_TTL,
    "key_day": _WINDOW_TTL,
    "key_week": _WINDOW_TTL,
    "key_month": _WINDOW_TTL,
    "key_total": _TOTAL_TTL,
}

# Shared by every script: release leases that ran out, prune the 60-second window.
_PRELUDE: Final = """
pcall(redis.replicate_commands)
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function expire(team)
  -- Leases that ran out free their concurrency slot; the money stays reserved until the
  -- request is settled (by its request, or by the reconciler after a crash).
  redis.call('ZREMRANGEBYSCORE', P .. ':live:' .. team, '-inf', now)
end
local function prune_log(win, wtok, wsum)
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', now - 60)
  for _, rid in ipairs(old) do
    local tokens = tonumber(redis.call('HGET', wtok, rid) or '0')
    redis.call('DECRBY', wsum, tokens)
    redis.call('HDEL', wtok, rid)
  end
  redis.call('ZREMRANGEBYSCORE', win, '-inf', now - 60)
  return win, wtok, wsum
end
local function prune(team)
  return prune_log(P .. ':win:' .. team, P .. ':wtok:' .. team, P .. ':wsum:' .. team)
end
local function kprune(scope)
  -- a team key's own log (teams[].keys[].limits); scope is '{team}:{key id}'
  return prune_log(P .. ':kwin:' .. scope, P .. ':kwtok:' .. scope, P .. ':kwsum:' .. scope)
end
"""

_RESERVE: Final = (
    "-- clipia_reserve_v2\n"
    + _PRELUDE
    + """
local function tpm_wait(win, wtok, used, tokens, limit)
  if tokens > limit then return 60 end
  local entries = redis.call('ZRANGE', win, 0, -1, 'WITHSCORES')
  local total = used
  for i = 1, #entries, 2 do
    total = total - tonumber(redis.call('HGET', wtok, entries[i]) or '0')
    if total + tokens <= limit then
      return math.max(tonumber(entries[i + 1]) + 60 - now, 0.001)
    end
  end
  return 60
end
local function rpm_wait(win)
  local first = redis.call('ZRANGE', win, 0, 0, 'WITHSCORES')
  if first[2] then return math.max(tonumber(first[2]) + 60 - now, 0.001) end
  return 60
end
local rid = ARGV[2]
local a = cjson.decode(ARGV[3])
if redis.call('EXISTS', P .. ':epoch') == 0 then return cjson.encode({lost = true}) end
local rec = P .. ':lease:' .. rid
if redis.call('EXISTS', rec) == 1 then
  return cjson.encode({admitted = true, replayed = true})
end
local team = a.team
expire(team)
local win, wtok, wsum = prune(team)
local live = P .. ':live:' .. team
local refusal = nil
local live_n = redis.call('ZCARD', live)
if a.concurrency and live_n + 1 > a.concurrency then
  refusal = {reason = 'concurrency', limit = a.concurrency, used = live_n, retry_after = 1}
end
local req_n = redis.call('ZCARD', win)
if not refusal and a.rpm and req_n + 1 > a.rpm then
  refusal = {reason = 'rpm', limit = a.rpm, used = req_n, retry_after = rpm_wait(win)}
end
local tok_n = tonumber(redis.call('GET', wsum) or '0')
if not refusal and a.tpm and tok_n + a.tokens > a.tpm then
  refusal = {reason = 'tpm', limit = a.tpm, used = tok_n,
    retry_after = tpm_wait(win, wtok, tok_n, a.tokens, a.tpm)}
end
-- The key's own limits (teams[].keys[].limits), on its own slots and log.
local kscope, klive, kwin, kwtok, kwsum, kreq_n, ktok_n = nil, nil, nil, nil, nil, 0, 0
if a.key then
  kscope = team .. ':' .. a.key
  klive = P .. ':klive:' .. kscope
  redis.call('ZREMRANGEBYSCORE', klive, '-inf', now)
  kwin, kwtok, kwsum = kprune(kscope)
  local klive_n = redis.call('ZCARD', klive)
  kreq_n = redis.call('ZCARD', kwin)
  ktok_n = tonumber(redis.call('GET', kwsum) or '0')
  if not refusal and a.key_concurrency and klive_n + 1 > a.key_concurrency then
    refusal = {reason = 'concurrency', limit = a.key_concurrency, used = klive_n,
      retry_after = 1, key = true}
  end
  if not refusal and a.key_rpm and kreq_n + 1 > a.key_rpm then
    refusal = {reason = 'rpm', limit = a.key_rpm, used = kreq_n, retry_after = rpm_wait(kwin),
      key = true}
  end
  if not refusal and a.key_tpm and ktok_n + a.tokens > a.key_tpm then
    refusal = {reason = 'tpm', limit = a.key_tpm, used = ktok_n,
      retry_after = tpm_wait(kwin, kwtok, ktok_n, a.tokens, a.key_tpm), key = true}
  end
end
local tight_remaining, tight_period = nil, nil
for period, key in pairs(a.windows) do
  local limit = a.budgets[period]
  if limit then
    local used = tonumber(redis.call('GET', P .. ':spent:' .. team .. ':' .. key) or '0')
      + tonumber(redis.call('GET', P .. ':reserved:' .. team .. ':' .. key) or '0')
    local remaining = limit - used - a.amount
    if not refusal and remaining < 0 then
      refusal = {reason = 'budget', period = period, limit = string.format('%d', limit),
        used = string.format('%d', used)}
    end
    if tight_remaining == nil or remaining < tight_remaining then
      tight_remaining, tight_period = remaining, period
    end
  end
end
if refusal and not a.shadow then
  refusal.admitted = false
  return cjson.encode(refusal)
end
local lease_until = now + a.lease_seconds
redis.call('HSET', rec, 'team', team, 'reserved', a.amount, 'windows', cjson.encode(a.windows))
redis.call('EXPIRE', rec, a.lease_ttl)
redis.call('ZADD', live, lease_until, rid)
redis.call('EXPIRE', live, a.lease_ttl)
for period, key in pairs(a.windows) do
  local reserved = P .. ':reserved:' .. team .. ':' .. key
  redis.call('INCRBY', reserved, a.amount)
  redis.call('EXPIRE', reserved, a.window_ttls[period])
end
redis.call('ZADD', win, now, rid)
redis.call('HSET', wtok, rid, a.tokens)
redis.call('INCRBY', wsum, a.tokens)
for _, k in ipairs({win, wtok, wsum}) do redis.call('EXPIRE', k, 120) end
if kscope then
  redis.call('HSET', rec, 'key', kscope)
  redis.call('ZADD', klive, lease_until, rid)
  redis.call('EXPIRE', klive, a.lease_ttl)
  redis.call('ZADD', kwin, now, rid)
  redis.call('HSET', kwtok, rid, a.tokens)
  redis.call('INCRBY', kwsum, a.tokens)
  for _, k in ipairs({kwin, kwtok, kwsum}) do redis.call('EXPIRE', k, 120) end
end
local result = {admitted = true, now = now, lease_until = lease_until,
  epoch = redis.call('GET', P .. ':epoch')}
if refusal then
  result.reason = refusal.reason
  result.period = refusal.period
  result.key = refusal.key
end
if a.key_rpm then result.key_requests_remaining = math.max(a.key_rpm - kreq_n - 1, 0) end
if a.key_tpm then result.key_tokens_remaining = math.max(a.key_tpm - ktok_n - a.tokens, 0) end
if a.rpm then result.requests_remaining = math.max(a.rpm - req_n - 1, 0) end
if a.tpm then result.tokens_remaining = math.max(a.tpm - tok_n - a.tokens, 0) end
if tight_remaining ~= nil then
  -- as text: cjson writes numbers with 14 significant digits
  result.budget_remaining = string.format('%d', math.max(tight_remaining, 0))
  result.budget_period = tight_period
end
return cjson.encode(result)
"""
)

_SETTLE: Final = (
    "-- clipia_settle_v3\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local s = cjson.decode(ARGV[3])
if redis.call('EXISTS', P .. ':epoch') == 0 then return -1 end
local rec = P .. ':lease:' .. rid
if redis.call('EXISTS', rec) == 0 then return 0 end
local team = redis.call('HGET', rec, 'team')
local amount = tonumber(redis.call('HGET', rec, 'reserved') or '0')
local wins = cjson.decode(redis.call('HGET', rec, 'windows'))
for _, key in pairs(wins) do
  redis.call('DECRBY', P .. ':reserved:' .. team .. ':' .. key, amount)
end
redis.call('ZREM', P .. ':live:' .. team, rid)
local kscope = redis.call('HGET', rec, 'key')
if kscope then redis.call('ZREM', P .. ':klive:' .. kscope, rid) end
local function unlog(win, wtok, wsum)
  if redis.call('ZREM', win, rid) == 1 then
    local tokens = tonumber(redis.call('HGET', wtok, rid) or '0')
    redis.call('HDEL', wtok, rid)
    redis.call('DECRBY', wsum, tokens)
  end
end
local function retoken(wtok, wsum)
  local old = redis.call('HGET', wtok, rid)
  if old then
    local tokens = s.prompt_tokens + s.completion_tokens
    redis.call('HSET', wtok, rid, tokens)
    redis.call('INCRBY', wsum, tokens - tonumber(old))
  end
end
if s.void then
  -- an admission undone (its ledger write failed, or it was a replay): nothing was spent
  unlog(P .. ':win:' .. team, P .. ':wtok:' .. team, P .. ':wsum:' .. team)
  if kscope then
    unlog(P .. ':kwin:' .. kscope, P .. ':kwtok:' .. kscope, P .. ':kwsum:' .. kscope)
  end
  redis.call('DEL', rec)
  return 1
end
for period, key in pairs(wins) do
  local spent = P .. ':spent:' .. team .. ':' .. key
  redis.call('INCRBY', spent, s.cost)
  redis.call('EXPIRE', spent, s.window_ttls[period] or s.total_ttl)
end
retoken(P .. ':wtok:' .. team, P .. ':wsum:' .. team)
if kscope then retoken(P .. ':kwtok:' .. kscope, P .. ':kwsum:' .. kscope) end
redis.call('DEL', rec)
return 1
"""
)

_RENEW: Final = (
    "-- clipia_renew_v3\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local lease_until = now + tonumber(ARGV[3])
local rec = P .. ':lease:' .. rid
local team = redis.call('HGET', rec, 'team')
if not team then return 0 end
local held = redis.call('ZSCORE', P .. ':live:' .. team, rid)
if not held or tonumber(held) <= now then return 0 end  -- ran out: never revived
redis.call('ZADD', P .. ':live:' .. team, 'XX', lease_until, rid)
local kscope = redis.call('HGET', rec, 'key')
if kscope then redis.call('ZADD', P .. ':klive:' .. kscope, 'XX', lease_until, rid) end
return tostring(lease_until)
"""
)

_USAGE: Final = (
    "-- clipia_usage_v1\n"
    + _PRELUDE
    + """
local team = ARGV[2]
expire(team)
local win, wtok, wsum = prune(team)
local out = {redis.call('ZCARD', win), tonumber(redis.call('GET', wsum) or '0')}
for i = 3, #ARGV do
  table.insert(out, tonumber(redis.call('GET', P .. ':spent:' .. team .. ':' .. ARGV[i]) or '0'))
  table.insert(out, tonumber(redis.call('GET', P .. ':reserved:' .. team .. ':' .. ARGV[i]) or '0'))
end
return out
"""
)

_RELEASE_SLOT: Final = (
    "-- clipia_release_slot_v3\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local team = redis.call('HGET', P .. ':lease:' .. rid, 'team')
if not team then return 0 end
local kscope = redis.call('HGET', P .. ':lease:' .. rid, 'key')
if kscope then redis.call('ZREM', P .. ':klive:' .. kscope, rid) end
return redis.call('ZREM', P .. ':live:' .. team, rid)
"""
)

_REBUILD: Final = (
    "-- clipia_rebuild_v2\n"
    + _PRELUDE
    + """
local token = ARGV[2]
if redis.call('GET', P .. ':rebuild') ~= token then return 0 end
local d = cjson.decode(ARGV[3])
for _, row in ipairs(d.spent) do
  local key = P .. ':spent:' .. row[1] .. ':' .. row[2]
  redis.call('SET', key, string.format('%d', row[3]))
  redis.call('EXPIRE', key, row[4])
end
for _, l in ipairs(d.leases) do
  local rec = P .. ':lease:' .. l.id
  redis.call('HSET', rec, 'team', l.team, 'reserved', l.amount, 'windows', cjson.encode(l.windows))
  redis.call('EXPIRE', rec, d.lease_ttl)
  if l.key then redis.call('HSET', rec, 'key', l.key) end
  if l.lease_until > now then
    local live = P .. ':live:' .. l.team
    redis.call('ZADD', live, l.lease_until, l.id)
    redis.call('EXPIRE', live, d.lease_ttl)
    if l.key then
      local klive = P .. ':klive:' .. l.key
      redis.call('ZADD', klive, l.lease_until, l.id)
      redis.call('EXPIRE', klive, d.lease_ttl)
    end
  end
  for period, key in pairs(l.windows) do  -- the money is held until settled
    local reserved = P .. ':reserved:' .. l.team .. ':' .. key
    redis.call('INCRBY', reserved, l.amount)
    redis.call('EXPIRE', reserved, d.window_ttls[period] or d.total_ttl)
  end
end
for _, r in ipairs(d.rates) do
  if r.at > now - 60 then
    local win, wtok, wsum = P .. ':win:' .. r.team, P .. ':wtok:' .. r.team, P .. ':wsum:' .. r.team
    redis.call('ZADD', win, r.at, r.id)
    redis.call('HSET', wtok, r.id, r.tokens)
    redis.call('INCRBY', wsum, r.tokens)
    for _, k in ipairs({win, wtok, wsum}) do redis.call('EXPIRE', k, 120) end
    if r.key then
      local kwin, kwtok, kwsum = P .. ':kwin:' .. r.key, P .. ':kwtok:' .. r.key,
        P .. ':kwsum:' .. r.key
      redis.call('ZADD', kwin, r.at, r.id)
      redis.call('HSET', kwtok, r.id, r.tokens)
      redis.call('INCRBY', kwsum, r.tokens)
      for _, k in ipairs({kwin, kwtok, kwsum}) do redis.call('EXPIRE', k, 120) end
    end
  end
end
redis.call('SET', P .. ':epoch', token)
redis.call('DEL', P .. ':rebuild')
return 1
"""
)

_RESULT: Final = msgspec.json.Decoder()
_DRIVER_INFO: Final = DriverInfo(name="redis-py", lib_version=redis.__version__)
_REBUILD_LOCK_MS: Final = 120_000
_REBUILD_WAIT_SECONDS: Final = 60.0
_SAFE_POLICY: Final = "noeviction"


class CountersLost(StoreUnavailable):
    """Redis lost the counters (flushed, restarted empty, failed over): rebuilding them."""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """Counters and leases in Redis, records in the PostgreSQL ledger (see the module docstring)."""

    is_remote = True

    def __init__(self, client: aioredis.Redis, ledger: LedgerStore, *, prefix: str) -> None:
        self._client = client
        self.ledger: Final = ledger
        self._prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._renew = client.register_script(_RENEW)
        self._usage = client.register_script(_USAGE)
        self._rebuild_script = client.register_script(_REBUILD)
        self._rehold_script = client.register_script(_REHOLD)
        self._release_slot = client.register_script(_RELEASE_SLOT)
        self._rebuilding: asyncio.Task[None] | None = None
        self.rebuilds = 0
        """Counters rebuilt from the ledger by this replica (exported as a metric)."""
        self.problems: list[str] = []
        """Why this store cannot admit now (``/readyz``): empty when it can."""
        self.warnings: list[str] = []
        """Redis settings that can lose counters (``/readyz`` detail, logged at start)."""

    @classmethod
    def from_config(
        cls, config: StoreConfig, ledger: LedgerStore, url: str | None = None
    ) -> RedisStore:
        """Build from ``store``: the URL from ``redis_url_env`` (or ``url``)."""
        address = url or os.environ.get(config.redis_url_env, "")
        if not address:
            raise StoreUnavailable(f"the environment variable {config.redis_url_env} is not set")
        client = aioredis.Redis.from_url(
            address,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            health_check_interval=30,
            # With an explicit version: left to redis-py, every new pooled connection reads
            # the package metadata from disk (blocking os.stat and read on the event loop).
            driver_info=_DRIVER_INFO,
        )
        return cls(client, ledger, prefix=config.redis_key_prefix)

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def start(self) -> None:
        """Migrate the ledger, check Redis's settings, rebuild the counters if they are lost."""
        await self.ledger.start()
        await self._call(self._client.ping)
        await self.check_settings()
        if not await self._call(self._client.exists, self._key("epoch")):
            await self.ensure_counters()

    async def check_settings(self) -> list[str]:
        """Read ``maxmemory-policy`` and persistence; warn when they can lose counters."""
        warnings: list[str] = []
        try:
            policy = (await self._client.config_get("maxmemory-policy")).get(
                "maxmemory-policy", "unknown"
            )
            persistence = await self._client.info("persistence")
            save = (await self._client.config_get("save")).get("save", "")
        except (RedisError, OSError) as exc:
            warnings.append(f"redis settings unreadable ({exc.__class__.__name__})")
        else:
            if _str(policy) != _SAFE_POLICY:
                warnings.append(
                    f"redis maxmemory-policy is {_str(policy)}: counters can be evicted "
                    f"(use {_SAFE_POLICY})"
                )
            if not persistence.get("aof_enabled") and not _str(save).strip():
                warnings.append(
                    "redis persistence is off: a restart empties the counters "
                    "(they are rebuilt from the ledger, admissions wait meanwhile)"
                )
        for warning in warnings:
            _LOGGER.warning("%s", warning)
        self.warnings = warnings
        return warnings

    async def close(self) -> None:
        """Close the connection pool and the ledger."""
        if self._rebuilding is not None and not self._rebuilding.done():
            self._rebuilding.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await self._rebuilding
        await self._client.aclose()
        await self.ledger.close()

    # -- rebuilding the counters from the ledger -------------------------------------------
    async def ensure_counters(self) -> None:
        """Rebuild the counters from the ledger (or wait for another replica's rebuild).

        One rebuild at a time per replica (callers share it); across replicas a lock key
        elects one, the others wait for the epoch key it writes last.
        """
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild())
        task = self._rebuilding
        # A waiter cancelled (its request timed out) leaves the rebuild running for the others.
        await asyncio.wait({task})
        task.result()

    async def _rebuild(self) -> None:
        self.problems = ["quota counters are being rebuilt from the ledger (Redis lost them)"]
        try:
            deadline = time.monotonic() + _REBUILD_WAIT_SECONDS
            while True:
                if await self._call(self._client.exists, self._key("epoch")):
                    self.problems = []
                    return
                token = uuid.uuid4().hex
                got = await self._call(
                    self._client.set, self._key("rebuild"), token, nx=True, px=_REBUILD_LOCK_MS
                )
                if got:
                    await self._rebuild_as(token)
                    self.problems = []
                    return
                if time.monotonic() > deadline:
                    raise CountersLost("redis: the counters are being rebuilt by another replica")
                await asyncio.sleep(0.05)
        except (StoreUnavailable, RedisError, OSError) as exc:
            self.problems = ["quota counters lost and not yet rebuilt from the ledger"]
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def _rebuild_as(self, token: str) -> None:
        _LOGGER.warning("redis counters lost: rebuilding them from the ledger")
        started = time.monotonic()
        # Nothing else writes counters while the epoch key is missing (every script checks
        # it): stale counters (an eviction, a stale replica) can be cleared safely.
        stale: list[Any] = []
        for pattern in (
            *("spent", "reserved", "live", "lease", "win", "wtok", "wsum"),
            *("klive", "kwin", "kwtok", "kwsum"),
        ):
            match = self._key(pattern, "*")
            stale += [key async for key in self._client.scan_iter(match=match, count=1000)]
        if stale:
            for start in range(0, len(stale), 1000):
                await self._call(self._client.delete, *stale[start : start + 1000])
        now = time.time()
        snapshot = await self.ledger.snapshot(
            since=now - _CALENDAR_HORIZON_SECONDS, recent_since=now - RATE_WINDOW_SECONDS
        )
        payload = {
            "spent": [
                [row.team, row.window, row.spent, _ttl_of(row.window)] for row in snapshot.spent
            ],
            "leases": [
                {
                    "id": record.request_id,
                    "team": record.team,
                    "amount": record.reserved,
                    "windows": {p.value: k for p, k in record.windows.items()},
                    "lease_until": record.lease_until,
                    **_key_scope(record),
                }
                for record in snapshot.dispatched
            ],
            "rates": [
                {
                    "id": record.request_id,
                    "team": record.team,
                    "at": record.created_at,
                    "tokens": record.tokens_reserved
                    if record.state is RecordState.DISPATCHED
                    else record.prompt_tokens + record.completion_tokens,
                    # Which keys have limits is config, not in the ledger: every key's log.
                    **_key_scope(record),
                }
                for record in snapshot.recent
            ],
            "lease_ttl": _LEASE_TTL,
            "window_ttls": _WINDOW_TTLS,
            "total_ttl": _TOTAL_TTL,
        }
        done = await self._call(
            self._rebuild_script,
            keys=[],
            args=[self._prefix, token, msgspec.json.encode(payload)],
        )
        if not done:
            raise CountersLost("redis: the rebuild lock was lost; retrying")
        self.rebuilds += 1
        _LOGGER.warning(
            "redis counters rebuilt from the ledger in %.2f s (%d windows, %d open reservations)",
            time.monotonic() - started,
            len(snapshot.spent),
            len(snapshot.dispatched),
        )

    # -- the Store protocol ---------------------------------------------------------------
    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """See ``Store.reserve``: one Lua script decides, then the record is committed."""
        data = await self._reserve_counters(request)
        if data.get("lost"):
            await self.ensure_counters()
            data = await self._reserve_counters(request)
            if data.get("lost"):
                raise CountersLost("redis: the counters were lost again during the rebuild")
        result = _result(data)
        if not result.admitted:
            return result
        record = LedgerRecord(
            request_id=request.request_id,
            team=request.team,
            key_id=request.key_id,
            model=request.model,
            stream=request.stream,
            reserved=request.amount,
            tokens_reserved=request.tokens,
            windows=dict(request.periods),
            created_at=float(data.get("now", request.now)),  # the server's clock, as the lease
            lease_until=float(data.get("lease_until", request.now + request.lease_seconds)),
            environment=request.environment,
            tags=dict(request.tags),
            end_user=request.end_user,
        )
        if result.replayed:
            # The lease is there: an earlier call reserved and may have died before its
            # record was committed. Commit it now (a no-op when it was).
            await self.ledger.insert(record)
            return result
        try:
            inserted = await self.ledger.insert(record)
        except BaseException:
            await self._void(request.request_id)
            raise
        if not inserted:  # the id is in the ledger already: a replay (settled before)
            await self._void(request.request_id)
            return ReserveResult(admitted=True, replayed=True)
        epoch = await self._call(self._client.get, self._key("epoch"))
        if epoch is None or _str(epoch) != str(data.get("epoch")):
            # The counters were rebuilt between the reservation and the record's commit: the
            # rebuild may not have seen the record. Hold it again (a no-op if it did).
            await self._rehold(record)
        return result

    async def _reserve_counters(self, request: ReserveRequest) -> dict[str, Any]:
        limits = request.limits
        args = {
            "team": request.team,
            "amount": request.amount,
            "tokens": request.tokens,
            "windows": {p.value: k for p, k in request.periods.items()},
            "budgets": {p.value: v for p, v in limits.budgets.items()},
            "rpm": limits.rpm,
            "tpm": limits.tpm,
            "concurrency": limits.concurrency,
            "lease_seconds": request.lease_seconds,
            "shadow": request.shadow,
            **_key_limits(request),
            "lease_ttl": _LEASE_TTL,
            "window_ttls": _WINDOW_TTLS,
        }
        # cjson turns JSON null into a truthy userdata: absent keys are Lua nils instead.
        present = {name: value for name, value in args.items() if value is not None}
        raw = await self._call(
            self._reserve,
            keys=[],
            args=[self._prefix, request.request_id, msgspec.json.encode(present)],
        )
        data = _RESULT.decode(raw)
        assert isinstance(data, dict)
        return data

    async def _rehold(self, record: LedgerRecord) -> None:
        await self.ensure_counters()
        await self._call(
            self._rehold_script,
            keys=[],
            args=[
                self._prefix,
                record.request_id,
                msgspec.json.encode(
                    {
                        "team": record.team,
                        "amount": record.reserved,
                        "windows": {p.value: k for p, k in record.windows.items()},
                        "lease_until": record.lease_until,
                        **_key_scope(record),
                        "lease_ttl": _LEASE_TTL,
                        "window_ttls": _WINDOW_TTLS,
                        "total_ttl": _TOTAL_TTL,
                    }
                ),
            ],
        )

    async def _void(self, request_id: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._apply(request_id, {"void": True})

    async def _apply(self, request_id: str, args: dict[str, Any]) -> int:
        applied = int(
            await self._call(
                self._settle, keys=[], args=[self._prefix, request_id, msgspec.json.encode(args)]
            )
        )
        if applied == -1:  # counters lost: the rebuild reads the ledger; apply after it
            await self.ensure_counters()
            applied = int(
                await self._call(
                    self._settle,
                    keys=[],
                    args=[self._prefix, request_id, msgspec.json.encode(args)],
                )
            )
        return applied

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """See ``Store.settle``: the ledger decides once (by request id), then the counters.

        A failure after the ledger committed is retried by the caller: the ledger answers
        "already settled" and the counters are applied from the lease (kept until then).
        """
        settled = await self.ledger.settle(request_id, settlement)
        args = {
            "cost": settlement.cost,
            "prompt_tokens": settlement.prompt_tokens,
            "completion_tokens": settlement.completion_tokens,
            "window_ttls": _WINDOW_TTLS,
            "total_ttl": _TOTAL_TTL,
        }
        if settled is None:
            # Already settled in the ledger. If an earlier call failed between the ledger and
            # Redis, the lease is still there: apply it now with the ledger's own numbers.
            record = await self.ledger.record(request_id)
            if record is None:
                # Never recorded, so never dispatched: release a reservation left behind.
                await self._apply(request_id, {"void": True})
                return False
            if record.state is not RecordState.SETTLED:
                return False
            args.update(
                cost=record.cost,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
            await self._apply(request_id, args)
            return False
        await self._apply(request_id, args)
        return True

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew``; the lease runs on the server's clock (``now`` is unused)."""
        lease_until = await self._call(
            self._renew, keys=[], args=[self._prefix, request_id, lease_seconds]
        )
        if lease_until:
            await self.ledger.renew(request_id, float(_str(lease_until)))

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot`` (one Lua script; the money stays reserved)."""
        await self._call(self._release_slot, keys=[], args=[self._prefix, request_id])

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct``: the ledger, then the spent counters.

        The counters are skipped while they are lost: their rebuild reads the corrected ledger.
        """
        old = await self.ledger.correct(request_id, settlement)
        if old is None:
            return None
        delta = settlement.cost - old.cost
        if delta and await self._call(self._client.exists, self._key("epoch")):
            try:
                async with self._client.pipeline(transaction=True) as pipe:
                    for key in old.windows.values():
                        _ = pipe.incrby(self._key("spent", old.team, key), delta)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc
        return delta

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id`` (in the ledger: it also answers ``owner_of``)."""
        await self.ledger.note_upstream_id(request_id, upstream_id)

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        if not await self._call(self._client.exists, self._key("epoch")):
            await self.ensure_counters()
        values = await self._call(self._usage, keys=[], args=[self._prefix, team, *keys])
        out: dict[str, WindowUsage] = {}
        for index, key in enumerate(keys):
            spent, reserved = values[2 + 2 * index], values[3 + 2 * index]
            out[key] = WindowUsage(spent=int(spent), reserved=int(reserved))
        return out

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        values = await self._call(self._usage, keys=[], args=[self._prefix, team])
        return int(values[0]), int(values[1])

    async def record(self, request_id: str) -> LedgerRecord | None:
        """See ``Store.record`` (the ledger)."""
        return await self.ledger.record(request_id)

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of`` (the ledger)."""
        return await self.ledger.owner_of(upstream_id)

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``Store.dispatched`` (the ledger)."""
        return await self.ledger.dispatched()

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``Store.records`` (the ledger)."""
        return await self.ledger.records(since=since, until=until)


_REHOLD: Final = (
    "-- clipia_rehold_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local l = cjson.decode(ARGV[3])
local rec = P .. ':lease:' .. rid
if redis.call('EXISTS', rec) == 1 then return 0 end
redis.call('HSET', rec, 'team', l.team, 'reserved', l.amount, 'windows', cjson.encode(l.windows))
redis.call('EXPIRE', rec, l.lease_ttl)
if l.key then redis.call('HSET', rec, 'key', l.key) end
if l.lease_until > now then
  local live = P .. ':live:' .. l.team
  redis.call('ZADD', live, l.lease_until, rid)
  redis.call('EXPIRE', live, l.lease_ttl)
  if l.key then
    local klive = P .. ':klive:' .. l.key
    redis.call('ZADD', klive, l.lease_until, rid)
    redis.call('EXPIRE', klive, l.lease_ttl)
  end
end
for period, key in pairs(l.windows) do
  local reserved = P .. ':reserved:' .. l.team .. ':' .. key
  redis.call('INCRBY', reserved, l.amount)
  redis.call('EXPIRE', reserved, l.window_ttls[period] or l.total_ttl)
end
return 1
"""
)


def _key_scope(record: LedgerRecord) -> dict[str, str]:
    """The key scope (``{team}:{key id}``) of a record read back from the ledger, if any."""
    return {} if record.key_id is None else {"key": f"{record.team}:{record.key_id}"}


def _key_limits(request: ReserveRequest) -> dict[str, str | int | None]:
    """The reserve script's arguments for the key's own limits (none without ``key_limits``)."""
    limits = request.key_limits
    if limits is None or request.key_id is None:
        return {}
    return {
        "key": request.key_id,
        "key_rpm": limits.rpm,
        "key_tpm": limits.tpm,
        "key_concurrency": limits.concurrency,
    }


def _ttl_of(window: str) -> int:
    return _TOTAL_TTL if window == "total" else _WINDOW_TTL


def _result(data: dict[str, Any]) -> ReserveResult:
    reason = data.get("reason")
    period = data.get("period")
    budget_period = data.get("budget_period")
    return ReserveResult(
        admitted=bool(data.get("admitted")),
        reason=Reason(reason) if reason else None,
        period=Period(period) if period else None,
        limit=int(data.get("limit", 0)),
        used=int(data.get("used", 0)),
        retry_after=float(data.get("retry_after", 0.0)),
        requests_remaining=(
            int(data["requests_remaining"]) if "requests_remaining" in data else None
        ),
        tokens_remaining=int(data["tokens_remaining"]) if "tokens_remaining" in data else None,
        budget_remaining=(
            Micro(int(data["budget_remaining"])) if "budget_remaining" in data else None
        ),
        budget_period=Period(budget_period) if budget_period else None,
        key=bool(data.get("key", False)),
        key_requests_remaining=(
            int(data["key_requests_remaining"]) if "key_requests_remaining" in data else None
        ),
        key_tokens_remaining=(
            int(data["key_tokens_remaining"]) if "key_tokens_remaining" in data else None
        ),
        replayed=bool(data.get("replayed", False)),
    )


_STORE_CHECK: type[Store] = RedisStore

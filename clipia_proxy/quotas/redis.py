"""The ``redis`` backend: quota state and the ledger shared by every replica and sidecar.

Each operation is one Lua script (names carry a version: ``clipia_reserve_v2``), so it is
atomic on the server and all-or-nothing; leases and the RPM/TPM windows run on the server's
``TIME``, so replica clock skew changes nothing. ``reserve`` and ``settle`` are keyed by request
id: a call retried after a lost reply finds its own earlier effect and applies nothing again.
Every key has a TTL (counters of a window live until 40 days after it resets; records 400
days), refreshed on write. Calendar window keys (``day:2026-11-25``) come from the caller.

Keys, under ``store.redis_key_prefix`` (P): ``P:rec:{id}`` (hash: the ledger record),
``P:live:{team}`` (zset id→lease end), ``P:reserved:{team}:{window}`` and
``P:spent:{team}:{window}`` (integers, micro-credits), ``P:win:{team}`` / ``P:wtok:{team}`` /
``P:wsum:{team}`` (the 60-second request log, its tokens and their sum), ``P:dispatched`` (zset
id→lease end), ``P:ledger`` (zset id→created), ``P:owner:{upstream id}`` (team).
"""

from __future__ import annotations

import os
from typing import Any, Final

import msgspec
import redis
import redis.asyncio as aioredis
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from clipia_proxy.config import StoreConfig

from .model import (
    Micro,
    Outcome,
    Period,
    Reason,
    RecordState,
    ReserveRequest,
    ReserveResult,
    Settlement,
)
from .store import LedgerRecord, Store, StoreUnavailable, WindowUsage

__all__ = ["RedisStore"]

_RECORD_TTL: Final = 400 * 86400
_WINDOW_TTL: Final = (31 + 40) * 86400
"""A window's counters outlive its reset (at most a month away) by 40 days."""
_WINDOW_TTLS: Final = {
    "day": _WINDOW_TTL,
    "week": _WINDOW_TTL,
    "month": _WINDOW_TTL,
    "total": _RECORD_TTL,
}

# Shared by every script: release leases that ran out, prune the 60-second window.
_PRELUDE: Final = """
pcall(redis.replicate_commands)
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function expire(team)
  -- Leases that ran out free their concurrency slot; a record's money stays reserved
  -- ('held') until it is settled, by its request or by the reconciler.
  local live = P .. ':live:' .. team
  local gone = redis.call('ZRANGEBYSCORE', live, '-inf', now)
  for _, rid in ipairs(gone) do
    local rec = P .. ':rec:' .. rid
    if redis.call('HGET', rec, 'held') ~= '1' then
      -- a record reserved before money was held apart: its lease held both
      local amount = tonumber(redis.call('HGET', rec, 'reserved') or '0')
      local wins = redis.call('HGET', rec, 'windows')
      if wins then
        for _, key in pairs(cjson.decode(wins)) do
          redis.call('DECRBY', P .. ':reserved:' .. team .. ':' .. key, amount)
        end
      end
    end
    redis.call('ZREM', live, rid)
  end
end
local function prune(team)
  local win, wtok, wsum = P .. ':win:' .. team, P .. ':wtok:' .. team, P .. ':wsum:' .. team
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', now - 60)
  for _, rid in ipairs(old) do
    local tokens = tonumber(redis.call('HGET', wtok, rid) or '0')
    redis.call('DECRBY', wsum, tokens)
    redis.call('HDEL', wtok, rid)
  end
  redis.call('ZREMRANGEBYSCORE', win, '-inf', now - 60)
  return win, wtok, wsum
end
"""

_RESERVE: Final = (
    "-- clipia_reserve_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local a = cjson.decode(ARGV[3])
local rec = P .. ':rec:' .. rid
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
  local first = redis.call('ZRANGE', win, 0, 0, 'WITHSCORES')
  local wait = 60
  if first[2] then wait = tonumber(first[2]) + 60 - now end
  refusal = {reason = 'rpm', limit = a.rpm, used = req_n, retry_after = math.max(wait, 0.001)}
end
local tok_n = tonumber(redis.call('GET', wsum) or '0')
if not refusal and a.tpm and tok_n + a.tokens > a.tpm then
  local wait = 60
  if a.tokens <= a.tpm then
    local entries = redis.call('ZRANGE', win, 0, -1, 'WITHSCORES')
    local total = tok_n
    for i = 1, #entries, 2 do
      total = total - tonumber(redis.call('HGET', wtok, entries[i]) or '0')
      if total + a.tokens <= a.tpm then
        wait = math.max(tonumber(entries[i + 1]) + 60 - now, 0.001)
        break
      end
    end
  end
  refusal = {reason = 'tpm', limit = a.tpm, used = tok_n, retry_after = wait}
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
redis.call('HSET', rec, 'team', team, 'key_id', a.key_id or '', 'model', a.model,
  'stream', a.stream and '1' or '0', 'reserved', a.amount, 'tokens_reserved', a.tokens,
  'windows', cjson.encode(a.windows), 'created_at', now, 'lease_until', lease_until,
  'state', 'dispatched', 'cost', 0, 'prompt_tokens', 0, 'completion_tokens', 0, 'held', '1')
redis.call('EXPIRE', rec, a.record_ttl)
redis.call('ZADD', live, lease_until, rid)
redis.call('EXPIRE', live, a.record_ttl)
for period, key in pairs(a.windows) do
  local reserved = P .. ':reserved:' .. team .. ':' .. key
  redis.call('INCRBY', reserved, a.amount)
  redis.call('EXPIRE', reserved, a.window_ttls[period])
end
redis.call('ZADD', win, now, rid)
redis.call('HSET', wtok, rid, a.tokens)
redis.call('INCRBY', wsum, a.tokens)
for _, k in ipairs({win, wtok, wsum}) do redis.call('EXPIRE', k, 120) end
redis.call('ZADD', P .. ':dispatched', lease_until, rid)
redis.call('ZADD', P .. ':ledger', now, rid)
redis.call('ZREMRANGEBYSCORE', P .. ':ledger', '-inf', now - a.record_ttl)
redis.call('EXPIRE', P .. ':dispatched', a.record_ttl)
redis.call('EXPIRE', P .. ':ledger', a.record_ttl)
local result = {admitted = true, now = now}
if refusal then
  result.reason = refusal.reason
  result.period = refusal.period
end
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
    "-- clipia_settle_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local s = cjson.decode(ARGV[3])
local rec = P .. ':rec:' .. rid
if redis.call('EXISTS', rec) == 0 then return 0 end
if redis.call('HGET', rec, 'state') == 'settled' then return 0 end
local team = redis.call('HGET', rec, 'team')
local amount = tonumber(redis.call('HGET', rec, 'reserved') or '0')
local wins = cjson.decode(redis.call('HGET', rec, 'windows'))
local live = P .. ':live:' .. team
if redis.call('HGET', rec, 'held') == '1' or redis.call('ZSCORE', live, rid) then
  for _, key in pairs(wins) do
    redis.call('DECRBY', P .. ':reserved:' .. team .. ':' .. key, amount)
  end
  redis.call('HDEL', rec, 'held')
end
redis.call('ZREM', live, rid)
for period, key in pairs(wins) do
  local spent = P .. ':spent:' .. team .. ':' .. key
  redis.call('INCRBY', spent, s.cost)
  redis.call('EXPIRE', spent, s.window_ttls[period] or s.record_ttl)
end
local wtok = P .. ':wtok:' .. team
local old = redis.call('HGET', wtok, rid)
if old then
  local tokens = s.prompt_tokens + s.completion_tokens
  redis.call('HSET', wtok, rid, tokens)
  redis.call('INCRBY', P .. ':wsum:' .. team, tokens - tonumber(old))
end
redis.call('HSET', rec, 'state', 'settled', 'cost', s.cost, 'prompt_tokens', s.prompt_tokens,
  'completion_tokens', s.completion_tokens, 'usage_source', s.usage_source,
  'outcome', s.outcome, 'settled_at', now)
if s.upstream_id then
  redis.call('HSET', rec, 'upstream_id', s.upstream_id)
  redis.call('SET', P .. ':owner:' .. s.upstream_id, team, 'EX', s.record_ttl)
end
redis.call('ZREM', P .. ':dispatched', rid)
return 1
"""
)

_RENEW: Final = (
    "-- clipia_renew_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local lease_until = now + tonumber(ARGV[3])
local rec = P .. ':rec:' .. rid
if redis.call('HGET', rec, 'state') ~= 'dispatched' then return 0 end
local team = redis.call('HGET', rec, 'team')
local held = redis.call('ZSCORE', P .. ':live:' .. team, rid)
if not held or tonumber(held) <= now then return 0 end  -- ran out: never revived
redis.call('ZADD', P .. ':live:' .. team, 'XX', lease_until, rid)
redis.call('HSET', rec, 'lease_until', lease_until)
redis.call('ZADD', P .. ':dispatched', 'XX', lease_until, rid)
return 1
"""
)

_USAGE: Final = (
    "-- clipia_usage_v2\n"
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
    "-- clipia_release_slot_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local team = redis.call('HGET', P .. ':rec:' .. rid, 'team')
if not team then return 0 end
return redis.call('ZREM', P .. ':live:' .. team, rid)
"""
)

_NOTE: Final = (
    "-- clipia_note_upstream_id_v2\n"
    + _PRELUDE
    + """
local rid = ARGV[2]
local rec = P .. ':rec:' .. rid
if redis.call('HGET', rec, 'state') ~= 'dispatched' then return 0 end
redis.call('HSET', rec, 'upstream_id', ARGV[3])
redis.call('SET', P .. ':owner:' .. ARGV[3], redis.call('HGET', rec, 'team'), 'EX', ARGV[4])
return 1
"""
)

_RESULT: Final = msgspec.json.Decoder()
_DRIVER_INFO: Final = DriverInfo(name="redis-py", lib_version=redis.__version__)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(request_id: str, raw: dict[Any, Any]) -> LedgerRecord | None:
    if not raw:
        return None
    data = {_str(k): _str(v) for k, v in raw.items()}
    windows = msgspec.json.decode(data.get("windows", "{}"), type=dict[Period, str])
    outcome = data.get("outcome")
    return LedgerRecord(
        request_id=request_id,
        team=data["team"],
        key_id=data.get("key_id") or None,
        model=data.get("model", ""),
        stream=data.get("stream") == "1",
        reserved=int(float(data.get("reserved", "0"))),
        tokens_reserved=int(float(data.get("tokens_reserved", "0"))),
        windows=windows,
        created_at=float(data.get("created_at", "0")),
        lease_until=float(data.get("lease_until", "0")),
        state=RecordState(data.get("state", "dispatched")),
        upstream_id=data.get("upstream_id") or None,
        cost=int(float(data.get("cost", "0"))),
        prompt_tokens=int(float(data.get("prompt_tokens", "0"))),
        completion_tokens=int(float(data.get("completion_tokens", "0"))),
        usage_source=data.get("usage_source") or None,
        outcome=Outcome(outcome) if outcome else None,
        settled_at=float(data["settled_at"]) if data.get("settled_at") else None,
    )


class RedisStore:
    """Quota state and ledger in Redis (see the module docstring)."""

    is_remote = True

    def __init__(self, client: aioredis.Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._renew = client.register_script(_RENEW)
        self._usage = client.register_script(_USAGE)
        self._release_slot = client.register_script(_RELEASE_SLOT)
        self._note = client.register_script(_NOTE)

    @classmethod
    def from_config(cls, config: StoreConfig, url: str | None = None) -> RedisStore:
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
        return cls(client, prefix=config.redis_key_prefix)

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def start(self) -> None:
        """Check the server answers."""
        await self._call(self._client.ping)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """See ``Store.reserve`` (one Lua script)."""
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
            "model": request.model,
            "key_id": request.key_id,
            "stream": request.stream,
            "record_ttl": _RECORD_TTL,
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
            replayed=bool(data.get("replayed", False)),
        )

    async def settle(self, request_id: str, settlement: Settlement) -> bool:
        """See ``Store.settle`` (one Lua script; a replay applies nothing)."""
        args = {
            "cost": settlement.cost,
            "prompt_tokens": settlement.prompt_tokens,
            "completion_tokens": settlement.completion_tokens,
            "usage_source": settlement.usage_source.value,
            "outcome": settlement.outcome.value,
            "upstream_id": settlement.upstream_id,
            "record_ttl": _RECORD_TTL,
            "window_ttls": _WINDOW_TTLS,
        }
        present = {name: value for name, value in args.items() if value is not None}
        applied = await self._call(
            self._settle, keys=[], args=[self._prefix, request_id, msgspec.json.encode(present)]
        )
        return bool(applied)

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew``; the lease runs on the server's clock (``now`` is unused)."""
        await self._call(self._renew, keys=[], args=[self._prefix, request_id, lease_seconds])

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot`` (one Lua script)."""
        await self._call(self._release_slot, keys=[], args=[self._prefix, request_id])

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id`` (one Lua script; also records the id's owner)."""
        await self._call(
            self._note, keys=[], args=[self._prefix, request_id, upstream_id, _RECORD_TTL]
        )

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
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
        """See ``Store.record``."""
        raw = await self._call(self._client.hgetall, self._key("rec", request_id))
        return _record(request_id, raw)

    async def owner_of(self, upstream_id: str) -> str | None:
        """See ``Store.owner_of``."""
        value = await self._call(self._client.get, self._key("owner", upstream_id))
        return None if value is None else _str(value)

    async def _records(self, ids: list[Any]) -> list[LedgerRecord]:
        if not ids:
            return []
        names = [_str(i) for i in ids]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    _ = pipe.hgetall(self._key("rec", name))
                rows = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc
        return [r for n, raw in zip(names, rows, strict=True) if (r := _record(n, raw)) is not None]

    async def dispatched(self) -> list[LedgerRecord]:
        """See ``Store.dispatched``."""
        ids = await self._call(self._client.zrange, self._key("dispatched"), 0, -1)
        return await self._records(ids)

    async def records(self, *, since: float, until: float) -> list[LedgerRecord]:
        """See ``Store.records``."""
        ids = await self._call(self._client.zrangebyscore, self._key("ledger"), since, f"({until}")
        return await self._records(ids)


_STORE_CHECK: type[Store] = RedisStore

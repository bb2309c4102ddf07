"""The ``redis`` counters: shared by every replica and sidecar, records in PostgreSQL.

Redis holds no per-request records: only counters and leases, O(teams, periods and requests
in flight), so its memory does not grow with traffic. Each operation is one Lua script (names
carry a version: ``clipia_reserve_v4``), atomic on the server; leases and the RPM/TPM windows
run on the server's ``TIME``, so replica clock skew changes nothing. The durable record is the
PostgreSQL ledger's (``ledger.backend: postgres`` is required): ``reserve`` counts and reserves in
Redis (the quota service decides from the counts), commits the record (group-committed with the records of the same moment), then confirms the
reservation is still held (a failed commit undoes it); ``settle`` flips the record once in the
ledger (idempotent by request id), then applies the cost to the counters from the request's
lease, which lives until it is settled (so a retry after a failure in between applies it
exactly once). Script calls made in the same event-loop turn go to Redis in one pipeline, at
most ``_PIPELINES`` in flight (calls made meanwhile join the next one).

Redis Cluster: every script call declares each key it touches in KEYS (names are computed
here), and all keys of a call belong to one team and share its hash tag ``{P:team}`` (one
slot). No script touches two teams: a rebuild is per team.

Counters are never trusted alone. A team's ``{P:team}:epoch`` (no TTL) is written last by its
rebuild; every script refuses to touch the team's counters while it is missing (Redis
flushed, restarted empty, failed over to an empty replica, or a new team). The replica that
finds it missing takes the team's ``:rebuild`` lock, reads one consistent snapshot of the
team in the ledger (spent per window, open reservations, the last minute for RPM/TPM, the
highest sequence number) and, in one script, clears the team's stale keys and writes it back
with a new epoch; the others wait for the epoch. Admissions of that team wait meanwhile (past
``store.timeout_seconds``: 503 ``quota_store_unavailable``); ``/readyz`` says why.

A failover to a replica that lagged keeps the epoch but loses the last writes. Each
reservation takes the next number of the team's ``:seq`` (no TTL) and its ledger record
carries it; a number the ledger already holds for the team proves the counters went back in
time: the record is not written, the team is rebuilt (its epoch replaced) and the request
decided again. A reservation lost by the failover after its record's commit is held again by
the confirmation that follows the commit.

Keys of a team T under ``store.redis_key_prefix`` P, all tagged ``{P:T}``: ``:epoch``,
``:seq``, ``:rebuild``, ``:lease:{id}`` (hash: amount, window keys, the key id when it has its
own limits: a request not yet settled, its money stays reserved until then), ``:live`` (zset
id → lease end: the concurrency slots; a lease that runs out or ``release_slot`` frees the
slot only), ``:reserved:{window}`` and ``:spent:{window}`` (integers, micro-credits),
``:win`` / ``:wtok`` / ``:wsum`` (the 60-second request log, its tokens and their sum), and
for a team key with its own ``limits`` ``:klive:{key id}``, ``:kwin:…``, ``:kwtok:…``,
``:kwsum:…``. Every key but the epoch and the sequence has a TTL, refreshed on write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import redis
import redis.asyncio as aioredis
from redis.driver_info import DriverInfo
from redis.exceptions import NoScriptError, RedisError

from clipia_proxy.config import StoreConfig

from .ledgered import CALENDAR_HORIZON_SECONDS as _CALENDAR_HORIZON_SECONDS
from .memory import RATE_WINDOW_SECONDS
from .model import Counted, RecordState, ReserveRequest, Settlement
from .store import CountersLedger, Inserted, LedgerRecord, Store, StoreUnavailable, WindowUsage

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

# Every script is called with the keys it touches declared in KEYS, all of one team (one
# hash tag, ``{P:team}``: one Redis Cluster slot); key names are computed in Python.
# Shared by every script: the server's clock, and pruning of the 60-second window.
_PRELUDE: Final = """
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function prune(win, wtok, wsum)
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', now - 60)
  for _, rid in ipairs(old) do
    local tokens = tonumber(redis.call('HGET', wtok, rid) or '0')
    redis.call('DECRBY', wsum, tokens)
    redis.call('HDEL', wtok, rid)
  end
  redis.call('ZREMRANGEBYSCORE', win, '-inf', now - 60)
end
"""

_RESERVE: Final = (
    "-- clipia_reserve_v4\n"
    + _PRELUDE
    + """
-- KEYS: epoch, seq, lease, live, win, wtok, wsum, the key's klive, kwin, kwtok, kwsum, then
-- reserved and spent of each window
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
local rid = ARGV[1]
local a = cjson.decode(ARGV[2])
local epoch = redis.call('GET', KEYS[1])
if not epoch then return cjson.encode({lost = true, applied = false}) end
local rec, live, win, wtok, wsum = KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
if redis.call('EXISTS', rec) == 1 then
  return cjson.encode({applied = true, replayed = true})
end
-- Count what the team (and the key's own scope) holds. Leases that ran out free their
-- concurrency slot; the money stays reserved until the request is settled (by its request,
-- or by the reconciler after a crash). The quota service decides from these counts; the
-- script only applies the reservation when every limit fits (decision.fits), or when the
-- request does not enforce them.
redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
prune(win, wtok, wsum)
local c = {now = now, live = redis.call('ZCARD', live), requests = redis.call('ZCARD', win),
  tokens = tonumber(redis.call('GET', wsum) or '0')}
local fits = true
local function within(limit, used, add)
  if limit and used + add > limit then fits = false; return false end
  return true
end
within(a.concurrency, c.live, 1)
if not within(a.rpm, c.requests, 1) then c.rpm_wait = rpm_wait(win) end
if not within(a.tpm, c.tokens, a.tokens) then
  c.tpm_wait = tpm_wait(win, wtok, c.tokens, a.tokens, a.tpm)
end
local klive, kwin, kwtok, kwsum = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
if a.key then
  redis.call('ZREMRANGEBYSCORE', klive, '-inf', now)
  prune(kwin, kwtok, kwsum)
  c.key_live = redis.call('ZCARD', klive)
  c.key_requests = redis.call('ZCARD', kwin)
  c.key_tokens = tonumber(redis.call('GET', kwsum) or '0')
  within(a.key_concurrency, c.key_live, 1)
  if not within(a.key_rpm, c.key_requests, 1) then c.key_rpm_wait = rpm_wait(kwin) end
  if not within(a.key_tpm, c.key_tokens, a.tokens) then
    c.key_tpm_wait = tpm_wait(kwin, kwtok, c.key_tokens, a.tokens, a.key_tpm)
  end
end
local budgets = {}
for i, period in ipairs(a.periods) do
  local limit = a.budgets[period]
  if limit then
    local used = tonumber(redis.call('GET', KEYS[11 + 2 * i]) or '0')
      + tonumber(redis.call('GET', KEYS[10 + 2 * i]) or '0')
    within(limit, used, a.amount)
    -- as text: cjson writes numbers with 14 significant digits
    budgets[period] = string.format('%d', used)
  end
end
if next(budgets) then c.budgets = budgets end
if a.enforce and not fits then
  c.applied = false
  return cjson.encode(c)
end
local lease_until = now + a.lease_seconds
redis.call('HSET', rec, 'reserved', a.amount, 'windows', ARGV[3])
redis.call('EXPIRE', rec, a.lease_ttl)
redis.call('ZADD', live, lease_until, rid)
redis.call('EXPIRE', live, a.lease_ttl)
for i, period in ipairs(a.periods) do
  redis.call('INCRBY', KEYS[10 + 2 * i], a.amount)
  redis.call('EXPIRE', KEYS[10 + 2 * i], a.ttls[i])
end
redis.call('ZADD', win, now, rid)
redis.call('HSET', wtok, rid, a.tokens)
redis.call('INCRBY', wsum, a.tokens)
for _, k in ipairs({win, wtok, wsum}) do redis.call('EXPIRE', k, 120) end
if a.key then
  redis.call('HSET', rec, 'key', a.key)
  redis.call('ZADD', klive, lease_until, rid)
  redis.call('EXPIRE', klive, a.lease_ttl)
  redis.call('ZADD', kwin, now, rid)
  redis.call('HSET', kwtok, rid, a.tokens)
  redis.call('INCRBY', kwsum, a.tokens)
  for _, k in ipairs({kwin, kwtok, kwsum}) do redis.call('EXPIRE', k, 120) end
end
-- The reservation's sequence number: its ledger record carries it, so counters that went
-- back in time (a failover to a lagging replica) issue a number the ledger already has.
c.seq = string.format('%d', redis.call('INCR', KEYS[2]))
c.applied, c.lease_until, c.epoch = true, lease_until, epoch
return cjson.encode(c)
"""
)

_SETTLE: Final = (
    "-- clipia_settle_v4\n"
    + _PRELUDE
    + """
-- KEYS: epoch, lease, live, win, wtok, wsum, the key's klive, kwin, kwtok, kwsum, then
-- reserved and spent of each window
local rid = ARGV[1]
local s = cjson.decode(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local rec = KEYS[2]
if redis.call('EXISTS', rec) == 0 then return 0 end
local amount = tonumber(redis.call('HGET', rec, 'reserved') or '0')
local n = (#KEYS - 10) / 2
for i = 1, n do redis.call('DECRBY', KEYS[9 + 2 * i], amount) end
redis.call('ZREM', KEYS[3], rid)
local keyed = redis.call('HEXISTS', rec, 'key') == 1  -- the key had its own limits
if keyed then redis.call('ZREM', KEYS[7], rid) end
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
  unlog(KEYS[4], KEYS[5], KEYS[6])
  if keyed then unlog(KEYS[8], KEYS[9], KEYS[10]) end
  redis.call('DEL', rec)
  return 1
end
for i = 1, n do
  redis.call('INCRBY', KEYS[10 + 2 * i], s.cost)
  redis.call('EXPIRE', KEYS[10 + 2 * i], s.ttls[i])
end
retoken(KEYS[5], KEYS[6])
if keyed then retoken(KEYS[9], KEYS[10]) end
redis.call('DEL', rec)
return 1
"""
)

_RENEW: Final = (
    "-- clipia_renew_v4\n"
    + _PRELUDE
    + """
-- KEYS: lease, live, the key's klive
local rid = ARGV[1]
local lease_until = now + tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local held = redis.call('ZSCORE', KEYS[2], rid)
if not held or tonumber(held) <= now then return 0 end  -- ran out: never revived
redis.call('ZADD', KEYS[2], 'XX', lease_until, rid)
if redis.call('HEXISTS', KEYS[1], 'key') == 1 then
  redis.call('ZADD', KEYS[3], 'XX', lease_until, rid)
end
return tostring(lease_until)
"""
)

_USAGE: Final = (
    "-- clipia_usage_v2\n"
    + _PRELUDE
    + """
-- KEYS: epoch, live, win, wtok, wsum, then spent and reserved of each window
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
prune(KEYS[3], KEYS[4], KEYS[5])
local out = {redis.call('ZCARD', KEYS[3]), tonumber(redis.call('GET', KEYS[5]) or '0')}
for i = 6, #KEYS do
  table.insert(out, tonumber(redis.call('GET', KEYS[i]) or '0'))
end
return out
"""
)

_RELEASE_SLOT: Final = (
    "-- clipia_release_slot_v4\n"
    + """
-- KEYS: lease, live, the key's klive
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'key') == 1 then redis.call('ZREM', KEYS[3], ARGV[1]) end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
)

_CONFIRM: Final = (
    "-- clipia_confirm_v2\n"
    + _PRELUDE
    + """
-- KEYS: epoch, lease, live, the key's klive, then reserved of each window
-- After the record's commit: is the reservation still held? A rebuild that read the ledger
-- before the commit, or a failover that lost the write, left it out: hold it again.
local rid = ARGV[1]
local l = cjson.decode(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'reserved', l.amount, 'windows', ARGV[3])
redis.call('EXPIRE', KEYS[2], l.lease_ttl)
if l.key then redis.call('HSET', KEYS[2], 'key', l.key) end
if l.lease_until > now then
  redis.call('ZADD', KEYS[3], l.lease_until, rid)
  redis.call('EXPIRE', KEYS[3], l.lease_ttl)
  if l.key then
    redis.call('ZADD', KEYS[4], l.lease_until, rid)
    redis.call('EXPIRE', KEYS[4], l.lease_ttl)
  end
end
for i = 5, #KEYS do
  redis.call('INCRBY', KEYS[i], l.amount)
  redis.call('EXPIRE', KEYS[i], l.ttls[i - 4])
end
return 1
"""
)

_CORRECT: Final = (
    "-- clipia_correct_v1\n"
    + """
-- KEYS: epoch, then spent of each window. Lost counters are skipped: the rebuild reads the
-- corrected ledger.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #KEYS do redis.call('INCRBY', KEYS[i], ARGV[1]) end
return 1
"""
)

_BEGIN_REBUILD: Final = (
    "-- clipia_begin_rebuild_v1\n"
    + """
-- KEYS: rebuild lock, epoch. ARGV: token, lock ms, the epoch the caller saw ('' if none).
-- 1: this caller rebuilds (the epoch is gone: every script refuses meanwhile); 0: another
-- replica is rebuilding; 2: nothing to do (rebuilt since the caller looked).
-- A caller whose earlier reply was lost finds its own token: it goes on.
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
local current = redis.call('GET', KEYS[2])
if current and (ARGV[3] == '' or current ~= ARGV[3]) then return 2 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""
)

_REBUILD: Final = (
    "-- clipia_rebuild_v3\n"
    + _PRELUDE
    + """
-- KEYS: rebuild lock, epoch, seq, live, win, wtok, wsum, then the keys the payload names by
-- index (stale keys to delete, spent counters, leases, reserved counters): all one team's.
local token = ARGV[1]
if redis.call('GET', KEYS[1]) ~= token then return 0 end
local d = cjson.decode(ARGV[2])
for _, i in ipairs(d.stale) do redis.call('DEL', KEYS[i]) end
for _, k in ipairs({KEYS[4], KEYS[5], KEYS[6], KEYS[7]}) do redis.call('DEL', k) end
for _, row in ipairs(d.spent) do
  redis.call('SET', KEYS[row[1]], string.format('%d', row[2]))
  redis.call('EXPIRE', KEYS[row[1]], row[3])
end
for _, l in ipairs(d.leases) do
  redis.call('DEL', KEYS[l.key])
  redis.call('HSET', KEYS[l.key], 'reserved', l.amount, 'windows', l.windows)
  redis.call('EXPIRE', KEYS[l.key], d.lease_ttl)
  if l.scope then redis.call('HSET', KEYS[l.key], 'key', l.scope) end
  if l.lease_until > now then
    redis.call('ZADD', KEYS[4], l.lease_until, l.id)
    redis.call('EXPIRE', KEYS[4], d.lease_ttl)
    if l.klive then
      redis.call('ZADD', KEYS[l.klive], l.lease_until, l.id)
      redis.call('EXPIRE', KEYS[l.klive], d.lease_ttl)
    end
  end
  for _, r in ipairs(l.reserved) do  -- the money is held until settled
    redis.call('INCRBY', KEYS[r[1]], l.amount)
    redis.call('EXPIRE', KEYS[r[1]], r[2])
  end
end
for _, r in ipairs(d.rates) do
  if r.at > now - 60 then
    redis.call('ZADD', KEYS[5], r.at, r.id)
    redis.call('HSET', KEYS[6], r.id, r.tokens)
    redis.call('INCRBY', KEYS[7], r.tokens)
    if r.kwin then  -- a key's own log: [kwin, kwtok, kwsum]
      redis.call('ZADD', KEYS[r.kwin[1]], r.at, r.id)
      redis.call('HSET', KEYS[r.kwin[2]], r.id, r.tokens)
      redis.call('INCRBY', KEYS[r.kwin[3]], r.tokens)
      for _, i in ipairs(r.kwin) do redis.call('EXPIRE', KEYS[i], 120) end
    end
  end
end
for _, k in ipairs({KEYS[5], KEYS[6], KEYS[7]}) do redis.call('EXPIRE', k, 120) end
redis.call('SET', KEYS[3], string.format('%d', d.seq))
redis.call('SET', KEYS[2], d.epoch)
redis.call('DEL', KEYS[1])
return 1
"""
)

_DRIVER_INFO: Final = DriverInfo(name="redis-py", lib_version=redis.__version__)
_REBUILD_LOCK_MS: Final = 30_000
_REBUILD_WAIT_SECONDS: Final = 60.0
_SAFE_POLICY: Final = "noeviction"
_PIPELINES: Final = 4
"""Script pipelines in flight at once per replica (Redis runs one command at a time: more
would add connections, not throughput; calls wait for the next pipeline instead)."""


class CountersLost(StoreUnavailable):
    """Redis lost the counters (flushed, restarted empty, failed over): rebuilding them."""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Script:
    """A Lua script: its text and SHA1 (EVALSHA, loaded again when the server lost it)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


class _Pipe:
    """Script calls made in the same moment go to Redis in one pipeline (one round trip).

    The first call of a batch schedules the send for the end of the event-loop turn; every
    call made meanwhile joins it. At most ``limit`` pipelines are in flight (so at most that
    many connections): calls made while they all are join the next one, sent as soon as one
    returns. Each caller awaits its own reply. A script the server does not know (restarted,
    flushed with ``SCRIPT FLUSH``) is loaded and its calls sent again.
    """

    def __init__(self, client: aioredis.Redis, *, limit: int = _PIPELINES) -> None:
        self._client = client
        self._limit = limit
        self._queue: list[
            tuple[_Script, Sequence[str | bytes], list[Any], asyncio.Future[Any]]
        ] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, script: _Script, keys: Sequence[str | bytes], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        if self._queue and not self._scheduled and self._running < self._limit:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        if not self._queue or self._running >= self._limit:
            return
        batch, self._queue = self._queue, []
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, batch: list[tuple[_Script, Sequence[str | bytes], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            await self._run_batch(batch)
        finally:
            self._running -= 1
            self._kick()

    async def _run_batch(
        self, batch: list[tuple[_Script, Sequence[str | bytes], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            replies = await self._exec(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                for script in {batch[i][0] for i in missing}:
                    await self._client.script_load(script.source)
                again = await self._exec([batch[i] for i in missing])
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except (RedisError, OSError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(f"redis: {exc.__class__.__name__}"))
            return
        except BaseException:
            for *_, future in batch:
                future.cancel()
            raise
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, RedisError):
                future.set_exception(StoreUnavailable(f"redis: {reply.__class__.__name__}"))
            else:
                future.set_result(reply)

    async def _exec(
        self, batch: list[tuple[_Script, Sequence[str | bytes], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await self._client.evalsha(script.sha, len(keys), *keys, *args)]
            except NoScriptError as exc:
                return [exc]
        async with self._client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                _ = pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


class _Reply(Counted, kw_only=True):
    """The reserve script's reply: the counts, and an applied reservation's lease."""

    lost: bool = False
    """The team's counters are gone (a Redis restart or eviction): rebuild, then retry."""
    now: float = 0.0
    """The server's clock at the reservation."""
    lease_until: float = 0.0
    epoch: str = ""
    seq: int = 0
    """The reservation's sequence number (see ``insert_counted``)."""


# Not strict: the script writes large integers (sums, sequence numbers) as text.
_REPLY: Final = msgspec.json.Decoder(_Reply, strict=False)


class RedisStore:
    """Counters and leases in Redis, records in the PostgreSQL ledger (see the module docstring)."""

    is_remote = True

    def __init__(self, client: aioredis.Redis, ledger: CountersLedger, *, prefix: str) -> None:
        self._client = client
        self.ledger: Final = ledger
        self._prefix = prefix
        self._pipe = _Pipe(client)
        self._reserve = _Script(_RESERVE)
        self._settle = _Script(_SETTLE)
        self._renew = _Script(_RENEW)
        self._usage = _Script(_USAGE)
        self._release_slot = _Script(_RELEASE_SLOT)
        self._confirm = _Script(_CONFIRM)
        self._correct = _Script(_CORRECT)
        self._begin_rebuild = _Script(_BEGIN_REBUILD)
        self._rebuild_script = _Script(_REBUILD)
        self._rebuilding: dict[str, asyncio.Task[None]] = {}
        self._token = uuid.uuid4().hex
        self._names: dict[tuple[str, str], bytes] = {}
        self._teams: dict[str, tuple[str, list[str], str | None]] = {}
        """Request id -> (team, window keys, key id) of this replica's requests not settled."""
        self.rebuilds = 0
        """Teams' counters rebuilt from the ledger by this replica (exported as a metric)."""
        self.problems: list[str] = []
        """Why this store cannot admit now (``/readyz``): empty when it can."""
        self.warnings: list[str] = []
        """Redis settings that can lose counters (``/readyz`` detail, logged at start)."""

    @classmethod
    def from_config(
        cls, config: StoreConfig, ledger: CountersLedger, url: str | None = None
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

    # -- key names (one hash tag per team: a Redis Cluster slot) ---------------------------
    def _tag(self, team: str) -> str:
        return "{" + self._prefix + ":" + team + "}"

    def _name(self, team: str, suffix: str) -> bytes:
        """A team's key name, encoded once (redis-py packs bytes for half the cost of text)."""
        name = self._names.get((team, suffix))
        if name is None:
            if len(self._names) > 50_000:  # day windows accumulate: start over now and then
                self._names.clear()
            name = self._names[team, suffix] = (self._tag(team) + suffix).encode()
        return name

    def _hot(self, team: str, rid: str, key_id: str | None) -> list[bytes]:
        """epoch, lease, live, win, wtok, wsum, klive, kwin, kwtok, kwsum of a request."""
        kid = key_id or ""
        return [
            self._name(team, ":epoch"),
            (self._tag(team) + ":lease:" + rid).encode(),
            self._name(team, ":live"),
            self._name(team, ":win"),
            self._name(team, ":wtok"),
            self._name(team, ":wsum"),
            self._name(team, ":klive:" + kid),
            self._name(team, ":kwin:" + kid),
            self._name(team, ":kwtok:" + kid),
            self._name(team, ":kwsum:" + kid),
        ]

    def _scope(self, team: str, key_id: str | None) -> tuple[str, str, str, str]:
        """(klive, kwin, kwtok, kwsum): a team key's own slots and log (its own limits)."""
        tag = self._tag(team)
        kid = key_id or ""
        return (
            tag + ":klive:" + kid,
            tag + ":kwin:" + kid,
            tag + ":kwtok:" + kid,
            tag + ":kwsum:" + kid,
        )

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def start(self) -> None:
        """Migrate the ledger and check Redis's settings.

        Each team's counters are rebuilt from the ledger when first needed (its epoch key is
        missing: a new team, or Redis lost them).
        """
        await self.ledger.start()
        await self._call(self._client.ping)
        await self.check_settings()

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
        for task in list(self._rebuilding.values()):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                    await task
        await self._client.aclose()
        await self.ledger.close()

    # -- rebuilding a team's counters from the ledger --------------------------------------
    async def ensure_counters(self, team: str, *, seen_epoch: str = "") -> None:
        """Rebuild a team's counters from the ledger (or wait for another replica's rebuild).

        With ``seen_epoch``, the counters of that epoch are known to be behind the ledger:
        they are rebuilt unless that happened already. One rebuild per team at a time in a
        replica (callers share it); across replicas a lock key elects one, the others wait
        for the epoch key it writes last.
        """
        task = self._rebuilding.get(team)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._rebuild(team, seen_epoch))
            self._rebuilding[team] = task
            task.add_done_callback(lambda _: self._rebuild_done(team, task))
        # A waiter cancelled (its request timed out) leaves the rebuild running for the others.
        await asyncio.wait({task})
        task.result()

    def _rebuild_done(self, team: str, task: asyncio.Task[None]) -> None:
        if self._rebuilding.get(team) is task:
            del self._rebuilding[team]
        if not any(not t.done() for t in self._rebuilding.values()):
            self.problems = []

    async def _rebuild(self, team: str, seen_epoch: str) -> None:
        self.problems = ["quota counters are being rebuilt from the ledger (Redis lost them)"]
        tag = self._tag(team)
        lock, epoch = tag + ":rebuild", tag + ":epoch"
        try:
            deadline = time.monotonic() + _REBUILD_WAIT_SECONDS
            # This replica's token for the team: a retry after a lost reply resumes its lock.
            token = f"{self._token}:{team}"
            while True:
                began = await self._pipe.run(
                    self._begin_rebuild, [lock, epoch], [token, _REBUILD_LOCK_MS, seen_epoch]
                )
                if began == 2:
                    return
                if began == 1:
                    await self._rebuild_as(team, token)
                    return
                if time.monotonic() > deadline:
                    raise CountersLost("redis: the counters are being rebuilt by another replica")
                await asyncio.sleep(0.05)
        except (StoreUnavailable, RedisError, OSError) as exc:
            self.problems = ["quota counters lost and not yet rebuilt from the ledger"]
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}") from exc

    async def _rebuild_as(self, team: str, token: str) -> None:
        _LOGGER.warning("redis counters of team %s lost: rebuilding them from the ledger", team)
        started = time.monotonic()
        tag = self._tag(team)
        fixed = [tag + name for name in (":rebuild", ":epoch", ":seq", ":live", ":win")]
        fixed += [tag + ":wtok", tag + ":wsum"]
        keys = list(fixed)
        index: dict[str, int] = {key: n for n, key in enumerate(keys, start=1)}

        def at(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]

        # Nothing else writes this team's counters while its epoch key is missing (every
        # script checks it): stale counters (an eviction, a lagging replica) are cleared.
        stale = [
            at(_str(key))
            for key in [
                k async for k in self._client.scan_iter(match=_glob_escape(tag) + ":*", count=1000)
            ]
            if _str(key) not in fixed
        ]
        now = time.time()
        snapshot = await self.ledger.team_snapshot(
            team, since=now - _CALENDAR_HORIZON_SECONDS, recent_since=now - RATE_WINDOW_SECONDS
        )
        counters = snapshot.counters
        payload = {
            "stale": stale,
            "spent": [
                [at(tag + ":spent:" + row.window), row.spent, _ttl_of(row.window)]
                for row in counters.spent
            ],
            "leases": [
                {
                    "key": at(tag + ":lease:" + record.request_id),
                    "id": record.request_id,
                    "amount": record.reserved,
                    "lease_until": record.lease_until,
                    "windows": msgspec.json.encode(list(record.windows.values())).decode(),
                    # Which keys have limits is config, not in the ledger: every key's slots.
                    **(
                        {}
                        if record.key_id is None
                        else {
                            "scope": record.key_id,
                            "klive": at(self._scope(team, record.key_id)[0]),
                        }
                    ),
                    "reserved": [
                        [at(tag + ":reserved:" + window), _ttl_of(window)]
                        for window in record.windows.values()
                    ],
                }
                for record in counters.dispatched
            ],
            "rates": [
                {
                    "id": record.request_id,
                    "at": record.created_at,
                    "tokens": record.tokens_reserved
                    if record.state is RecordState.DISPATCHED
                    else record.prompt_tokens + record.completion_tokens,
                    **(
                        {}
                        if record.key_id is None
                        else {"kwin": [at(k) for k in self._scope(team, record.key_id)[1:]]}
                    ),
                }
                for record in counters.recent
            ],
            "seq": snapshot.counter_seq,
            "epoch": uuid.uuid4().hex,
            "lease_ttl": _LEASE_TTL,
        }
        done = await self._pipe.run(
            self._rebuild_script, keys, [token, msgspec.json.encode(payload)]
        )
        if not done:
            raise CountersLost("redis: the rebuild lock was lost; retrying")
        self.rebuilds += 1
        _LOGGER.warning(
            "redis counters of team %s rebuilt from the ledger in %.2f s "
            "(%d windows, %d open reservations)",
            team,
            time.monotonic() - started,
            len(counters.spent),
            len(counters.dispatched),
        )

    # -- the Store protocol ---------------------------------------------------------------
    async def reserve(self, request: ReserveRequest) -> Counted:
        """See ``Store.reserve``: one Lua script counts and reserves, then the record is committed."""
        for _ in range(3):
            result = await self._reserve_once(request)
            if result is not None:
                return result
        raise CountersLost("redis: the counters kept going behind the ledger")

    async def _reserve_once(self, request: ReserveRequest) -> Counted | None:
        team = request.team
        # Known before the script runs: a void after a lost reply finds the keys.
        self._teams[request.request_id] = (team, list(request.periods.values()), request.key_id)
        reply = await self._reserve_counters(request)
        if reply.lost:
            await self.ensure_counters(team)
            reply = await self._reserve_counters(request)
            if reply.lost:
                raise CountersLost("redis: the counters were lost again during the rebuild")
        if not reply.applied:
            self._teams.pop(request.request_id, None)
            return reply
        record = LedgerRecord(
            request_id=request.request_id,
            team=team,
            key_id=request.key_id,
            model=request.model,
            stream=request.stream,
            reserved=request.amount,
            tokens_reserved=request.tokens,
            windows=dict(request.periods),
            created_at=reply.now or request.now,  # the server's clock, as the lease
            lease_until=reply.lease_until or request.now + request.lease_seconds,
            environment=request.environment,
            tags=dict(request.tags),
            end_user=request.end_user,
        )
        if reply.replayed:
            # The lease is there: an earlier call reserved and may have died before its
            # record was committed. Commit it now (a no-op when it was).
            await self.ledger.insert(record)
            return reply
        try:
            # (A caller gone before its batch commits is refused; the ledger settles such a
            # record as never sent.)
            inserted = await self.ledger.insert_counted(record, reply.seq)
        except BaseException:
            await self._void(request)
            raise
        if inserted is Inserted.EXISTS:  # the id is in the ledger already: a replay
            await self._void(request)
            return Counted(applied=True, replayed=True)
        if inserted is Inserted.BEHIND:
            # These counters issued a number the ledger already has: they went back in time
            # (a failover to a lagging replica). Rebuild them, then decide again.
            _LOGGER.warning("redis counters of team %s are behind the ledger", team)
            self._teams.pop(request.request_id, None)
            await self.ensure_counters(team, seen_epoch=reply.epoch)
            return None
        await self._hold(record)
        return reply

    async def _reserve_counters(self, request: ReserveRequest) -> _Reply:
        limits = request.limits
        periods = [p.value for p in request.periods]
        args = {
            "amount": request.amount,
            "tokens": request.tokens,
            "periods": periods,
            "ttls": [_WINDOW_TTLS.get(p, _TOTAL_TTL) for p in periods],
            "budgets": {p.value: v for p, v in limits.budgets.items()},
            "rpm": limits.rpm,
            "tpm": limits.tpm,
            "concurrency": limits.concurrency,
            "lease_seconds": request.lease_seconds,
            "enforce": request.enforce,
            **_key_limits(request),
            "lease_ttl": _LEASE_TTL,
        }
        # cjson turns JSON null into a truthy userdata: absent keys are Lua nils instead.
        present = {name: value for name, value in args.items() if value is not None}
        team = request.team
        hot = self._hot(team, request.request_id, request.key_id)
        keys = [hot[0], self._name(team, ":seq"), *hot[1:]]
        for window in request.periods.values():
            keys += (self._name(team, ":reserved:" + window), self._name(team, ":spent:" + window))
        windows = msgspec.json.encode(list(request.periods.values()))
        raw = await self._pipe.run(
            self._reserve, keys, [request.request_id, msgspec.json.encode(present), windows]
        )
        return _REPLY.decode(raw)

    async def _hold(self, record: LedgerRecord) -> None:
        """After the commit: confirm the reservation is still held (else hold it again)."""
        team = record.team
        epoch, lease, live, *_, klive, _, _, _ = self._hot(team, record.request_id, record.key_id)
        keys = [
            epoch,
            lease,
            live,
            klive,
            *(self._name(team, ":reserved:" + w) for w in record.windows.values()),
        ]
        args = [
            record.request_id,
            msgspec.json.encode(
                {
                    "amount": record.reserved,
                    "lease_until": record.lease_until,
                    "lease_ttl": _LEASE_TTL,
                    "ttls": [_ttl_of(w) for w in record.windows.values()],
                    **({} if record.key_id is None else {"key": record.key_id}),
                }
            ),
            msgspec.json.encode(list(record.windows.values())),
        ]
        if await self._pipe.run(self._confirm, keys, args) == -1:
            # The counters were lost since: the rebuild read the committed record (or its
            # successor will); hold it now if it did not.
            await self.ensure_counters(record.team)
            await self._pipe.run(self._confirm, keys, args)

    async def _void(self, request: ReserveRequest) -> None:
        self._teams.pop(request.request_id, None)
        held = (request.team, list(request.periods.values()), request.key_id)
        with contextlib.suppress(StoreUnavailable):
            await self._apply(held, request.request_id, {"void": True})

    async def _apply(
        self, held: tuple[str, list[str], str | None], request_id: str, args: dict[str, Any]
    ) -> int:
        team, windows, key_id = held
        keys = self._hot(team, request_id, key_id)
        for window in windows:
            keys += (self._name(team, ":reserved:" + window), self._name(team, ":spent:" + window))
        argv = [request_id, msgspec.json.encode({**args, "ttls": [_ttl_of(w) for w in windows]})]
        applied = int(await self._pipe.run(self._settle, keys, argv))
        if applied == -1:  # counters lost: the rebuild reads the ledger; apply after it
            await self.ensure_counters(team)
            applied = int(await self._pipe.run(self._settle, keys, argv))
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
        }
        if settled is None:
            # Already settled in the ledger. If an earlier call failed between the ledger and
            # Redis, the lease is still there: apply it now with the ledger's own numbers.
            record = await self.ledger.record(request_id)
            if record is None:
                # Never recorded, so never dispatched: release a reservation left behind.
                held = self._teams.pop(request_id, None) or await self._find_lease(request_id)
                if held is not None:
                    await self._apply(held, request_id, {"void": True})
                return False
            if record.state is not RecordState.SETTLED:
                return False
            args.update(
                cost=record.cost,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )
            await self._apply(_held(record), request_id, args)
            self._teams.pop(request_id, None)
            return False
        await self._apply(_held(settled), request_id, args)
        self._teams.pop(request_id, None)
        return True

    async def _find_lease(self, request_id: str) -> tuple[str, list[str], str | None] | None:
        """(team, window keys, key id) of a lease this replica does not know (a scan: rare)."""
        head = "{" + _glob_escape(self._prefix) + ":"
        async for key in self._client.scan_iter(
            match=head + "*}:lease:" + _glob_escape(request_id), count=1000
        ):
            name = _str(key)
            team = name[len(self._prefix) + 2 : name.rindex("}:lease:")]
            windows, key_id = await self._call(self._client.hmget, name, ["windows", "key"])
            if windows is not None:
                windows_list = list(msgspec.json.decode(windows, type=list[str]))
                return team, windows_list, None if key_id is None else _str(key_id)
        return None

    async def _lease_keys(self, request_id: str) -> list[bytes] | None:
        """(lease, live, klive) of a request, or None when it is unknown."""
        held = self._teams.get(request_id)
        if held is None:
            record = await self.ledger.record(request_id)
            if record is None:
                return None
            held = _held(record)
        team, _, key_id = held
        hot = self._hot(team, request_id, key_id)
        return [hot[1], hot[2], hot[6]]

    async def renew(self, request_id: str, now: float, lease_seconds: float) -> None:
        """See ``Store.renew``; the lease runs on the server's clock (``now`` is unused)."""
        keys = await self._lease_keys(request_id)
        if keys is None:
            return
        lease_until = await self._pipe.run(self._renew, keys, [request_id, lease_seconds])
        if lease_until:
            await self.ledger.renew(request_id, float(_str(lease_until)))

    async def release_slot(self, request_id: str) -> None:
        """See ``Store.release_slot`` (one Lua script; the money stays reserved)."""
        keys = await self._lease_keys(request_id)
        if keys is not None:
            await self._pipe.run(self._release_slot, keys, [request_id])

    async def correct(self, request_id: str, settlement: Settlement) -> int | None:
        """See ``Store.correct``: the ledger, then the spent counters.

        The counters are skipped while they are lost: their rebuild reads the corrected ledger.
        """
        old = await self.ledger.correct(request_id, settlement)
        if old is None:
            return None
        delta = settlement.cost - old.cost
        if delta:
            team = old.team
            keys = [
                self._name(team, ":epoch"),
                *(self._name(team, ":spent:" + w) for w in old.windows.values()),
            ]
            await self._pipe.run(self._correct, keys, [delta])
        return delta

    async def note_upstream_id(self, request_id: str, upstream_id: str) -> None:
        """See ``Store.note_upstream_id`` (in the ledger: it also answers ``owner_of``)."""
        await self.ledger.note_upstream_id(request_id, upstream_id)

    async def _usage_values(self, team: str, windows: list[str]) -> list[Any]:
        epoch, _, live, win, wtok, wsum, *_ = self._hot(team, "", None)
        keys = [epoch, live, win, wtok, wsum]
        for window in windows:
            keys += (self._name(team, ":spent:" + window), self._name(team, ":reserved:" + window))
        values = await self._pipe.run(self._usage, keys, [])
        if values == -1:
            await self.ensure_counters(team)
            values = await self._pipe.run(self._usage, keys, [])
            if values == -1:
                raise CountersLost("redis: the counters were lost again during the rebuild")
        assert isinstance(values, list)
        return values

    async def usage(self, team: str, keys: list[str], now: float) -> dict[str, WindowUsage]:
        """See ``Store.usage``."""
        values = await self._usage_values(team, keys)
        out: dict[str, WindowUsage] = {}
        for index, key in enumerate(keys):
            spent, reserved = values[2 + 2 * index], values[3 + 2 * index]
            out[key] = WindowUsage(spent=int(spent), reserved=int(reserved))
        return out

    async def rates(self, team: str, now: float) -> tuple[int, int]:
        """See ``Store.rates``."""
        values = await self._usage_values(team, [])
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


def _held(record: LedgerRecord) -> tuple[str, list[str], str | None]:
    """(team, window keys, key id) of a ledger record: the keys of its reservation."""
    return record.team, list(record.windows.values()), record.key_id


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
    """A window key's TTL (``total`` and a key's ``total:key:ID`` live longest)."""
    return _TOTAL_TTL if window.startswith("total") else _WINDOW_TTL


_STORE_CHECK: type[Store] = RedisStore

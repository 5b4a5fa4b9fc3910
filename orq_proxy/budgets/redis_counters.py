"""`RedisCounters`: budget counters shared by many proxy replicas, one atomic Lua script per call.

Selected with `[storage] counters = "redis://host:6379/0"` (needs the optional `redis` extra). Semantics
are those of `InMemoryCounters` (see `counters.py`): a reservation checks and writes every matching budget
in one script, so it is all-or-nothing and atomic across replicas.

Keys, per budget (the workspace is a hash tag, so a workspace's keys share a cluster slot):
- `{prefix}{ws}:{budget}:h`: hash `sig` (period + zone), `start` (window start, Unix s), `sn`/`st` spent
  nano-USD/tokens, `rn`/`rt` reserved nano-USD/tokens. Expires a day after its window ends.
- `...:rq`: sorted set of admitted requests (score = time) for the rolling 60 s window.
- `...:rs`: sorted set of reservations in flight (member `id|cost|tokens|window start`, score = expiry).
  A replica that dies before settling leaves entries that the next script on that budget sweeps out after
  `reservation_ttl` seconds, giving their amounts back: reservations cannot leak for good.
- `...:f`: set of alert ids fired in the current window.
- `{prefix}{ws}:res:{id}`: exists while a reservation is open; settle/release delete it first, which makes
  them happen once across replicas. It lives a day longer than the reservation, so a request that outlasts
  `reservation_ttl` (its estimate already given back) is still charged its actual usage when it settles.
- `{prefix}generation`: a random id written when the counters were (re)built. Redis that lost its dataset
  (a restart without persistence, FLUSHALL, failover to an empty replica) has none: `reserve` and
  `usage_many` then have the counters rebuilt from the ledger (`rebuild`, wired by the app; see
  `ledger.rebuild_counters`) before they answer, and `restore` writes the rebuilt windows and the marker in
  one script, only while the marker is still missing, so replicas rebuilding at once do not double-count.
  (This one key is outside the workspace hash tags: the client is not a cluster client.)

The hot-path scripts (reserve, settle) are given each budget's `:h` key and derive its `rq`/`rs`/`f` keys and
the reservation key from it and a prefix (the same hash tag, hence the same cluster slot); their other
arguments are encoded once per budget record and window (`_Wire`) and reused. A budget's record is
immutable (an update is a new object), so a changed budget is encoded again on its next request.

Lua numbers are doubles: amounts and counts compare exactly up to 2^53 (about 9 million USD in nano-USD);
sums are kept with HINCRBY (64-bit integers).

Failure policy: budgets fail closed. A Redis error propagates; the middleware answers 503 (or forwards when
`fail_open`). A settlement that fails is logged; its reservation expires after `reservation_ttl`. The client
`redis_counters_from_url` builds has explicit socket and connect timeouts and no retries, so a stalled Redis
fails a request within those timeouts whatever redis-py's defaults are. While a lost dataset is being rebuilt,
requests wait for it (at most `REBUILD_WAIT_SECONDS`), then get 503.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

from ulid import ULID

from orq_proxy.budgets._resp import PipelinedScripts, PooledScripts, Script, bulk, bulks, pipelined_scripts
from orq_proxy.budgets.counters import (
    RATE_WINDOW_SECONDS,
    AlertCrossing,
    Dimension,
    Rejection,
    Reservation,
    ReservedBudget,
    frees_at,
)
from orq_proxy.budgets.models import ALERT_DIMENSION_COST, Budget, Period, Usage
from orq_proxy.budgets.periods import window
from orq_proxy.errors import ServiceUnavailable
from orq_proxy.ids import new_request_id
from orq_proxy.usage.events import BudgetConsumption

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["REBUILD_WAIT_SECONDS", "RedisCounters", "redis_counters_from_url"]

REBUILD_WAIT_SECONDS = 10.0  # a request waits this long for a lost dataset's rebuild, then gets 503
_LATE_SETTLE_SECONDS = 86_400  # how long a reservation key outlives its reservation (late settlements)

_COMMON = """
local function roll(h, f, sig, start, expire_in)
  local cur = redis.call('HMGET', h, 'sig', 'start')
  if cur[1] ~= sig or not cur[2] or tonumber(cur[2]) < tonumber(start) then
    redis.call('DEL', h, f)
    redis.call('HSET', h, 'sig', sig, 'start', start, 'sn', 0, 'st', 0, 'rn', 0, 'rt', 0)
  end
  if expire_in ~= '' then redis.call('EXPIRE', h, expire_in) end
end
local function give_back(h, member)
  local _, _, c, t, s = string.find(member, '^[^|]*|([^|]*)|([^|]*)|(.*)$')
  if s == redis.call('HGET', h, 'start') then
    if c ~= '0' then redis.call('HINCRBY', h, 'rn', '-' .. c) end  -- (Redis refuses the integer '-0')
    if t ~= '0' then redis.call('HINCRBY', h, 'rt', '-' .. t) end
  end
end
local function sweep(h, rs, now)
  local expired = redis.call('ZRANGEBYSCORE', rs, '-inf', now)
  for _, m in ipairs(expired) do give_back(h, m) end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', rs, '-inf', now) end
end
"""

# The hot-path scripts do what `_COMMON`'s functions do with fewer calls into Redis (each costs the server
# more than the command itself): one HMGET reads the window and the amounts, a give-back compares with the
# start that HMGET read, and a hash's expiry is set when it starts a window rather than on every call. They
# get each budget's hash key and derive its other keys (same prefix, so the same hash tag and cluster slot),
# each window's end rather than a TTL relative to now, and the request's own values in one argument: every
# other argument is then the same from call to call, and is sent as bytes encoded once (`_Wire`). (Writing
# the amounts with one HSET of sums computed in Lua instead of two to four HINCRBYs was measured too: it
# cost Redis more CPU than the calls it saves; see benchmarks/RESULTS.md, orq-pg.)
_HOT_COMMON = """
local function others(h)
  local base = string.sub(h, 1, -2)
  return base .. 'rq', base .. 'rs', base .. 'f'
end
-- The hash's fields {sig, start, sn, rn, st, rt} after rolling it over to the window (sig, start) when its
-- stored one is older or of another period: all false when the hash does not exist and `create` is false.
-- The expiry is set when the hash starts a window: a day after the window ends, by the proxy's clock. (Every
-- writer of a window sets the same deadline, so it is not set again on each call as `roll` does.)
local function state(h, f, sig, start, window_end, now, create)
  local cur = redis.call('HMGET', h, 'sig', 'start', 'sn', 'rn', 'st', 'rt')
  if not cur[1] and not create then return cur end
  if cur[1] ~= sig or not cur[2] or tonumber(cur[2]) < tonumber(start) then
    redis.call('DEL', h, f)
    redis.call('HSET', h, 'sig', sig, 'start', start, 'sn', 0, 'st', 0, 'rn', 0, 'rt', 0)
    if window_end ~= '' then
      redis.call('EXPIRE', h, math.max(1, math.floor(tonumber(window_end) - now) + 86400))
    end
    cur = {sig, start, '0', '0', '0', '0'}
  end
  return cur
end
-- The amounts (cost, tokens) a reservation member gives back to a hash whose window starts at `hstart`:
-- nil when it was made in another window.
local function held(member, hstart)
  local _, _, c, t, s = string.find(member, '^[^|]*|([^|]*)|([^|]*)|(.*)$')
  if s == hstart then return c, t end
  return nil
end
"""

# KEYS: the generation marker, then per budget its hash h.
# ARGV: 'now|id|cost|tokens', ttl, reservation key expiry, reservation key prefix, then per budget: sig,
# start, window end ('' = none), amount, token_limit, rpm (-1 = none).
# Replies {1} admitted, {2} the marker is missing, {0, ...} refused.
_RESERVE = (
    _HOT_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {2} end
local now, rid, cost, tokens = string.match(ARGV[1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
local ttl = tonumber(ARGV[2])
local n = #KEYS - 1
local nnow = tonumber(now)
for i = 1, n do
  local h = KEYS[i+1]
  local rq, rs, f = others(h)
  local b = 4 + (i-1) * 6
  local v = state(h, f, ARGV[b+1], ARGV[b+2], ARGV[b+3], nnow, true)
  local expired = redis.call('ZRANGEBYSCORE', rs, '-inf', nnow)
  if #expired > 0 then  -- give the expired reservations' amounts back (rare: their replica died)
    for _, m in ipairs(expired) do
      local c, t = held(m, v[2])
      if c then
        if c ~= '0' then v[4] = redis.call('HINCRBY', h, 'rn', '-' .. c) end  -- (Redis refuses '-0')
        if t ~= '0' then v[6] = redis.call('HINCRBY', h, 'rt', '-' .. t) end
      end
    end
    redis.call('ZREMRANGEBYSCORE', rs, '-inf', nnow)
  end
  redis.call('ZREMRANGEBYSCORE', rq, '-inf', nnow - 60)
  local rpm = tonumber(ARGV[b+6])
  if rpm >= 0 then
    local count = redis.call('ZCARD', rq)
    if count >= rpm then
      local oldest = redis.call('ZRANGE', rq, count - rpm, count - rpm, 'WITHSCORES')
      return {0, i, 'requests', ARGV[b+6], tostring(count), '1', oldest[2] or now}
    end
  end
  local amount = tonumber(ARGV[b+4])
  if amount >= 0 then
    local used = tonumber(v[3]) + tonumber(v[4])
    if used >= amount or used + tonumber(cost) > amount then
      return {0, i, 'cost', ARGV[b+4], string.format('%.0f', used), cost, ''}
    end
  end
  local tlimit = tonumber(ARGV[b+5])
  if tlimit >= 0 then
    local used = tonumber(v[5]) + tonumber(v[6])
    if used >= tlimit or used + tonumber(tokens) > tlimit then
      return {0, i, 'tokens', ARGV[b+5], string.format('%.0f', used), tokens, ''}
    end
  end
end
for i = 1, n do
  local h = KEYS[i+1]
  local rq, rs = others(h)
  local b = 4 + (i-1) * 6
  redis.call('HINCRBY', h, 'rn', cost)
  redis.call('HINCRBY', h, 'rt', tokens)
  redis.call('ZADD', rq, now, rid)
  redis.call('EXPIRE', rq, 120)
  redis.call('ZADD', rs, nnow + ttl, rid .. '|' .. cost .. '|' .. tokens .. '|' .. ARGV[b+2])
  redis.call('EXPIRE', rs, ttl + 60)
end
redis.call('SET', ARGV[4] .. rid, '1', 'EX', ARGV[3])
return {1}
"""
)

# KEYS: per budget its hash h.
# ARGV: 'now|id|cost|tokens|actual cost|actual tokens', reservation key prefix, per budget the start it was
# reserved in ('' = the current window's), then per budget: sig, start now, window end ('' = none), amount
# (-1 = none), alert count k, then k pairs (alert id, threshold percent).
_SETTLE = (
    _HOT_COMMON
    + """
local now, rid, cost, tokens, acost, atokens =
  string.match(ARGV[1], '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
if redis.call('DEL', ARGV[2] .. rid) == 0 then return {} end
local nnow = tonumber(now)
local n = #KEYS
local out = {}
local a = 3 + n
for i = 1, n do
  local h = KEYS[i]
  local _, rs, f = others(h)
  local sig, start, window_end, rstart, amount, k =
    ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[2+i], tonumber(ARGV[a+3]), tonumber(ARGV[a+4])
  if rstart == '' then rstart = start end
  local v = state(h, f, sig, start, window_end, nnow, false)
  if v[1] then
    local member = rid .. '|' .. cost .. '|' .. tokens .. '|' .. rstart
    if redis.call('ZREM', rs, member) == 1 then
      local c, t = held(member, v[2])
      if c and c ~= '0' then redis.call('HINCRBY', h, 'rn', '-' .. c) end  -- (Redis refuses '-0')
      if t and t ~= '0' then redis.call('HINCRBY', h, 'rt', '-' .. t) end
    end
    local spent = redis.call('HINCRBY', h, 'sn', acost)
    redis.call('HINCRBY', h, 'st', atokens)
    if amount > 0 then
      for j = 1, k do
        local id, threshold = ARGV[a+3+2*j], tonumber(ARGV[a+4+2*j])
        if spent * 100 >= threshold * amount and redis.call('SADD', f, id) == 1 then
          table.insert(out, i); table.insert(out, id); table.insert(out, tostring(spent))
        end
      end
    end
  end
  a = a + 5 + 2 * k
end
return out
"""
)

# KEYS: the reservation key, then per budget h, rs. ARGV: id, cost, tokens, n, per budget reserved start.
_RELEASE = (
    _COMMON
    + """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[4])
for i = 1, n do
  local h, rs = KEYS[2*i], KEYS[2*i+1]
  local member = ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[4+i]
  if redis.call('ZREM', rs, member) == 1 then give_back(h, member) end
end
return 1
"""
)

# KEYS: h, rq, rs, f. ARGV: sig, start, expire_in, now.
_RESET = (
    _COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
roll(KEYS[1], KEYS[4], ARGV[1], ARGV[2], ARGV[3])
sweep(KEYS[1], KEYS[3], tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'sn', 0, 'st', 0)
redis.call('DEL', KEYS[2], KEYS[4])
return 1
"""
)


# KEYS: the generation marker, then per budget h, rq, rs, f.
# ARGV: new generation, n, then per budget: sig, start, expire_in, spent nano-USD, tokens, request count r,
# r request times, fired alert count k, k alert ids. Replies 1 restored, 0 the marker was there (nothing written).
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[2])
local a = 3
for i = 1, n do
  local h, rq, rs, f = KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i], KEYS[4*i+1]
  redis.call('DEL', h, rq, rs, f)
  redis.call('HSET', h, 'sig', ARGV[a], 'start', ARGV[a+1], 'sn', ARGV[a+3], 'st', ARGV[a+4], 'rn', 0, 'rt', 0)
  if ARGV[a+2] ~= '' then redis.call('EXPIRE', h, ARGV[a+2]) end
  local r = tonumber(ARGV[a+5])
  for j = 1, r do redis.call('ZADD', rq, ARGV[a+5+j], 'restored:' .. j) end
  if r > 0 then redis.call('EXPIRE', rq, 120) end
  a = a + 6 + r
  local k = tonumber(ARGV[a])
  for j = 1, k do redis.call('SADD', f, ARGV[a+j]) end
  a = a + 1 + k
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


_RESERVE_SCRIPT = Script(_RESERVE)
_SETTLE_SCRIPT = Script(_SETTLE)
_RELEASE_SCRIPT = Script(_RELEASE)
_SAME_START = bulk(b"")  # settle: reserved in the window the budget is in now
_MAX_WIRES = 65_536  # budgets (and workspaces) whose encoded arguments are kept


@dataclass(slots=True)
class _Wire:
    """One budget record's part of the hot-path commands in one window, encoded once (`RedisCounters._wire`).

    `key` is its hash key; `reserve` and `settle` its arguments to `_RESERVE` / `_SETTLE` (`settle_count`
    bulk strings), all constant while the record and the window stay the same."""

    budget: Budget
    start_ts: float
    end_ts: float
    start: datetime
    end: datetime | None
    period_start: float  # (what `ReservedBudget.period_start` records: the start, in whole seconds)
    key: bytes
    reserve: bytes
    settle: bytes
    settle_count: int


def _num(value: Any) -> int:
    """A Lua reply number (bytes/str/int, possibly '1.5e+18') as an int."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return int(value) if value.lstrip("-").isdigit() else int(float(value))
    return int(value)


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis that cannot answer raises (redis-py's errors, sockets, timeouts)."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - the optional extra is not installed; nothing raises it
        return (OSError, TimeoutError)
    return (RedisError, OSError, TimeoutError)


_UNAVAILABLE_ERRORS = _redis_errors()
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _unavailable_on_error(
    method: Callable[Concatenate[RedisCounters, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[RedisCounters, _P], Coroutine[Any, Any, _T]]:
    """Raise `ServiceUnavailable` (503 on both surfaces) when Redis cannot answer."""

    @functools.wraps(method)
    async def call(self: RedisCounters, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(self, *args, **kwargs)
        except _UNAVAILABLE_ERRORS as exc:
            raise ServiceUnavailable("budget counters (Redis)", exc) from exc

    return call


class RedisCounters:
    """`Counters` in Redis, for several replicas (see the module docstring).

    Args:
        client: a `redis.asyncio.Redis`.
        prefix: key prefix.
        reservation_ttl: seconds after which an unsettled reservation's estimate is given back (the app
            derives it from the upstreams' timeouts: see `[budgets] reservation_ttl`). A request that
            settles later is still charged its actual usage.

    Attributes:
        rebuild: called when Redis has no generation marker (it lost its dataset); it should
            `restore` the counters from the ledger. The app sets it; None writes a fresh marker (counters
            start from zero, as with no ledger).

    Example:
        counters = RedisCounters(redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0"))
    """

    in_process = False

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "orq:budget:",
        reservation_ttl: int = 3600,
        hot_path: PipelinedScripts | None = None,
    ) -> None:
        self.client = client
        self._wires: dict[str, _Wire] = {}  # budget id -> its encoded arguments in its current window
        self._res_prefixes: dict[str, bytes] = {}  # workspace -> its reservation key prefix, encoded
        self._reserve_tails: dict[str, bytes] = {}  # workspace -> reserve's arguments 2-4, encoded
        self._reserve_heads: dict[int, bytes] = {}  # budgets -> reserve's numkeys and marker, encoded
        self.prefix = prefix
        self.reservation_ttl = reservation_ttl
        self.rebuild: Callable[[], Awaitable[object]] | None = None
        self._rebuilding: asyncio.Task[None] | None = None
        self._reset = client.register_script(_RESET)
        self._restore = client.register_script(_RESTORE)
        # reserve / settle / release (two per request) on one pipelined connection when given (_resp.py),
        # else the same commands on redis-py's pool
        self._hot_path = hot_path
        self._scripts: PipelinedScripts | PooledScripts = (
            hot_path if hot_path is not None else PooledScripts(client.connection_pool)
        )
        # (period, zone) -> (start ts, end ts, sig, start text, start, end) of the last window computed
        self._windows: dict[
            tuple[Period, str | None], tuple[float, float, str, str, datetime, datetime | None]
        ] = {}

    @property
    def prefix(self) -> str:
        """The key prefix."""
        return self._prefix

    @prefix.setter
    def prefix(self, value: str) -> None:
        self._prefix = value
        self.generation_key = value + "generation"
        self._generation_bulk = bulk(self.generation_key.encode())
        self._wires.clear()  # (encoded keys carry the prefix)
        self._res_prefixes.clear()
        self._reserve_tails.clear()
        self._reserve_heads.clear()

    @property
    def reservation_ttl(self) -> int:
        """Seconds after which an unsettled reservation's estimate is given back."""
        return self._reservation_ttl

    @reservation_ttl.setter
    def reservation_ttl(self, value: int) -> None:
        if value < 1:
            raise ValueError("reservation_ttl must be >= 1 second")
        self._reservation_ttl = value
        self._ttls_bulks = bulks(value, value + _LATE_SETTLE_SECONDS)
        self._reserve_tails.clear()

    # -- keys and windows --------------------------------------------------------------------------------
    def _base(self, budget: Budget) -> str:
        return f"{self.prefix}{{{budget.workspace}}}:{budget.budget_id}"

    def _reservation_key(self, workspace: str, reservation_id: str) -> str:
        return f"{self.prefix}{{{workspace}}}:res:{reservation_id}"

    def _window(self, budget: Budget, now: datetime) -> tuple[str, str, str, datetime, datetime | None]:
        """(sig, start, expire_in, start, end) of the budget's current window.

        Every request computes this for each budget twice (reserve, settle); the calendar arithmetic is
        done once per (period, zone) and window, and reused while `now` stays inside it."""
        period = budget.effective_period
        zone_name = budget.time_zone
        now_ts = now.timestamp()
        cached = self._windows.get((period, zone_name))
        if cached is None or not cached[0] <= now_ts < cached[1]:
            start, end = window(period, now, zone_name)
            end_ts = end.timestamp() if end is not None else math.inf
            sig = f"{period.value}|{zone_name or ''}"
            cached = (start.timestamp(), end_ts, sig, str(int(start.timestamp())), start, end)
            if len(self._windows) > 1024:  # (zones are few; bounded all the same)
                self._windows.clear()
            self._windows[(period, zone_name)] = cached
        _, end_ts, sig, start_text, start, end = cached
        # Relative to the proxy's clock (not Redis's): a day after the window ends.
        expire_in = str(max(1, int(end_ts - now_ts) + 86_400)) if end is not None else ""
        return sig, start_text, expire_in, start, end

    def _wire(self, budget: Budget, now: datetime, now_ts: float) -> _Wire:
        """The budget's part of the hot-path commands in the window of `now`, encoded once per budget
        record and window: a changed budget is a new (immutable) record, so it is encoded again."""
        wire = self._wires.get(budget.budget_id)
        if (
            wire is not None
            and wire.start_ts <= now_ts < wire.end_ts
            and (wire.budget is budget or wire.budget == budget)
        ):
            return wire
        sig, start_text, _expire_in, start, end = self._window(budget, now)
        end_text = "" if end is None else repr(end.timestamp())
        amount = -1 if budget.amount_nanos is None else budget.amount_nanos
        alerts = [a for a in budget.alerts if a.dimension == ALERT_DIMENSION_COST]
        wire = _Wire(
            budget=budget,
            start_ts=start.timestamp(),
            end_ts=math.inf if end is None else end.timestamp(),
            start=start,
            end=end,
            period_start=float(start_text),
            key=bulk((self._base(budget) + ":h").encode()),
            reserve=bulks(
                sig,
                start_text,
                end_text,
                amount,
                -1 if budget.token_limit is None else budget.token_limit,
                -1 if budget.requests_per_minute is None else budget.requests_per_minute,
            ),
            settle=bulks(
                sig,
                start_text,
                end_text,
                amount,
                len(alerts),
                *(part for a in alerts for part in (a.id, a.threshold_percent)),
            ),
            settle_count=5 + 2 * len(alerts),
        )
        if len(self._wires) >= _MAX_WIRES:  # (bounded: deleted budgets' entries go too)
            self._wires.clear()
        self._wires[budget.budget_id] = wire
        return wire

    def _res_prefix(self, workspace: str) -> bytes:
        """The reservation keys' prefix for `workspace`, as a bulk string."""
        encoded = self._res_prefixes.get(workspace)
        if encoded is None:
            if len(self._res_prefixes) >= _MAX_WIRES:
                self._res_prefixes.clear()
            encoded = self._res_prefixes[workspace] = bulk(self._reservation_key(workspace, "").encode())
        return encoded

    def _reserve_head(self, n: int) -> bytes:
        """Reserve's numkeys and generation marker for `n` budgets, encoded."""
        head = self._reserve_heads.get(n)
        if head is None:
            head = bulk(b"%d" % (n + 1)) + self._generation_bulk
            if n <= 64:  # (keep the common sizes only)
                self._reserve_heads[n] = head
        return head

    def _reserve_tail(self, workspace: str) -> bytes:
        """Reserve's arguments after the request's own (the TTLs, the reservation key prefix), encoded."""
        tail = self._reserve_tails.get(workspace)
        if tail is None:
            if len(self._reserve_tails) >= _MAX_WIRES:
                self._reserve_tails.clear()
            tail = self._reserve_tails[workspace] = self._ttls_bulks + self._res_prefix(workspace)
        return tail

    # -- a lost dataset -----------------------------------------------------------------------------------
    @_unavailable_on_error
    async def generation(self) -> str | None:
        """The generation marker (None: Redis lost its dataset, or the counters were never built)."""
        value = await self.client.get(self.generation_key)
        return value.decode() if isinstance(value, bytes) else value

    @_unavailable_on_error
    async def restore(self, consumed: Sequence[tuple[Budget, BudgetConsumption]], now: datetime) -> bool:
        """Set each budget's current window from the ledger and write a new generation marker, in one
        script, only if the marker is still missing; True if this call restored, False if the marker was
        already there (another replica restored first, or the dataset was never lost).

        Reservations in flight are dropped (Redis lost them); alerts whose threshold the restored spend
        reached count as fired, so they are not sent again.
        """
        keys = [self.generation_key]
        args: list[Any] = [str(ULID()), len(consumed)]
        floor = now.timestamp() - RATE_WINDOW_SECONDS
        for budget, usage in consumed:
            base = self._base(budget)
            keys += [base + ":h", base + ":rq", base + ":rs", base + ":f"]
            sig, start, expire_in, _s, _e = self._window(budget, now)
            times = [repr(t) for t in usage.request_times if t > floor]
            fired = [
                a.id
                for a in budget.alerts
                if a.dimension == ALERT_DIMENSION_COST
                and budget.amount_nanos
                and usage.cost_nanos * 100 >= a.threshold_percent * budget.amount_nanos
            ]
            args += [sig, start, expire_in, usage.cost_nanos, usage.tokens, len(times), *times]
            args += [len(fired), *fired]
        return _num(await self._restore(keys=keys, args=args)) == 1

    async def _rebuilt(self) -> None:
        """Have the counters rebuilt (one rebuild per replica at a time; callers share it), waiting at most
        `REBUILD_WAIT_SECONDS`; `ServiceUnavailable` when it fails or takes longer."""
        task = self._rebuilding
        if task is None or task.done():
            task = self._rebuilding = asyncio.create_task(self._run_rebuild())
        try:
            await asyncio.wait_for(asyncio.shield(task), REBUILD_WAIT_SECONDS)
        except ServiceUnavailable:
            raise
        except Exception as exc:  # (TimeoutError included: the rebuild goes on for the next caller)
            raise ServiceUnavailable("budget counters (Redis)", exc) from exc

    async def _run_rebuild(self) -> None:
        if self.rebuild is None:
            await self.restore([], datetime.now(UTC))  # nothing to rebuild from: start at zero
        else:
            await self.rebuild()

    # -- protocol ----------------------------------------------------------------------------------------
    async def reserve(
        self, workspace: str, budgets: Sequence[Budget], cost_nanos: int, tokens: int, now: datetime
    ) -> Reservation | Rejection:
        now_ts = now.timestamp()
        wires = [self._wire(budget, now, now_ts) for budget in budgets]
        reservation_id = new_request_id()  # a ULID without python-ulid's urandom syscall (orq_proxy/ids.py)
        n = len(wires)
        request = f"{now_ts!r}|{reservation_id}|{cost_nanos}|{tokens}".encode()
        # numkeys, the marker and n hash keys, 4 arguments, 6 per budget (see _RESERVE)
        if n == 1:  # (most requests: one format instead of a list and a join)
            w = wires[0]
            body = b"%b%b$%d\r\n%b\r\n%b%b" % (
                self._reserve_head(1),
                w.key,
                len(request),
                request,
                self._reserve_tail(workspace),
                w.reserve,
            )
        else:
            body = b"".join(
                [
                    self._reserve_head(n),
                    *[w.key for w in wires],
                    b"$%d\r\n%b\r\n" % (len(request), request),
                    self._reserve_tail(workspace),
                    *[w.reserve for w in wires],
                ]
            )
        count = 6 + 7 * n
        try:
            reply = await self._scripts.run(_RESERVE_SCRIPT, count, body)
            if reply[0] == 2:  # Redis lost its dataset: rebuild the counters, then try once more
                await self._rebuilt()
                reply = await self._scripts.run(_RESERVE_SCRIPT, count, body)
                if reply[0] == 2:
                    raise ServiceUnavailable(
                        "budget counters (Redis)", RuntimeError("the counters are being rebuilt")
                    )
        except _UNAVAILABLE_ERRORS as exc:
            raise ServiceUnavailable("budget counters (Redis)", exc) from exc
        if reply[0] == 1:
            parts = tuple([ReservedBudget(b, w.period_start) for b, w in zip(budgets, wires, strict=True)])
            return Reservation(reservation_id, workspace, parts, cost_nanos, tokens)
        index = _num(reply[1]) - 1
        budget = budgets[index]
        dimension = cast(Dimension, reply[2].decode() if isinstance(reply[2], bytes) else reply[2])
        limit, used, requested = _num(reply[3]), _num(reply[4]), _num(reply[5])
        if dimension == "requests":
            oldest = float(reply[6])
            resets: datetime | None = now + timedelta(seconds=oldest + RATE_WINDOW_SECONDS - now_ts)
        else:
            resets = frees_at(budget, wires[index].end)
        return Rejection(budget, dimension, limit, used, requested, resets)

    async def settle(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> list[AlertCrossing]:
        if reservation.done:
            return []
        reservation.done = True
        count, body, wires = self._settle_command(reservation, actual_cost_nanos, actual_tokens, now)
        try:
            reply = await self._scripts.run(_SETTLE_SCRIPT, count, body)
        except _UNAVAILABLE_ERRORS as exc:
            raise ServiceUnavailable("budget counters (Redis)", exc) from exc
        return self._crossings(reply, reservation, wires, now)

    def settle_nowait(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> asyncio.Future[list[AlertCrossing]] | None:
        """`settle`, its command written now and its reply handled by a callback, so that the caller needs
        neither a task nor an `await` (the budget gate's hot path). None, with nothing done, when the
        pipelined connection is not open (or redis-py carries the scripts): then `await settle(...)`.

        Once this returns a future the settlement is under way whatever happens to the caller (the command is
        in the connection's send buffer): a cancelled request cannot lose it. The future fails with
        `ServiceUnavailable` when Redis cannot answer."""
        if reservation.done:
            return None
        scripts = self._scripts
        if scripts.__class__ is not PipelinedScripts:
            return None
        count, body, wires = self._settle_command(reservation, actual_cost_nanos, actual_tokens, now)
        sent = scripts.submit(_SETTLE_SCRIPT, count, body)
        if sent is None:
            return None
        reservation.done = True
        out: asyncio.Future[list[AlertCrossing]] = sent.get_loop().create_future()

        def replied(future: asyncio.Future[Any]) -> None:
            if out.done():
                return
            exc = future.exception()
            if exc is not None:
                unavailable = isinstance(exc, _UNAVAILABLE_ERRORS)
                out.set_exception(ServiceUnavailable("budget counters (Redis)", exc) if unavailable else exc)
                return
            try:
                out.set_result(self._crossings(future.result(), reservation, wires, now))
            except Exception as problem:  # a reply this code cannot read: the caller logs it
                out.set_exception(problem)

        sent.add_done_callback(replied)
        return out

    def _settle_command(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> tuple[int, bytes, list[_Wire]]:
        """The `_SETTLE` call for a reservation: (bulk string count, body, each budget's wire)."""
        now_ts = now.timestamp()
        parts = reservation.parts
        wires = [self._wire(part.budget, now, now_ts) for part in parts]
        n = len(wires)
        request = (
            f"{now_ts!r}|{reservation.reservation_id}|{reservation.cost_nanos}|{reservation.tokens}"
            f"|{actual_cost_nanos}|{actual_tokens}"
        ).encode()
        # numkeys, n hash keys, 2 arguments, n reserved starts, then each budget's own (see _SETTLE)
        if n == 1:  # (most requests: one format instead of a list and a join)
            w, p = wires[0], parts[0]
            count = 5 + w.settle_count
            body = b"$1\r\n1\r\n%b$%d\r\n%b\r\n%b%b%b" % (
                w.key,
                len(request),
                request,
                self._res_prefix(reservation.workspace),
                _SAME_START if p.period_start == w.period_start else bulks(str(int(p.period_start))),
                w.settle,
            )
        else:
            count = 3 + 2 * n
            for wire in wires:
                count += wire.settle_count
            body = b"".join(
                [
                    bulk(b"%d" % n),
                    *[w.key for w in wires],
                    b"$%d\r\n%b\r\n" % (len(request), request),
                    self._res_prefix(reservation.workspace),
                    *[
                        _SAME_START if p.period_start == w.period_start else bulks(str(int(p.period_start)))
                        for p, w in zip(parts, wires, strict=True)
                    ],
                    *[w.settle for w in wires],
                ]
            )
        return count, body, wires

    def _crossings(
        self, reply: Any, reservation: Reservation, wires: list[_Wire], now: datetime
    ) -> list[AlertCrossing]:
        """The alert crossings a `_SETTLE` reply reports."""
        if not reply:
            return []
        parts = reservation.parts
        crossings = []
        for i in range(0, len(reply), 3):
            index = _num(reply[i]) - 1
            alert_id = reply[i + 1].decode() if isinstance(reply[i + 1], bytes) else reply[i + 1]
            budget = parts[index].budget
            alert = next(a for a in budget.alerts if a.id == alert_id)
            wire = wires[index]
            assert budget.amount_nanos is not None
            crossings.append(
                AlertCrossing(
                    budget, alert, _num(reply[i + 2]), budget.amount_nanos, wire.start, wire.end, now
                )
            )
        return crossings

    @_unavailable_on_error
    async def release(self, reservation: Reservation, now: datetime) -> None:
        if reservation.done:
            return
        reservation.done = True
        keys = [self._reservation_key(reservation.workspace, reservation.reservation_id)]
        args: list[Any] = [
            reservation.reservation_id,
            reservation.cost_nanos,
            reservation.tokens,
            len(reservation.parts),
        ]
        for part in reservation.parts:
            base = self._base(part.budget)
            keys += [base + ":h", base + ":rs"]
            args.append(str(int(part.period_start)))
        await self._scripts.run(_RELEASE_SCRIPT, 1 + len(keys) + len(args), bulks(len(keys), *keys, *args))

    async def usage(self, budget: Budget, now: datetime) -> Usage:
        return (await self.usage_many([budget], now))[0]

    async def usage_many(self, budgets: Sequence[Budget], now: datetime) -> list[Usage]:
        if not budgets:
            return []
        replies = await self._read_usage(budgets, now)
        if not replies[0]:  # Redis lost its dataset: show the rebuilt counters, not zeros
            await self._rebuilt()
            replies = await self._read_usage(budgets, now)
        out = []
        for i, budget in enumerate(budgets):
            sig, start, spent, tokens = (
                v.decode() if isinstance(v, bytes) else v for v in replies[2 * i + 1]
            )
            requests = int(replies[2 * i + 2])
            want_sig, want_start, *_ = self._window(budget, now)
            if sig != want_sig or start is None or int(start) < int(want_start):
                out.append(Usage(0, 0, requests))  # the stored window is over (or the period changed)
            else:
                out.append(Usage(_num(spent), _num(tokens), requests))
        return out

    @_unavailable_on_error
    async def _read_usage(self, budgets: Sequence[Budget], now: datetime) -> list[Any]:
        """One pipeline: whether the generation marker exists, then per budget its hash fields and
        requests in the rate window."""
        floor = now.timestamp() - RATE_WINDOW_SECONDS
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.generation_key)
            for budget in budgets:
                base = self._base(budget)
                pipe.hmget(base + ":h", ["sig", "start", "sn", "st"])
                pipe.zcount(base + ":rq", f"({floor!r}", "+inf")
            return await pipe.execute()

    @_unavailable_on_error
    async def reset(self, budget: Budget, now: datetime) -> None:
        base = self._base(budget)
        sig, start, expire_in, _s, _e = self._window(budget, now)
        keys = [base + ":h", base + ":rq", base + ":rs", base + ":f"]
        await self._reset(keys=keys, args=[sig, start, expire_in, repr(now.timestamp())])

    @_unavailable_on_error
    async def forget(self, budget_id: str) -> None:
        self._wires.pop(budget_id, None)
        # The workspace is not known here: find the budget's keys by pattern (rare: deletes only).
        pattern = f"{self.prefix}{{*}}:{budget_id}:*"
        keys = [key async for key in self.client.scan_iter(match=pattern, count=1000)]
        if keys:
            await self.client.delete(*keys)

    @_unavailable_on_error
    async def reserved(self, budget: Budget) -> tuple[int, int]:
        """`(nano-USD, tokens)` reserved against a budget by requests in flight."""
        values = await self.client.hmget(self._base(budget) + ":h", ["rn", "rt"])
        return _num(values[0] or 0), _num(values[1] or 0)

    @_unavailable_on_error
    async def ping(self) -> None:
        """Raise `ServiceUnavailable` unless Redis answers (`/readyz`)."""
        await self.client.ping()

    async def aclose(self) -> None:
        """Close the Redis client (lifespan shutdown)."""
        task = self._rebuilding
        if task is not None and not task.done():
            task.cancel()
        if self._hot_path is not None:
            await self._hot_path.aclose()
        await self.client.aclose()


def redis_counters_from_url(
    url: str,
    *,
    prefix: str = "orq:budget:",
    max_connections: int = 64,
    socket_timeout: float = 2.0,
    connect_timeout: float = 2.0,
    reservation_ttl: int = 3600,
) -> RedisCounters:
    """`RedisCounters` for a `redis://` / `rediss://` URL; says how to install the extra if redis is missing.

    Every command gives up after `socket_timeout` (connecting after `connect_timeout`) and is not retried
    on a timeout (redis-py 6+ retries them by default, 5.x waits forever), so a stalled Redis fails a request
    closed within those seconds; a closed connection is retried once, on a new one. The pool blocks when all `max_connections` are busy, for at most the two timeouts
    together. Options in the URL's query (`?socket_timeout=5`) win over these arguments.
    """
    try:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError as exc:  # pragma: no cover - redis is installed in development
        raise ValueError(
            f"[storage] counters {url!r} needs the redis client: pip install 'orq-proxy[redis]'"
        ) from exc
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout + connect_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry_on_timeout=False,
        # Once, on a closed connection only (a pooled one that a Redis restart cut): never on a timeout.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    from redis.asyncio.connection import SSLConnection

    hot_path = pipelined_scripts(pool.connection_kwargs, tls=issubclass(pool.connection_class, SSLConnection))
    return RedisCounters(
        Redis(connection_pool=pool), prefix=prefix, reservation_ttl=reservation_ttl, hot_path=hot_path
    )

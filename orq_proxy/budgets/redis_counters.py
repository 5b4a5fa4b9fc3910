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
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

from ulid import ULID

from orq_proxy.budgets._resp import PipelinedScripts, pipelined_scripts
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
    from redis.commands.core import AsyncScript

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

# KEYS: per budget h, rq, rs, f; then the reservation key, the generation marker.
# ARGV: now, cost, tokens, id, ttl, n, reservation key expiry, then per budget: sig, start, expire_in, amount,
# token_limit, rpm (-1 = none). Replies {1} admitted, {2} the marker is missing, {0, ...} refused.
_RESERVE = (
    _COMMON
    + """
local now, cost, tokens, rid, ttl, n = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[4*n+2]) == 0 then return {2} end
local nnow = tonumber(now)
for i = 1, n do
  local h, rq, rs, f = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  local b = 7 + (i-1) * 6
  roll(h, f, ARGV[b+1], ARGV[b+2], ARGV[b+3])
  sweep(h, rs, nnow)
  redis.call('ZREMRANGEBYSCORE', rq, '-inf', nnow - 60)
  local rpm = tonumber(ARGV[b+6])
  if rpm >= 0 then
    local count = redis.call('ZCARD', rq)
    if count >= rpm then
      local oldest = redis.call('ZRANGE', rq, count - rpm, count - rpm, 'WITHSCORES')
      return {0, i, 'requests', ARGV[b+6], tostring(count), '1', oldest[2] or now}
    end
  end
  local v = redis.call('HMGET', h, 'sn', 'rn', 'st', 'rt')
  local amount = tonumber(ARGV[b+4])
  if amount >= 0 then
    local used = tonumber(v[1]) + tonumber(v[2])
    if used >= amount or used + tonumber(cost) > amount then
      return {0, i, 'cost', ARGV[b+4], string.format('%.0f', used), cost, ''}
    end
  end
  local tlimit = tonumber(ARGV[b+5])
  if tlimit >= 0 then
    local used = tonumber(v[3]) + tonumber(v[4])
    if used >= tlimit or used + tonumber(tokens) > tlimit then
      return {0, i, 'tokens', ARGV[b+5], string.format('%.0f', used), tokens, ''}
    end
  end
end
for i = 1, n do
  local h, rq, rs = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1]
  local b = 7 + (i-1) * 6
  redis.call('HINCRBY', h, 'rn', cost)
  redis.call('HINCRBY', h, 'rt', tokens)
  redis.call('ZADD', rq, now, rid)
  redis.call('EXPIRE', rq, 120)
  redis.call('ZADD', rs, nnow + ttl, rid .. '|' .. cost .. '|' .. tokens .. '|' .. ARGV[b+2])
  redis.call('EXPIRE', rs, ttl + 60)
end
redis.call('SET', KEYS[4*n+1], '1', 'EX', ARGV[7])
return {1}
"""
)

# KEYS: the reservation key, then per budget h, rs, f.
# ARGV: now, actual cost, actual tokens, id, cost, tokens, n, then per budget: sig, start now, expire_in,
# reserved start, amount (-1 = none), alert count k, then k pairs (alert id, threshold percent).
_SETTLE = (
    _COMMON
    + """
if redis.call('DEL', KEYS[1]) == 0 then return {} end
local nnow, acost, atokens, rid, cost, tokens, n =
  tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local out = {}
local a = 8
for i = 1, n do
  local h, rs, f = KEYS[3*i-1], KEYS[3*i], KEYS[3*i+1]
  local sig, start, expire_in, rstart, amount, k =
    ARGV[a], ARGV[a+1], ARGV[a+2], ARGV[a+3], tonumber(ARGV[a+4]), tonumber(ARGV[a+5])
  if redis.call('EXISTS', h) == 1 then
    roll(h, f, sig, start, expire_in)
    local member = rid .. '|' .. cost .. '|' .. tokens .. '|' .. rstart
    if redis.call('ZREM', rs, member) == 1 then give_back(h, member) end
    local spent = redis.call('HINCRBY', h, 'sn', acost)
    redis.call('HINCRBY', h, 'st', atokens)
    if amount > 0 then
      for j = 1, k do
        local id, threshold = ARGV[a+4+2*j], tonumber(ARGV[a+5+2*j])
        if spent * 100 >= threshold * amount and redis.call('SADD', f, id) == 1 then
          table.insert(out, i); table.insert(out, id); table.insert(out, tostring(spent))
        end
      end
    end
  end
  a = a + 6 + 2 * k
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
        if reservation_ttl < 1:
            raise ValueError("reservation_ttl must be >= 1 second")
        self.client = client
        self.prefix = prefix
        self.reservation_ttl = reservation_ttl
        self.generation_key = prefix + "generation"
        self.rebuild: Callable[[], Awaitable[object]] | None = None
        self._rebuilding: asyncio.Task[None] | None = None
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._release = client.register_script(_RELEASE)
        self._reset = client.register_script(_RESET)
        self._restore = client.register_script(_RESTORE)
        # reserve / settle / release (two per request) on one pipelined connection when given (_resp.py)
        self._hot_path = hot_path
        # (period, zone) -> (start ts, end ts, sig, start text, start, end) of the last window computed
        self._windows: dict[
            tuple[Period, str | None], tuple[float, float, str, str, datetime, datetime | None]
        ] = {}

    async def _hot(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self._hot_path is not None:
            return await self._hot_path.evalsha(script.sha, script.script, keys, args)
        return await script(keys=keys, args=args)

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
        result = await self._try_reserve(workspace, budgets, cost_nanos, tokens, now)
        if result is None:  # Redis lost its dataset: rebuild the counters, then try once more
            await self._rebuilt()
            result = await self._try_reserve(workspace, budgets, cost_nanos, tokens, now)
            if result is None:
                raise ServiceUnavailable(
                    "budget counters (Redis)", RuntimeError("the counters are being rebuilt")
                )
        return result

    @_unavailable_on_error
    async def _try_reserve(
        self, workspace: str, budgets: Sequence[Budget], cost_nanos: int, tokens: int, now: datetime
    ) -> Reservation | Rejection | None:
        reservation_id = new_request_id()  # a ULID without python-ulid's urandom syscall (orq_proxy/ids.py)
        keys: list[str] = []
        args: list[Any] = [repr(now.timestamp()), cost_nanos, tokens, reservation_id, self.reservation_ttl]
        args += [len(budgets), self.reservation_ttl + _LATE_SETTLE_SECONDS]
        windows = []
        for budget in budgets:
            base = self._base(budget)
            keys += [base + ":h", base + ":rq", base + ":rs", base + ":f"]
            sig, start, expire_in, _start, end_dt = self._window(budget, now)
            windows.append((start, end_dt))
            args += [
                sig,
                start,
                expire_in,
                -1 if budget.amount_nanos is None else budget.amount_nanos,
                -1 if budget.token_limit is None else budget.token_limit,
                -1 if budget.requests_per_minute is None else budget.requests_per_minute,
            ]
        keys += [self._reservation_key(workspace, reservation_id), self.generation_key]
        reply = cast(list[Any], await self._hot(self._reserve, keys, args))
        if _num(reply[0]) == 2:
            return None
        if _num(reply[0]) == 1:
            parts = tuple(ReservedBudget(b, float(w[0])) for b, w in zip(budgets, windows, strict=True))
            return Reservation(reservation_id, workspace, parts, cost_nanos, tokens)
        index = _num(reply[1]) - 1
        budget = budgets[index]
        dimension = cast(Dimension, reply[2].decode() if isinstance(reply[2], bytes) else reply[2])
        limit, used, requested = _num(reply[3]), _num(reply[4]), _num(reply[5])
        if dimension == "requests":
            oldest = float(reply[6])
            resets: datetime | None = now + timedelta(seconds=oldest + RATE_WINDOW_SECONDS - now.timestamp())
        else:
            resets = frees_at(budget, windows[index][1])
        return Rejection(budget, dimension, limit, used, requested, resets)

    @_unavailable_on_error
    async def settle(
        self, reservation: Reservation, actual_cost_nanos: int, actual_tokens: int, now: datetime
    ) -> list[AlertCrossing]:
        if reservation.done:
            return []
        reservation.done = True
        keys = [self._reservation_key(reservation.workspace, reservation.reservation_id)]
        args: list[Any] = [
            repr(now.timestamp()),
            actual_cost_nanos,
            actual_tokens,
            reservation.reservation_id,
            reservation.cost_nanos,
            reservation.tokens,
            len(reservation.parts),
        ]
        windows = []
        for part in reservation.parts:
            budget = part.budget
            base = self._base(budget)
            keys += [base + ":h", base + ":rs", base + ":f"]
            sig, start, expire_in, start_dt, end_dt = self._window(budget, now)
            windows.append((start_dt, end_dt))
            alerts = [a for a in budget.alerts if a.dimension == ALERT_DIMENSION_COST]
            args += [
                sig,
                start,
                expire_in,
                str(int(part.period_start)),
                -1 if budget.amount_nanos is None else budget.amount_nanos,
                len(alerts),
            ]
            for alert in alerts:
                args += [alert.id, alert.threshold_percent]
        reply = cast(list[Any], await self._hot(self._settle, keys, args))
        crossings = []
        for i in range(0, len(reply), 3):
            index = _num(reply[i]) - 1
            alert_id = reply[i + 1].decode() if isinstance(reply[i + 1], bytes) else reply[i + 1]
            budget = reservation.parts[index].budget
            alert = next(a for a in budget.alerts if a.id == alert_id)
            start_dt, end_dt = windows[index]
            assert budget.amount_nanos is not None
            crossings.append(
                AlertCrossing(budget, alert, _num(reply[i + 2]), budget.amount_nanos, start_dt, end_dt, now)
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
        await self._hot(self._release, keys, args)

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

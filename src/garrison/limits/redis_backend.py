"""Limits kept in Redis, so that every worker and every gateway machine shares one count.

One `admit` is one round trip: a Lua script that runs GCRA for each rate, checks the
concurrency slots and the token budget, and consumes only when all of them pass. The script
reads the clock with `redis.call('TIME')`: gateway machines whose clocks disagree still agree
on one limit. Times inside Redis are whole microseconds (exact in a Lua double up to 2^53).

Concurrency slots are members of a sorted set scored by their lease's expiry. This process
refreshes the leases it holds (a heartbeat every lease/3 seconds), so a slot of a process that
crashed frees itself after `lease` seconds instead of being lost forever.

When Redis cannot be reached, `admit` fails as configured (closed: refuse, open: allow), every
failed call is counted in `garrison_limits_backend_errors_total`, and the log says so at most
once per 10 seconds (a dead Redis under load must not flood the log). redis-py reconnects on
the next call, and a script cache emptied by a Redis restart is refilled (NOSCRIPT -> EVAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from garrison.limits.model import Budget, Decision, Rate, RateInfo
from garrison.limits.resp import FastRedis, RespError, bulk
from garrison.observe import metrics

log = logging.getLogger("garrison.limits")

backend_errors = Counter(
    "garrison_limits_backend_errors",
    "Calls to the limits backend (Redis) that failed, by operation.",
    ["op"],
    registry=metrics.REGISTRY,
)

_US = 1_000_000
LOG_INTERVAL = 10.0  # seconds between two log lines about the same outage
_CACHE_MAX = 4096  # precomputed argument lists kept (one per route x identity in use)
_HEARTBEAT_BATCH = 500  # leases refreshed per script call (bounds one call's size)

# KEYS: one tat per rate, then the slots zset (if concurrency), then the tokens key (if budget).
# ARGV: lease id, number of rates, concurrency (-1: none), budget (-1: none), lease (us),
#       then per rate: emission interval T (us), tolerance (us) = period - T.
# Returns {allowed, hit (0 none, i rate i, -1 concurrency, -2 tokens), retry (us), d_1..d_n}
# where d_i = tat_i - now before this request (us, >= 0): the caller derives remaining/reset.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nr = tonumber(ARGV[2])
local conc = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local out = {1, 0, 0}
local tats = {}
local hit, wait = 0, -1
for i = 1, nr do
  local T = tonumber(ARGV[4 + 2 * i])
  local tol = tonumber(ARGV[5 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local d = tat - now
  out[3 + i] = d
  if d > tol then
    if d - tol > wait then hit, wait = i, d - tol end
  else
    tats[i] = tat + T
  end
end
local k = nr
if conc >= 0 then
  k = k + 1
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', string.format('%.0f', now))
  if redis.call('ZCARD', KEYS[k]) >= conc and 1000000 > wait then
    hit, wait = -1, 1000000
  end
end
if budget >= 0 then
  local tk = KEYS[k + 1]
  local used = tonumber(redis.call('GET', tk)) or 0
  if used >= budget then
    local ms = redis.call('PTTL', tk)
    if ms < 0 then ms = 1000 end
    if ms * 1000 > wait then hit, wait = -2, ms * 1000 end
  end
end
if hit ~= 0 then
  out[1], out[2], out[3] = 0, hit, wait
  return out
end
for i = 1, nr do
  local ms = math.floor((tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', ms)
end
if conc >= 0 then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[nr + 1], string.format('%.0f', now + lease), ARGV[1])
  redis.call('PEXPIRE', KEYS[nr + 1], math.floor(lease / 1000) + 1)
end
return out
"""

# KEYS: slot zsets; ARGV: lease (us), then the lease id for each key. XX: a lease released or
# expired meanwhile is not brought back.
_HEARTBEAT = """
local t = redis.call('TIME')
local lease = tonumber(ARGV[1])
local exp = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]) + lease)
local ms = math.floor(lease / 1000) + 1
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', exp, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], ms)
end
return #KEYS
"""

# KEYS: the tokens key; ARGV: tokens, window (ms). The window starts at the first spend: the
# TTL is set only while the key has none.
_SPEND = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _rate_key(rate: Rate) -> str:
    """`<limit>/<period in seconds>`: the rate itself, so one route's two rates never share."""
    return f"{rate.limit}/{rate.period:g}"


@dataclass(frozen=True, slots=True)
class _Plan:
    """The admit script call for one route x identity, mostly encoded ahead."""

    rates: tuple[Rate, ...]
    concurrency: int | None
    budget: Budget | None
    keys: list[str]
    head: bytes  # RESP: EVALSHA sha numkeys KEYS..., before ARGV[1] (the lease id)
    tail: bytes  # RESP: the ARGV after the lease id
    args: list[Any]  # numkeys, KEYS, None (the lease id's place), ARGV: for EVAL after NOSCRIPT


RELEASE_BATCH = 0.002  # seconds a released slot may wait to be batched with others


class RedisBackend:
    """Rate limits, concurrency slots and token budgets shared through one Redis."""

    # After a connection failure, calls fail at once for this long instead of each waiting for
    # a connect timeout: a black-holed Redis must not add 0.5 s to every request.
    DOWN_RETRY = 0.25
    MAX_CONNECTIONS = 64

    def __init__(
        self,
        url: str,
        *,
        on_error: str = "closed",
        lease: float = 30.0,
        prefix: str = "garrison:lim:",
    ) -> None:
        if on_error not in ("closed", "open"):
            raise ValueError('on_error must be "closed" or "open"')
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.url = url
        self.on_error = on_error
        self.lease = float(lease)
        self.prefix = prefix
        self._lease_us = str(int(self.lease * _US))
        self._client: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            # One immediate retry: a pooled connection broken by a Redis restart is replaced
            # within the same call; a dead Redis costs two fast refusals, never a backoff.
            retry=Retry(NoBackoff(), 1),
            max_connections=self.MAX_CONNECTIONS,
        )
        # At most MAX_CONNECTIONS commands in flight (so as many connections): under load,
        # requests queue here, FIFO, instead of opening one connection per request.
        self._slots = asyncio.Semaphore(self.MAX_CONNECTIONS)
        self._fast = FastRedis(url, timeout=0.5)
        self._releases: dict[str, list[str]] = {}
        self._release_scheduled = False
        self._admit_sha = _sha(_ADMIT)
        self._heartbeat_sha = _sha(_HEARTBEAT)
        self._spend_sha = _sha(_SPEND)
        self._held: dict[str, str] = {}  # lease id -> slots zset key, refreshed by the heartbeat
        self._lease_ids = itertools.count()
        self._lease_tag = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._plans: dict[str, _Plan] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._down_until = 0.0
        self._last_log = -math.inf
        self._unlogged = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts and start the heartbeat. A Redis that is down now is not fatal:
        admit fails as configured until it comes back, then EVAL reloads the scripts."""
        try:
            for script in (_ADMIT, _HEARTBEAT, _SPEND):
                await self._client.script_load(script)
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("start", exc)
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def close(self) -> None:
        """Stop the heartbeat and disconnect. Leases still held are not released: like a
        crash, they expire after `lease` (releasing is the request's job)."""
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._releases:  # slots given back but not yet sent: send them before leaving
            batches, self._releases = self._releases, {}
            sent = [self._fast.call("ZREM", k, *v) for k, v in batches.items()]
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 1.0)
        self._held.clear()
        await self._fast.close()
        await self._client.aclose()

    # -- the hot path --------------------------------------------------------------------------

    def _plan(
        self,
        key: str,
        rates: tuple[Rate, ...],
        concurrency: int | None,
        budget: Budget | None,
    ) -> _Plan:
        """The admit command for one route x identity, encoded once and reused: per request
        only the lease id is encoded (the limits are the same objects while the route and the
        identity's overrides are; a change builds a new plan)."""
        plan = self._plans.get(key)
        if (
            plan is not None
            and plan.rates is rates
            and plan.budget is budget
            and plan.concurrency == concurrency
        ):
            return plan
        base = self.prefix + key
        keys = [f"{base}|r|{_rate_key(rate)}" for rate in rates]
        args: list[Any] = [
            len(rates),
            -1 if concurrency is None else concurrency,
            -1 if budget is None else budget.limit,
            self._lease_us,
        ]
        for rate in rates:
            period_us = round(rate.period * _US)
            interval = max(1, round(period_us / rate.limit))
            args += [interval, max(0, period_us - interval)]
        if concurrency is not None:
            keys.append(base + "|c")
        if budget is not None:
            keys.append(base + "|t")
        if len(self._plans) >= _CACHE_MAX:
            self._plans.clear()
        head = ["EVALSHA", self._admit_sha, len(keys), *keys]
        plan = self._plans[key] = _Plan(
            rates,
            concurrency,
            budget,
            keys,
            b"*%d\r\n" % (len(head) + 1 + len(args)) + b"".join(bulk(a) for a in head),
            b"".join(bulk(a) for a in args),
            [len(keys), *keys, None, *args],
        )
        return plan

    def admit(
        self,
        key: str,
        rates: tuple[Rate, ...],
        concurrency: int | None,
        budget: Budget | None,
        now: float,
    ) -> asyncio.Future[Decision]:
        """One EVALSHA. `now` is not used: Redis's clock is the one all gateways share.

        Returns a future completed by callbacks, not a coroutine: on the request path that saves
        a Task and three coroutine frames per request (see pipeline/limits.py)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Decision] = loop.create_future()
        plan = self._plan(key, rates, concurrency, budget)
        lease = None if concurrency is None else self._lease_tag + str(next(self._lease_ids))
        if self._down_until and time.monotonic() < self._down_until:
            self._failed("admit", None)
            out.set_result(self._backend_decision())
            return out
        if self._releases:
            self._flush_releases()  # sent first on the same connection: Redis sees them first
        call = self._fast.send(plan.head + bulk(lease or "") + plan.tail)
        call.add_done_callback(partial(self._admitted, out, plan, lease, retried=False))
        return out

    def _admitted(
        self,
        out: asyncio.Future[Decision],
        plan: _Plan,
        lease: str | None,
        call: asyncio.Future[Any],
        retried: bool,
    ) -> None:
        if out.done():
            return
        exc = None if call.cancelled() else call.exception()
        if call.cancelled():
            exc = TimeoutError("cancelled")
        if isinstance(exc, RespError) and str(exc).startswith("NOSCRIPT") and not retried:
            # After a Redis restart the script cache is empty: EVAL also reloads it.
            args = plan.args.copy()
            args[len(plan.keys) + 1] = lease or ""
            again = self._fast.call("EVAL", _ADMIT, *args)
            again.add_done_callback(partial(self._admitted, out, plan, lease, retried=True))
            return
        if exc is not None:
            self._failed("admit", exc)
            out.set_result(self._backend_decision())
            return
        res = call.result()
        self._down_until = 0.0
        allowed, hit, wait = res[0], res[1], res[2]
        rates = plan.rates
        info = self._info(rates, res, allowed == 1)
        if allowed != 1:
            if hit > 0:
                text = f"rate {rates[hit - 1].text}"
            else:
                text = "concurrency" if hit == -1 else "tokens"
            out.set_result(Decision(False, hit=text, retry_after=wait / _US, info=info))
            return
        if lease is not None:
            self._held[lease] = plan.keys[len(rates)]
        out.set_result(Decision(True, info=info, lease=lease))

    @staticmethod
    def _info(rates: tuple[Rate, ...], res: list[int], consumed: bool) -> RateInfo | None:
        """The most restrictive rate after this request: fewest remaining, then longest reset."""
        best: RateInfo | None = None
        for i, rate in enumerate(rates):
            period_us = round(rate.period * _US)
            interval = max(1, round(period_us / rate.limit))
            d = res[3 + i]
            if consumed:
                d += interval
            remaining = max(0, min(rate.limit, (period_us - d) // interval))
            if (
                best is None
                or remaining < best.remaining
                or (remaining == best.remaining and d / _US > best.reset)
            ):
                best = RateInfo(rate.limit, remaining, d / _US)
        return best

    def _backend_decision(self) -> Decision:
        if self.on_error == "open":
            return Decision(True, hit="backend")
        return Decision(False, hit="backend", retry_after=1.0)

    async def _eval(self, sha: str, script: str, numkeys_keys_args: list[Any]) -> Any:
        """EVALSHA; after a Redis restart (empty script cache) EVAL, which also reloads it."""
        try:
            return await self._client.execute_command("EVALSHA", sha, *numkeys_keys_args)
        except NoScriptError:
            return await self._client.execute_command("EVAL", script, *numkeys_keys_args)

    # -- fire-and-forget -----------------------------------------------------------------------

    def release(self, key: str, lease: str) -> None:
        """Give the slot back: forget it here at once (no more heartbeat), ZREM in Redis in a
        task. If that ZREM fails, the slot still frees itself when its lease runs out."""
        zkey = self._held.pop(lease, None)
        if zkey is None or self._closed:
            return
        batch = self._releases.get(zkey)
        if batch is None:
            self._releases[zkey] = [lease]
        else:
            batch.append(lease)
        if not self._release_scheduled:
            try:
                asyncio.get_running_loop().call_later(RELEASE_BATCH, self._flush_releases)
            except RuntimeError:  # no running loop (shutting down): the leases expire
                self._releases.clear()
                return
            self._release_scheduled = True

    def _flush_releases(self) -> None:
        """One ZREM per identity for every slot given back in the last RELEASE_BATCH seconds
        (or before the next admit, which then sees them freed): under load many requests of
        one identity end together, and one command frees all."""
        self._release_scheduled = False  # a pending timer finding nothing to send is harmless
        batches, self._releases = self._releases, {}
        for zkey, leases in batches.items():
            future = self._fast.call("ZREM", zkey, *leases)  # pipelined: no task, no pool
            future.add_done_callback(self._release_done)

    def _release_done(self, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self._failed("release", exc)

    def spend(self, key: str, budget: Budget, tokens: int, now: float) -> None:
        """Add used tokens (the window, budget.period, starts with the first spend)."""
        if tokens <= 0 or self._closed:
            return
        args = [1, self.prefix + key + "|t", int(tokens), max(1, round(budget.period * 1000))]
        self._spawn(self._eval(self._spend_sha, _SPEND, args), "spend")

    def _spawn(self, coro: Coroutine[Any, Any, Any], op: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._guard(coro, op))
        except RuntimeError:  # no running loop (shutting down): nothing to send it with
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Coroutine[Any, Any, Any], op: str) -> None:
        try:
            async with self._slots:
                await coro
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(op, exc)

    async def _heartbeat(self) -> None:
        """Refresh every held lease each lease/3 s, so that a slot outlives `lease` exactly as
        long as this process is alive to hold it."""
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.refresh()

    async def refresh(self) -> None:
        """One heartbeat now (the heartbeat task calls it; tests may too)."""
        held = list(self._held.items())
        for start in range(0, len(held), _HEARTBEAT_BATCH):
            batch = held[start : start + _HEARTBEAT_BATCH]
            args: list[Any] = [len(batch), *(zkey for _, zkey in batch), self._lease_us]
            args += [lease for lease, _ in batch]
            try:
                await self._eval(self._heartbeat_sha, _HEARTBEAT, args)
            except (TimeoutError, RedisError, OSError) as exc:
                self._failed("heartbeat", exc)
                return

    # -- errors --------------------------------------------------------------------------------

    def _failed(self, op: str, exc: BaseException | None) -> None:
        """Count every failure; log one line per LOG_INTERVAL with how many happened."""
        backend_errors.labels(op=op).inc()
        if exc is not None and not isinstance(exc, NoScriptError):
            self._down_until = time.monotonic() + self.DOWN_RETRY
        self._unlogged += 1
        mono = time.monotonic()
        if mono - self._last_log >= LOG_INTERVAL:
            self._last_log = mono
            what = f"{type(exc).__name__}: {exc}" if exc is not None else "still unreachable"
            log.warning(
                "limits backend %s failed (%s); %d failed call(s) since the last report; "
                "failing %s",
                op,
                what,
                self._unlogged,
                self.on_error,
            )
            self._unlogged = 0

    # -- inspection ----------------------------------------------------------------------------

    async def usage(self, prefix: str = "") -> list[dict[str, object]]:
        """Rows like the memory backend's (for `garrison limits show`): per key, each rate in
        use ("used": units of the bucket taken now), slots held, tokens spent in the window."""
        client = self._client
        sec, usec = await client.time()
        now = sec * _US + usec
        names: list[str] = []
        async for raw in client.scan_iter(match=_glob(self.prefix + prefix) + "*", count=1000):
            names.append(raw.decode() if isinstance(raw, bytes) else raw)
        names.sort()
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                if name.endswith("|c"):
                    pipe.zcount(name, f"({now}", "+inf")
                else:
                    pipe.get(name)
                pipe.pttl(name)
            values = await pipe.execute()
        rates: list[dict[str, object]] = []
        slots: list[dict[str, object]] = []
        tokens: list[dict[str, object]] = []
        for i, name in enumerate(names):
            value, pttl = values[2 * i], values[2 * i + 1]
            rest = name[len(self.prefix) :]
            if rest.endswith("|c"):
                if int(value):
                    slots.append({"key": rest[:-2], "kind": "concurrency", "used": int(value)})
            elif rest.endswith("|t"):
                if value is not None:
                    row = {"key": rest[:-2], "kind": "tokens", "used": int(value)}
                    tokens.append(row | {"resets_in": max(0, pttl) / 1000})
            elif (cut := rest.rfind("|r|")) >= 0 and value is not None:
                # `<key>|r|<limit>/<period>`: the key itself may hold "|", the rate cannot.
                limit_text, _, period_text = rest[cut + 3 :].partition("/")
                limit, period = int(limit_text), float(period_text)
                d = int(value) - now
                if d > 0:
                    used = math.ceil(d / (period * _US / limit) - 1e-9)
                    rates.append(
                        {"key": rest[:cut], "kind": "rate", "limit": f"{limit}/{period:g}s"}
                        | {"used": min(limit, used)}
                    )
        return rates + slots + tokens


def _glob(text: str) -> str:
    """Escape glob metacharacters so that a key prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

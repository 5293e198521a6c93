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

from garrison.limits import redis_usage
from garrison.limits.model import Budget, Decision, Rate, RateInfo
from garrison.limits.redis_scripts import ADMIT, HEARTBEAT, SPEND, sha
from garrison.limits.resp import FastRedis, RespError, bulk
from garrison.limits.stock import IDLE_RETURN, STOCK_MAX, Stock
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


def _rate_key(rate: Rate) -> str:
    """`<limit>/<period in seconds>`: the rate itself, so one route's two rates never share."""
    return f"{rate.limit}/{rate.period:g}"


@dataclass(frozen=True, slots=True, eq=False)
class _Plan:
    """The admit script call for one route x identity, mostly encoded ahead, and what this
    process holds ahead for it (stock.py)."""

    rates: tuple[Rate, ...]
    concurrency: int | None
    budget: Budget | None
    keys: list[str]
    head: bytes  # RESP: EVALSHA sha numkeys KEYS..., before ARGV[1] (the lease id)
    mid: bytes  # RESP: ARGV[2..5], before ARGV[6..8] (permits and slots wanted)
    tail: bytes  # RESP: the per-rate ARGV
    args: list[Any]  # numkeys, KEYS, None (lease id), ARGV[2..5], 3 x None, per-rate ARGV
    slowest_step: float | None  # the longest emission interval of the rates (s), None: none
    stock: Stock


_N = [bulk(n) for n in range(STOCK_MAX + 2)]  # small counts in ARGV, encoded once


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
        self._admit_sha = sha(ADMIT)
        self._heartbeat_sha = sha(HEARTBEAT)
        self._spend_sha = sha(SPEND)
        self._sweep_scheduled = False
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
            for script in (ADMIT, HEARTBEAT, SPEND):
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
        for plan in self._plans.values():
            self._return_stock(plan)
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
        if plan is not None:
            self._return_stock(plan)  # other limits now: what was held for the old ones goes
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
            for old in self._plans.values():
                self._return_stock(old)
            self._plans.clear()
        head = ["EVALSHA", self._admit_sha, len(keys), *keys]
        mid, per_rate = args[:4], args[4:]
        plan = self._plans[key] = _Plan(
            rates,
            concurrency,
            budget,
            keys,
            b"*%d\r\n" % (len(head) + 4 + len(args)) + b"".join(bulk(a) for a in head),
            b"".join(bulk(a) for a in mid),
            b"".join(bulk(a) for a in per_rate),
            [len(keys), *keys, None, *mid, None, None, None, *per_rate],
            max((rate.period / rate.limit for rate in rates), default=None),
            Stock(),
        )
        return plan

    def admit(
        self,
        key: str,
        rates: tuple[Rate, ...],
        concurrency: int | None,
        budget: Budget | None,
        now: float,
    ) -> Decision | asyncio.Future[Decision]:
        """From this process's stock when it holds what is needed (stock.py), else one
        EVALSHA. `now` is not used: Redis's clock is the one all gateways share.

        A round trip returns a future completed by callbacks, not a coroutine: on the request
        path that saves a Task and three coroutine frames per request (see pipeline/limits.py)."""
        plan = self._plan(key, rates, concurrency, budget)
        stock = plan.stock
        mono = time.monotonic()
        out: asyncio.Future[Decision]
        if budget is None and not self._down_until:
            taken = stock.take(bool(rates), concurrency is not None, mono)
            if taken is not None:
                return taken
            if stock.asking_permits or stock.asking_slots:
                # A stock is on its way: wait for it instead of one more round trip each.
                out = asyncio.get_running_loop().create_future()
                stock.waiters.append(out)
                return out
        out = asyncio.get_running_loop().create_future()
        self._ask(plan, out, mono)
        return out

    def _serve_waiters(self, plan: _Plan) -> None:
        """Requests that waited for a stock: from it while it lasts, then by their own ask."""
        stock = plan.stock
        waiters, stock.waiters = stock.waiters, []
        has_rates, has_slots = bool(plan.rates), plan.concurrency is not None
        mono = time.monotonic()
        for out in waiters:
            if out.done():
                continue
            if stock.asking_permits or stock.asking_slots:
                stock.waiters.append(out)
                continue
            taken = None if self._down_until else stock.take(has_rates, has_slots, mono)
            if taken is not None:
                out.set_result(taken)
            else:
                self._ask(plan, out, mono)

    def _ask(self, plan: _Plan, out: asyncio.Future[Decision], mono: float) -> None:
        """One round trip for one request (and, far from the limits, a stock)."""
        stock, rates, budget = plan.stock, plan.rates, plan.budget
        has_slots = plan.concurrency is not None
        if self._down_until and mono < self._down_until:
            self._failed("admit", None)
            out.set_result(self._backend_decision())
            return
        # What the stock has covers one side; the round trip asks for the other (and, far from
        # the limits, for a stock of it).
        held_permit = bool(rates) and budget is None and stock.take_permit(mono)
        own = stock.leases.pop() if has_slots and budget is None and stock.leases else None
        wantp = 0 if held_permit or not rates else (1 if budget else stock.ask_permits())
        need = 1 if has_slots and own is None else 0
        extra = stock.ask_slots() if has_slots and budget is None else 0
        tag = self._lease_tag + str(next(self._lease_ids)) if need or extra else ""
        if self._releases:
            self._flush_releases()  # sent first on the same connection: Redis sees them first
        ask = (wantp, need, extra)
        call = self._fast.send(
            plan.head + bulk(tag) + plan.mid + _N[wantp] + _N[need] + _N[extra] + plan.tail
        )
        call.add_done_callback(
            partial(self._admitted, out, plan, tag, ask, held_permit, own, retried=False)
        )

    def _admitted(
        self,
        out: asyncio.Future[Decision],
        plan: _Plan,
        tag: str,
        ask: tuple[int, int, int],
        held_permit: bool,
        own: str | None,
        call: asyncio.Future[Any],
        retried: bool,
    ) -> None:
        self._answer(out, plan, tag, ask, held_permit, own, call, retried)
        stock = plan.stock
        if stock.waiters and not (stock.asking_permits or stock.asking_slots):
            self._serve_waiters(plan)

    def _answer(
        self,
        out: asyncio.Future[Decision],
        plan: _Plan,
        tag: str,
        ask: tuple[int, int, int],
        held_permit: bool,
        own: str | None,
        call: asyncio.Future[Any],
        retried: bool,
    ) -> None:
        stock = plan.stock
        wantp, need, extra = ask
        exc = None if call.cancelled() else call.exception()
        if call.cancelled():
            exc = TimeoutError("cancelled")
        if isinstance(exc, RespError) and str(exc).startswith("NOSCRIPT") and not retried:
            # After a Redis restart the script cache is empty: EVAL also reloads it.
            args = plan.args.copy()
            at = len(plan.keys) + 1
            args[at], args[at + 5], args[at + 6], args[at + 7] = tag, wantp, need, extra
            again = self._fast.call("EVAL", ADMIT, *args)
            again.add_done_callback(
                partial(self._admitted, out, plan, tag, ask, held_permit, own, retried=True)
            )
            return
        if exc is not None or out.done():  # failed, or nobody waits for the answer any more
            stock.asking_permits = stock.asking_slots = False
            zkey = plan.keys[len(plan.rates)] if plan.concurrency is not None else ""
            if own is not None:
                self._give_back(zkey, own)
            if exc is not None:
                self._failed("admit", exc)
                out.set_result(self._backend_decision())
                return
            res = call.result()
            slots = res[4 + len(plan.rates)] if res[0] == 1 else 0
            for j in range(1, slots + 1):
                self._held[f"{tag}:{j}"] = zkey
                self._give_back(zkey, f"{tag}:{j}")
            return
        res = call.result()
        self._down_until = 0.0
        rates = plan.rates
        n = len(rates)
        allowed, hit, wait = res[0], res[1], res[2]
        granted, slots, rate_room, slot_room = res[3 + n], res[4 + n], res[5 + n], res[6 + n]
        mono = time.monotonic()
        info = self._info(rates, res, granted) if wantp else stock.info
        if allowed != 1:
            stock.asking_permits = stock.asking_slots = False
            if held_permit:
                stock.permits += 1  # not used: back to the stock
            if own is not None:
                stock.leases.append(own)
            text = f"rate {rates[hit - 1].text}" if hit > 0 else ""
            text = text or ("concurrency" if hit == -1 else "tokens")
            out.set_result(Decision(False, hit=text, retry_after=wait / _US, info=info))
            return
        lease = own
        if slots:
            zkey = plan.keys[n]
            leases = [f"{tag}:{j}" for j in range(1, slots + 1)]
            for one in leases:
                self._held[one] = zkey
            if lease is None:
                lease = leases.pop()
            if leases:
                stock.leases.extend(leases)
                self._schedule_sweep()
        if plan.concurrency is not None and plan.budget is None:
            stock.slots_granted(slot_room, extra > 0, mono)
        if wantp and plan.budget is None:
            stock.permits_granted(wantp, granted, rate_room, plan.slowest_step or 0.0, info, mono)
        out.set_result(Decision(True, info=info, lease=lease))

    @staticmethod
    def _info(rates: tuple[Rate, ...], res: list[int], consumed: int) -> RateInfo | None:
        """The most restrictive rate after the `consumed` permits just granted: fewest
        remaining, then longest reset."""
        best: RateInfo | None = None
        for i, rate in enumerate(rates):
            period_us = round(rate.period * _US)
            interval = max(1, round(period_us / rate.limit))
            d = res[3 + i] + interval * consumed
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
        """Give the slot back: into this process's stock while plenty are free (stock.py),
        else forget it here at once (no more heartbeat) and ZREM it in Redis, batched. If that
        ZREM fails, the slot still frees itself when its lease runs out."""
        zkey = self._held.get(lease)
        if zkey is None or self._closed:
            return
        plan = self._plans.get(key)
        if plan is not None and not self._down_until:
            stock = plan.stock
            if len(stock.leases) < stock.want_slots:
                stock.leases.append(lease)
                self._schedule_sweep()
                return
        self._give_back(zkey, lease)

    def _give_back(self, zkey: str, lease: str) -> None:
        del self._held[lease]
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

    def _return_stock(self, plan: _Plan) -> None:
        """The slots held ahead for `plan` go back to Redis (batched ZREM)."""
        if not plan.stock.leases:
            return
        leases, plan.stock.leases = plan.stock.leases, []
        for lease in leases:
            zkey = self._held.get(lease)
            if zkey is not None:
                self._give_back(zkey, lease)

    def _schedule_sweep(self) -> None:
        if not self._sweep_scheduled:
            try:
                asyncio.get_running_loop().call_later(IDLE_RETURN, self._sweep)
            except RuntimeError:
                return
            self._sweep_scheduled = True

    def _sweep(self) -> None:
        """Stocked slots unused for IDLE_RETURN go back, so an identity that stopped sending
        does not keep slots another process could use."""
        self._sweep_scheduled = False
        now = time.monotonic()
        waiting = False
        for plan in list(self._plans.values()):
            if plan.stock.leases:
                if now - plan.stock.used_at >= IDLE_RETURN:
                    self._return_stock(plan)
                else:
                    waiting = True
        if waiting and not self._closed:
            self._schedule_sweep()

    def _void_stocks(self) -> None:
        """After a Redis error nothing held ahead is trusted: a lease the heartbeat could not
        refresh may have expired there. Forgotten here, they expire in Redis."""
        for plan in self._plans.values():
            for lease in plan.stock.void():
                self._held.pop(lease, None)

    def _release_done(self, future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self._failed("release", exc)

    def spend(self, key: str, budget: Budget, tokens: int, now: float) -> None:
        """Add used tokens (the window, budget.period, starts with the first spend)."""
        if tokens <= 0 or self._closed:
            return
        args = [1, self.prefix + key + "|t", int(tokens), max(1, round(budget.period * 1000))]
        self._spawn(self._eval(self._spend_sha, SPEND, args), "spend")

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
                await self._eval(self._heartbeat_sha, HEARTBEAT, args)
            except (TimeoutError, RedisError, OSError) as exc:
                self._failed("heartbeat", exc)
                return

    # -- errors --------------------------------------------------------------------------------

    def _failed(self, op: str, exc: BaseException | None) -> None:
        """Count every failure; log one line per LOG_INTERVAL with how many happened."""
        backend_errors.labels(op=op).inc()
        if exc is not None and not isinstance(exc, NoScriptError):
            self._down_until = time.monotonic() + self.DOWN_RETRY
            self._void_stocks()
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
        """Rows like the memory backend's (for `garrison limits show`); see redis_usage.py."""
        return await redis_usage.usage(self._client, self.prefix, prefix)

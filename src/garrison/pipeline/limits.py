"""Stage: limits that protect the GPU (DESIGN §1 "limit"), after the caller is known.

Per route and per identity (an API key, a user — whatever way they signed in — or, for
anonymous routes, the client IP as trusted-proxy rules resolved it): GCRA rates, concurrency
slots, a token budget spent from each response's usage. Per upstream: `max_in_flight` GPU
slots shared fairly between identities. Whatever a request holds is given back when it ends,
however it ends (InFlight runs `ex.on_finish` exactly once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial

from garrison.limits.fair import FairGate
from garrison.limits.model import Backend, Budget, Decision, Rate, RateInfo
from garrison.limits.usage import UsageObserver, prepare_request
from garrison.observe import metrics, request_metrics
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply, error_reply
from garrison.pipeline.pipeline import Stage, StageResult

log = logging.getLogger("garrison.limits")
MAX_REWRITE = 8 * 1024 * 1024
POLL = 0.05
GATE_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class RouteLimits:
    rates: tuple[Rate, ...]
    concurrency: int | None
    budget: Budget | None
    queue_timeout: float


class TokenMeter:
    """Counts the tokens of one response (and strips the usage event Garrison asked for)."""

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.rewrites = strip
        self._inner: UsageObserver | None = None

    def begin(self, content_type: bytes | None) -> None:
        self._inner = UsageObserver(content_type, self.strip)

    def feed(self, data: bytes) -> bytes:
        return self._inner.feed(data) if self._inner is not None else data

    def end(self) -> bytes:
        return self._inner.end() if self._inner is not None else b""

    @property
    def tokens(self) -> int | None:
        return self._inner.tokens if self._inner is not None else None


def who(ex: Exchange) -> str:
    """Whom a limit counts: the key, the user, else the client address."""
    ident = ex.identity
    if ident is None:
        return f"ip:{ex.client_ip or ex.peer_ip}"
    if ident.method == "api_key" and ident.key_id:
        return f"key:{ident.key_id}"
    return f"user:{ident.name}"


def _copy_result(out: asyncio.Future[Reply | None], task: asyncio.Future[Reply | None]) -> None:
    if out.done():
        return
    if task.cancelled():
        out.cancel()
    elif task.exception() is not None:
        out.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        out.set_result(task.result())


def _counter_key(ex: Exchange, index: int) -> str:
    """`<route>|<who>`, kept on the (cached) identity so it is built once, not per request."""
    ident = ex.identity
    if ident is None:
        return f"{index}|ip:{ex.client_ip or ex.peer_ip}"
    keys = ident.limit_keys
    found = keys.get(index)
    if found is None:
        found = keys[index] = f"{index}|{who(ex)}"
    return found


RATE_HEADERS = (
    b"ratelimit-limit: %d\r\nratelimit-remaining: %d\r\nratelimit-reset: %d\r\n"
    b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: %d\r\n"
)


def rate_headers(info: RateInfo | None) -> bytes:
    """RateLimit-Limit/-Remaining/-Reset (IETF draft) and the seed's X-RateLimit-Limit/
    -Remaining, as serialised header lines (one formatting per request)."""
    if info is None:
        return b""
    remaining = info.remaining if info.remaining > 0 else 0
    reset = int(info.reset + 0.999) if info.reset > 0 else 0
    return RATE_HEADERS % (info.limit, remaining, reset, info.limit, remaining)


def refusal(decision: Decision, ex: Exchange) -> Reply:
    """429 (or 503 for an unreachable shared backend) saying which limit was hit."""
    retry = max(1, int(decision.retry_after + 0.999))
    hit = decision.hit
    metrics.limit_refusals.labels(limit=hit.split(" ")[0] or "unknown").inc()
    if hit == "backend":
        reply = error_reply(
            503, "limits_unavailable", "the rate limit store is unreachable; try again", html=False
        )
    else:
        code = {"concurrency": "too_many_concurrent", "tokens": "token_budget_exhausted"}.get(
            hit, "rate_limited"
        )
        message = {
            "concurrency": "too many requests in progress for this identity",
            "tokens": "the token budget for this identity is spent",
        }.get(hit, f"rate limit reached ({hit.removeprefix('rate ')})")
        reply = Reply.json(
            429,
            {"error": {"code": code, "message": message, "limit": hit, "retry_after": retry}},
        )
        reply.code = f"{code} ({hit})"  # the audit line's reason
    reply.headers.append((b"retry-after", str(retry).encode()))
    ex.response_head_extra += rate_headers(decision.info)
    return reply


class Limits(Stage):
    name = "limits"

    def __init__(
        self,
        backend: Backend,
        routes: dict[int, RouteLimits],
        gates: dict[str, FairGate],
    ) -> None:
        self.backend = backend
        self.routes = routes
        self.gates = gates
        self._release = backend.release  # bound once: the hook of every admitted request
        metrics.track_limits(backend, gates)

    def __call__(self, ex: Exchange) -> StageResult:
        route = ex.route
        assert route is not None
        limits = self.routes.get(route.index)
        gate = self.gates.get(route.upstream)
        if limits is None:
            if gate is None or gate.try_acquire_for(ex):
                return None
            return self._wait_gate(ex, gate, 0.0)
        ident = ex.identity
        rates = limits.rates
        budget = limits.budget
        if ident is not None:
            if ident.rates is not None:
                rates = ident.rates
            if ident.budget is not None:
                budget = ident.budget
            key = ident.limit_keys.get(route.index) or _counter_key(ex, route.index)
        else:
            key = _counter_key(ex, route.index)
        decision = self.backend.admit(key, rates, limits.concurrency, budget, time.time())
        if type(decision) is Decision:
            if decision.allowed and budget is None:
                # The common case, inlined (this runs on every limited request): the slot's
                # release hook (Exchange.finally_) and the rate limit headers.
                if decision.lease is not None:
                    hook = partial(self._release, key, decision.lease)
                    if ex.finished:
                        hook()
                    elif ex.on_finish is None:
                        ex.on_finish = [hook]
                    else:
                        ex.on_finish.append(hook)
                if decision.info is not None:
                    ex.response_head_extra += rate_headers(decision.info)
                if gate is None or gate.try_acquire_for(ex):
                    return None
                return self._wait_gate(ex, gate, limits.queue_timeout)
        elif isinstance(decision, asyncio.Future) and budget is None:
            # A shared backend answers later: chain by callback (no Task per request) and
            # fall back to the coroutine only for the rare cases (queueing, refusal, budget).
            out: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
            decision.add_done_callback(
                partial(self._answered, ex, key, limits, rates, budget, gate, out)
            )
            return out
        return self._slow(ex, key, decision, limits, rates, budget, gate)

    def _answered(
        self,
        ex: Exchange,
        key: str,
        limits: RouteLimits,
        rates: tuple[Rate, ...],
        budget: Budget | None,
        gate: FairGate | None,
        out: asyncio.Future[Reply | None],
        done: asyncio.Future[Decision],
    ) -> None:
        if out.done():  # the request was cancelled meanwhile: give back what was taken
            if not done.cancelled() and done.exception() is None:
                lease = done.result().lease
                if lease is not None:
                    self.backend.release(key, lease)
            return
        if done.cancelled() or done.exception() is not None:
            exc = None if done.cancelled() else done.exception()
            out.set_exception(exc or asyncio.CancelledError())
            return
        decision = done.result()
        if not decision.allowed:  # refusal or queueing: the coroutine path
            task = asyncio.ensure_future(self._slow(ex, key, decision, limits, rates, budget, gate))
            task.add_done_callback(partial(_copy_result, out))
            return
        self._admitted(ex, key, decision)
        if gate is None or gate.try_acquire_for(ex):
            out.set_result(None)
            return
        task = asyncio.ensure_future(self._wait_gate(ex, gate, limits.queue_timeout))
        task.add_done_callback(partial(_copy_result, out))

    def _admitted(self, ex: Exchange, key: str, decision: Decision) -> None:
        if decision.lease is not None:
            ex.finally_(partial(self._release, key, decision.lease))
        if decision.info is not None:
            ex.response_head_extra += rate_headers(decision.info)

    async def _slow(
        self,
        ex: Exchange,
        key: str,
        pending: Decision | Awaitable[Decision],
        limits: RouteLimits,
        rates: tuple[Rate, ...],
        budget: Budget | None,
        gate: FairGate | None,
    ) -> Reply | None:
        decision = pending if isinstance(pending, Decision) else await pending
        if not decision.allowed and decision.hit == "concurrency" and limits.queue_timeout > 0:
            decision = await self._queue(key, decision, limits, rates, budget)
        if not decision.allowed:
            return refusal(decision, ex)
        self._admitted(ex, key, decision)
        if budget is not None:
            await self._meter(ex, key, budget)
        if gate is not None and not gate.try_acquire_for(ex):
            return await self._wait_gate(ex, gate, limits.queue_timeout)
        return None

    async def _queue(
        self,
        key: str,
        decision: Decision,
        limits: RouteLimits,
        rates: tuple[Rate, ...],
        budget: Budget | None,
    ) -> Decision:
        """Wait up to queue_timeout for one of the identity's concurrency slots."""
        deadline = time.monotonic() + limits.queue_timeout
        waiter = getattr(self.backend, "wait_for_slot", None)
        while not decision.allowed and decision.hit == "concurrency":
            left = deadline - time.monotonic()
            if left <= 0:
                return decision
            if waiter is not None:
                await waiter(key, left)
            else:
                await asyncio.sleep(min(POLL, left))
            result = self.backend.admit(key, rates, limits.concurrency, budget, time.time())
            decision = result if isinstance(result, Decision) else await result
        return decision

    async def _meter(self, ex: Exchange, key: str, budget: Budget) -> None:
        """Count the response's tokens; for a stream, ask the upstream to report them."""
        strip = False
        if ex.method == "POST":
            ctype = ex.header(b"content-type")
            try:
                body = await ex.read_body(MAX_REWRITE)
            except BodyTooLarge:
                body = None  # too big to rewrite: relayed as it comes, usage still counted
            if body is not None:
                rewritten, strip = prepare_request(body, ctype)
                ex.body_override = rewritten if rewritten is not None else body
        meter = TokenMeter(strip)
        ex.response_observer = meter
        backend = self.backend
        spender = who(ex)

        def spend() -> None:
            tokens = meter.tokens
            if tokens:
                backend.spend(key, budget, tokens, time.time())
                request_metrics.count_tokens(spender, tokens)

        ex.finally_(spend)

    async def _wait_gate(self, ex: Exchange, gate: FairGate, timeout: float) -> Reply | None:
        """Queue (fairly) for a GPU slot: queue_timeout, or GATE_WAIT when the route sets none."""
        if await gate.acquire(who(ex), timeout if timeout > 0 else GATE_WAIT):
            ex.finally_(gate.release)
            return None
        metrics.limit_refusals.labels(limit="upstream_busy").inc()
        return error_reply(
            429, "upstream_busy", "every GPU slot is busy; try again shortly", html=False
        )


class LimitsEndpoint:
    """`GET /.garrison/limits[?who=key:ID|user:NAME|ip:ADDR]`: current usage, loopback only
    (what `garrison limits show` prints)."""

    def __init__(self, backend: Backend, route_paths: list[str]) -> None:
        self.backend = backend
        self.route_paths = route_paths

    def __call__(self, ex: Exchange) -> StageResult:
        from garrison.pipeline.pki_endpoints import _loopback

        if not _loopback(ex.peer_ip):
            return error_reply(403, "forbidden", "served to loopback clients only", html=False)
        wanted = ""
        if ex.query:
            from urllib.parse import parse_qs

            wanted = (parse_qs(ex.query.decode("latin-1")).get("who") or [""])[0]
        rows = self.backend.usage("")
        if isinstance(rows, list):
            return self._reply(rows, wanted)
        return self._later(rows, wanted)

    async def _later(self, pending: Awaitable[list[dict[str, object]]], wanted: str) -> Reply:
        return self._reply(await pending, wanted)

    def _reply(self, rows: list[dict[str, object]], wanted: str) -> Reply:
        out = []
        for row in rows:
            index, _, identity = str(row.get("key", "")).partition("|")
            if wanted and identity != wanted:
                continue
            route = (
                self.route_paths[int(index)]
                if index.isdigit() and int(index) < len(self.route_paths)
                else index
            )
            out.append({**row, "key": identity, "route": route})
        return Reply.json(200, {"usage": out})

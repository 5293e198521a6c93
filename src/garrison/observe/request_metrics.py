"""Per-request metrics: requests, latency, auth failures and token usage, with bounded labels.

Every label value comes from a bounded set, never from what the client sent:
route = the configured route path ("gateway" for /.garrison/, "none" when no route matched);
status = the exact code from a fixed set, else its class ("4xx"); identity = none, session,
api_key, jwt or client_cert.

Cheap per request: a request adds to plain Python numbers in a record cached per (route,
status, identity) — one dict lookup, a bisect and a few additions, no lock — and the records
are added into the prometheus-client children at most once a second and right before a scrape
(`flush`). prometheus-client's own observe() costs ~5 µs for a counter and two histograms,
several percent of a keep-alive request's Python time.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from garrison.observe import metrics
from garrison.observe.metrics import REGISTRY

if TYPE_CHECKING:
    from garrison.pipeline.exchange import Exchange, Reply

STATUSES = frozenset(
    {200, 201, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409,
     413, 414, 415, 422, 429, 431, 499, 500, 501, 502, 503, 504}
)  # fmt: skip
IDENTITY_KINDS = frozenset({"session", "api_key", "jwt", "client_cert"})
MAX_ROUTES = 256  # more configured routes than this share the "other" route label
MAX_CACHED = 4096  # (route, status, identity) combinations kept resolved
MAX_REASONS = 64  # auth failure reasons (error codes from the source, capped anyway)
MAX_TOKEN_IDENTITIES = 100  # per process; more identities share identity="other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

requests = Counter(
    "garrison_requests",
    "Requests answered, by configured route, status (fixed set, else class) and identity kind.",
    ["route", "status", "identity"],
    registry=REGISTRY,
)
request_seconds = Histogram(
    "garrison_request_duration_seconds",
    "Time from the request head to the end of the answer, by configured route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
upstream_seconds = Histogram(
    "garrison_upstream_duration_seconds",
    "Time from sending the request upstream to the upstream's response head, by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
auth_failures = Counter(
    "garrison_auth_failures",
    "Requests refused with 401 or 403, by reason (the error code the client got).",
    ["reason"],
    registry=REGISTRY,
)
tokens = Counter(
    "garrison_tokens",
    "Tokens reported by the upstream (usage), by identity: key:<id>, user:<name>, anonymous; "
    f"at most {MAX_TOKEN_IDENTITIES} identities per worker, the rest under identity=other.",
    ["identity"],
    registry=REGISTRY,
)

_routes: dict[str, str] = {}
_reasons: dict[str, Any] = {}
_token_children: dict[str, Any] = {}
GATEWAY_PREFIX = "/.garrison/"
FLUSH_SECONDS = 1.0
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


class _Pending:
    """What one (route, status, identity) counted since the last flush, and where it goes."""

    __slots__ = ("children", "count", "total", "total_sum", "upstream", "upstream_sum")

    def __init__(self, children: tuple[Any, Any, Any]) -> None:
        self.children = children
        self.count = 0
        self.total_sum = 0.0
        self.total = [0] * len(_BOUNDS)
        self.upstream_sum = 0.0
        self.upstream = [0] * len(_BOUNDS)


_pending: dict[tuple[str, int, str | None], _Pending] = {}
_flush_timer: asyncio.TimerHandle | None = None


def status_label(status: int) -> str:
    """The exact code when it is a usual one, else its class; 0 (no answer) is "none"."""
    if status in STATUSES:
        return str(status)
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "none"


def _route_key(ex: Exchange) -> str:
    """The configured route path; "gateway" or "none" (never the request path) without one."""
    route = ex.route
    if route is not None:
        return route.path
    return "gateway" if ex.path.startswith(GATEWAY_PREFIX) else "none"


def route_label(key: str) -> str:
    """Route paths come from the config; past MAX_ROUTES distinct ones they share "other"."""
    found = _routes.get(key)
    if found is None:
        if len(_routes) >= MAX_ROUTES:
            return "other"
        found = _routes[key] = key
    return found


def _resolve(key: tuple[str, int, str | None]) -> _Pending:
    route = route_label(key[0])
    kind = key[2]
    identity = kind if kind in IDENTITY_KINDS else ("none" if kind is None else "other")
    record = _Pending(
        (
            requests.labels(route, status_label(key[1]), identity),
            request_seconds.labels(route),
            upstream_seconds.labels(route),
        )
    )
    if len(_pending) < MAX_CACHED:
        _pending[key] = record
    else:  # not cached: nothing would flush it, so it goes in now
        _flush_one(record)
    return record


def observe(ex: Exchange, status: int, upstream: float | None = None) -> None:
    """One request ended with `status`; `upstream` = seconds to the upstream's response head."""
    ident = ex.identity
    route = ex.route
    key = (
        route.path if route is not None else _route_key(ex),
        status,
        ident.method if ident is not None else None,
    )
    record = _pending.get(key)
    if record is None:
        record = _resolve(key)
    elapsed = time.monotonic() - ex.started
    record.count += 1
    record.total_sum += elapsed
    record.total[bisect_left(_BOUNDS, elapsed)] += 1
    if upstream is not None:
        record.upstream_sum += upstream
        record.upstream[bisect_left(_BOUNDS, upstream)] += 1
    if _flush_timer is None:
        _schedule_flush()


def _schedule_flush() -> None:
    global _flush_timer
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        flush()  # no event loop (a command, a test): nothing would flush later
        return
    _flush_timer = loop.call_later(FLUSH_SECONDS, flush)


def flush() -> None:
    """Add what requests counted into the prometheus-client children (scrape, or a timer)."""
    global _flush_timer
    if _flush_timer is not None:
        _flush_timer.cancel()
        _flush_timer = None
    for record in list(_pending.values()):
        if record.count:
            _flush_one(record)


def _flush_one(record: _Pending) -> None:
    counter, total, upstream = record.children
    counter.inc(record.count)
    record.count = 0
    _add(total, record.total, record.total_sum)
    record.total_sum = 0.0
    if record.upstream_sum or any(record.upstream):
        _add(upstream, record.upstream, record.upstream_sum)
        record.upstream_sum = 0.0


def _add(histogram: Any, buckets: list[int], amount: float) -> None:
    """Add counted observations into a histogram child: its per-bucket values and its sum.

    prometheus-client has no public "observe n times"; `_buckets` (non-cumulative counts, one
    per bound) and `_sum` are its storage (values in memory or in multiprocess files).
    tests/observe/test_request_metrics.py compares the result with observe() itself."""
    for index, n in enumerate(buckets):
        if n:
            histogram._buckets[index].inc(n)
            buckets[index] = 0
    histogram._sum.inc(amount)


metrics.before_render.append(flush)


def observe_reply(ex: Exchange, reply: Reply) -> None:
    """The gateway answered itself: count it, and a 401/403 as an auth failure by its code."""
    observe(ex, reply.status)
    if reply.status == 401 or reply.status == 403:
        code = reply.code or "unknown"
        child = _reasons.get(code)
        if child is None:
            if len(_reasons) < MAX_REASONS:
                child = _reasons[code] = auth_failures.labels(code[:48])
            else:
                child = auth_failures.labels("other")
        child.inc()


def count_tokens(who: str, amount: int) -> None:
    """Tokens spent by `who` (limits.who: key:ID, user:NAME or ip:ADDR; addresses are not kept).

    The first MAX_TOKEN_IDENTITIES identities of a worker get their own series, the rest are
    summed under "other": a bound on series, not on what is counted."""
    child = _token_children.get(who)
    if child is None:
        if who.startswith("ip:"):
            child = tokens.labels("anonymous")
        elif len(_token_children) < MAX_TOKEN_IDENTITIES:
            child = _token_children[who] = tokens.labels(who[:80])
        else:
            child = tokens.labels("other")
    child.inc(amount)


def reset_caches() -> None:
    """Forget resolved children (tests; a worker switching to multiprocess values)."""
    global _flush_timer
    if _flush_timer is not None:
        _flush_timer.cancel()
        _flush_timer = None
    _routes.clear()
    _pending.clear()
    _reasons.clear()
    _token_children.clear()

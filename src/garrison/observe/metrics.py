"""Prometheus metrics (prometheus-client), served at /.garrison/metrics (see metrics_endpoint).

One process keeps its values in memory; with --workers N each worker writes them to mmap files
and a scrape sums all workers (observe/multiproc.py). Label values are bounded by construction:
results and reasons from fixed sets, certificate names from the operator's own store.
Per-request series live in observe/request_metrics.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)

client_cert_checks = Counter(
    "garrison_client_cert_verifications",
    "Client certificate checks by result (success, none, expired, revoked, handshake_* ...).",
    ["result"],
    registry=REGISTRY,
)
client_cert_expiry = Gauge(
    "garrison_client_cert_expiry_seconds",
    "Seconds until each issued, unrevoked client certificate expires (negative: expired).",
    ["name", "serial"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
MAX_EXPIRY_SERIES = 2000
certificate_expiry = Gauge(
    "garrison_certificate_expiry_timestamp_seconds",
    "When a certificate Garrison serves or signs with expires (Unix time), by kind: server "
    "(what the HTTPS listener serves now), ca (the private CA), acme (the last ACME issue).",
    ["kind"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)


tls_handshakes = Counter(
    "garrison_tls_handshakes",
    "Completed TLS handshakes on the HTTPS listener, by protocol version (TLSv1.2, TLSv1.3). "
    "Refused client certificates: garrison_client_cert_verifications{result=handshake_*}.",
    ["version"],
    registry=REGISTRY,
)
_TLS_VERSIONS = frozenset({"TLSv1.2", "TLSv1.3"})
_tls_children: dict[str | None, Any] = {}


def count_handshake(transport: Any) -> None:
    """Once per TLS connection (not per request): which version was negotiated."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return
    version = ssl_object.version()
    child = _tls_children.get(version)
    if child is None:
        label = version if version in _TLS_VERSIONS else "other"
        child = _tls_children[version] = tls_handshakes.labels(version=label)
    child.inc()


def reset_caches() -> None:
    """Forget cached children (after the switch to multiprocess values)."""
    _tls_children.clear()


def set_certificate_expiry(kind: str, not_after: dt.datetime) -> None:
    """kind is one of server, ca, acme (set by the code that loads each certificate)."""
    certificate_expiry.labels(kind=kind).set(not_after.timestamp())


def set_client_cert_expiries(rows: list[tuple[str, str, float]], now: float) -> None:
    """Replace the expiry series with (name, serial hex, not_after) rows, capped."""
    client_cert_expiry.clear()
    for name, serial, not_after in rows[:MAX_EXPIRY_SERIES]:
        client_cert_expiry.labels(name=name[:64], serial=serial[:40]).set(not_after - now)


_multiproc_dir: str | None = None
# Gauges read from live objects (gates, backend): set_function in one process; with several
# workers, copied into their files every LIVE_REFRESH seconds and right before a scrape.
_live: dict[tuple[str, str], tuple[Any, Callable[[], float]]] = {}
_timer: asyncio.TimerHandle | None = None
LIVE_REFRESH = 1.0


def all_metrics() -> Iterator[MetricWrapperBase]:
    """Every metric object registered in REGISTRY (for the switch to multiprocess values)."""
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            yield collector


def use_multiprocess(folder: str) -> None:
    global _multiproc_dir
    _multiproc_dir = folder
    for child, _read in _live.values():
        child.set(0)


# Called before each scrape: buffers that batch per-request counts flush themselves here.
before_render: list[Callable[[], None]] = []


def render() -> bytes:
    """The text exposition: this process, or (multiprocess) the sum over all workers."""
    for hook in before_render:
        hook()
    if _multiproc_dir is None:
        return generate_latest(REGISTRY)
    refresh_live()
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=_multiproc_dir)
    return generate_latest(registry)


def _track(gauge: Gauge, label: str, read: Callable[[], float]) -> None:
    child = gauge.labels(upstream=label) if label else gauge
    _live[(gauge._name, label)] = (child, read)
    if _multiproc_dir is None:
        child.set_function(read)
        return
    child.set(read())
    _start_refresh()


def refresh_live() -> None:
    for child, read in list(_live.values()):
        try:
            child.set(read())
        except Exception:  # a gate gone with an old config must not break a scrape
            continue


def _start_refresh() -> None:
    global _timer
    if _timer is not None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop yet: values are refreshed when this worker is scraped

    def tick() -> None:
        global _timer
        refresh_live()
        _timer = loop.call_later(LIVE_REFRESH, tick)

    _timer = loop.call_later(LIVE_REFRESH, tick)


limit_refusals = Counter(
    "garrison_limit_refusals",
    "Requests refused by a limit: rate, concurrency, tokens, backend, upstream_busy.",
    ["limit"],
    registry=REGISTRY,
)
slots_held = Gauge(
    "garrison_limit_slots_held",
    "Concurrency slots held right now (memory backend; summed over workers).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
upstream_in_flight = Gauge(
    "garrison_upstream_in_flight",
    "Requests at the upstream now (its connections carrying a request), every upstream.",
    ["upstream"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
upstream_queued = Gauge(
    "garrison_upstream_queued",
    "Requests waiting for one of an upstream's max_in_flight slots.",
    ["upstream"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)


upstream_up = Gauge(
    "garrison_upstream_up",
    "1 when the last connection to the upstream (for a request, or the idle probe every 30 s) "
    "was made, 0 when it failed; no sample before the first attempt. Workers: the lowest.",
    ["upstream"],
    multiprocess_mode="livemin",
    registry=REGISTRY,
)


def track_upstream_health(name: str, read: Callable[[], float]) -> None:
    """Point the upstream's health gauge at its live record (http/health.py)."""
    _track(upstream_up, name, read)


def track_limits(backend: object, gates: dict[str, Any]) -> None:
    """Point the limit gauges at the live backend and gates (read at scrape time)."""
    held = getattr(backend, "slots_held", None)
    if held is not None:
        _track(slots_held, "", held)
    for name, gate in gates.items():
        _track(upstream_queued, name, lambda g=gate: g.queued)


def track_upstreams(pools: Mapping[str, Any]) -> None:
    """In flight per upstream, read from its connection pool at scrape time (nothing per
    request); a reload's new pools replace the old ones here."""
    for name, pool in pools.items():
        _track(upstream_in_flight, name, lambda p=pool: p.busy)


acme_attempts = Counter(
    "garrison_acme_attempts",
    "ACME issuance/renewal attempts by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
acme_failures = Counter(
    "garrison_acme_failures",
    "Failed ACME attempts by reason (connection, validation, account, timeout, acme).",
    ["reason"],
    registry=REGISTRY,
)

"""Prometheus metrics (prometheus-client), served at /.garrison/metrics to loopback clients.

Each worker process keeps its own counters; with --workers N, scrape each or sum (issue 7
brings multiprocess aggregation and access rules). Label values are bounded by construction:
results and reasons from fixed sets, certificate names from the operator's own store.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

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
    registry=REGISTRY,
)
MAX_EXPIRY_SERIES = 2000


def set_client_cert_expiries(rows: list[tuple[str, str, float]], now: float) -> None:
    """Replace the expiry series with (name, serial hex, not_after) rows, capped."""
    client_cert_expiry.clear()
    for name, serial, not_after in rows[:MAX_EXPIRY_SERIES]:
        client_cert_expiry.labels(name=name[:64], serial=serial[:40]).set(not_after - now)


def render() -> bytes:
    return generate_latest(REGISTRY)


limit_refusals = Counter(
    "garrison_limit_refusals",
    "Requests refused by a limit: rate, concurrency, tokens, backend, upstream_busy.",
    ["limit"],
    registry=REGISTRY,
)
slots_held = Gauge(
    "garrison_limit_slots_held",
    "Concurrency slots held right now in this process (memory backend).",
    registry=REGISTRY,
)
upstream_in_flight = Gauge(
    "garrison_upstream_in_flight",
    "Requests holding one of an upstream's max_in_flight slots.",
    ["upstream"],
    registry=REGISTRY,
)
upstream_queued = Gauge(
    "garrison_upstream_queued",
    "Requests waiting for one of an upstream's max_in_flight slots.",
    ["upstream"],
    registry=REGISTRY,
)


def track_limits(backend: object, gates: dict[str, Any]) -> None:
    """Point the limit gauges at the live backend and gates (read at scrape time)."""
    held = getattr(backend, "slots_held", None)
    if held is not None:
        slots_held.set_function(held)
    for name, gate in gates.items():
        upstream_in_flight.labels(upstream=name).set_function(lambda g=gate: g.in_flight)
        upstream_queued.labels(upstream=name).set_function(lambda g=gate: g.queued)


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

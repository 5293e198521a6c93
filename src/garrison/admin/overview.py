"""The overview page's numbers, read from the Prometheus registry (what a scrape would show).

Counts come from the metrics the data plane already keeps (with several workers, the sum over
all of them, as a scrape sees it), never from the store, so an open dashboard costs the
request path nothing. Expiries of client certificates and API keys come from the store,
because they are not per-request numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from garrison.admin.views import ExpiryView, Overview, UpstreamView
from garrison.auth.apikeys import KeyRecord
from garrison.config import Config
from garrison.observe import metrics
from garrison.pki.client_certs import IssuedCert

DAY = 86400.0
MAX_EXPIRIES = 50  # the soonest ones; the full lists are on their own pages


def _samples() -> Iterable[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def _expiry(kind: str, name: str, not_after: float, now: float) -> ExpiryView:
    return ExpiryView(kind, name, not_after, round((not_after - now) / DAY, 2))


def build_overview(
    config: Config, certs: list[IssuedCert], keys: list[KeyRecord], now: float | None = None
) -> Overview:
    """Counters and gauges from one rendering of the registry, plus store expiries."""
    now = time.time() if now is None else now
    view = Overview(requests=0, errors=0, refused=0, limit_hits=0)
    in_flight: dict[str, float] = {}
    queued: dict[str, float] = {}
    up: dict[str, float] = {}
    for name, labels, value in _samples():
        if name == "garrison_requests_total":
            view.requests += int(value)
            status = labels.get("status", "")
            if status.startswith("5"):
                view.errors += int(value)
            elif status.startswith("4"):
                view.refused += int(value)
        elif name == "garrison_limit_refusals_total":
            view.limit_hits += int(value)
        elif name == "garrison_upstream_in_flight":
            in_flight[labels.get("upstream", "")] = value
        elif name == "garrison_upstream_queued":
            queued[labels.get("upstream", "")] = value
        elif name == "garrison_upstream_up":
            up[labels.get("upstream", "")] = value
        elif name == "garrison_certificate_expiry_timestamp_seconds" and value > 0:
            kind = labels.get("kind", "")
            view.expiries.append(_expiry(kind, kind, value, now))
    view.upstreams = [
        UpstreamView(
            name=u.name,
            url=u.url,
            in_flight=int(in_flight.get(u.name, 0)),
            queued=int(queued.get(u.name, 0)),
            healthy=None if u.name not in up else up[u.name] >= 1,
        )
        for u in config.upstream
    ]
    for cert in certs:
        if cert.status(now) in ("active", "pending-revocation"):
            view.expiries.append(_expiry("client", cert.name, cert.not_after, now))
    for key in keys:
        if key.expires_at is not None and key.status(now) == "active":
            view.expiries.append(_expiry("key", key.name, key.expires_at, now))
    view.expiries.sort(key=lambda e: e.not_after)
    del view.expiries[MAX_EXPIRIES:]
    return view

"""Per-request metrics on their own: label values stay in bounded sets whatever the input,
token usage per identity is capped with an "other" bucket, and the counts add up."""

from __future__ import annotations

import random
import string
import time

import pytest

from garrison.config import RouteConfig
from garrison.observe import request_metrics as rm
from garrison.observe.metrics import REGISTRY
from garrison.pipeline.exchange import Exchange, error_reply
from garrison.pipeline.routes import CompiledRoute


def exchange(path: str, route: CompiledRoute | None = None) -> Exchange:
    ex = Exchange("GET", path.encode(), "1.1", [], "127.0.0.1", path=path, route=route)
    ex.started = time.monotonic()
    return ex


def label_values(metric: str, label: str) -> set[str]:
    rm.flush()  # as a scrape does: an earlier test's loop may have left its timer behind
    return {
        sample.labels[label]
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == metric and label in sample.labels
    }


def value(metric: str, **labels: str) -> float:
    rm.flush()
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def test_every_status_maps_into_a_fixed_set() -> None:
    labels = {rm.status_label(code) for code in range(-5, 1200)}
    assert labels <= {str(c) for c in rm.STATUSES} | {f"{c}xx" for c in range(1, 6)} | {"none"}
    assert rm.status_label(429) == "429" and rm.status_label(418) == "4xx"
    assert rm.status_label(0) == "none" and rm.status_label(999) == "none"


def test_random_paths_never_become_route_labels() -> None:
    rng = random.Random(7)
    seen = label_values("garrison_requests_total", "route")  # earlier tests' routes
    before = value("garrison_requests_total", route="none", status="404", identity="none")
    for _ in range(1000):
        path = "/" + "".join(rng.choices(string.ascii_letters + "/%.", k=rng.randint(1, 40)))
        rm.observe_reply(exchange(path), error_reply(404, "not_found", "no", html=False))
    rm.observe(exchange("/.garrison/whatever"), 200)
    routes = label_values("garrison_requests_total", "route")
    assert {"none", "gateway"} <= routes <= seen | {"none", "gateway"}, routes - seen
    after = value("garrison_requests_total", route="none", status="404", identity="none")
    assert after - before == 1000
    assert len(rm._pending) <= rm.MAX_CACHED


def test_route_label_is_the_configured_path_and_identity_kind_is_bounded() -> None:
    from garrison.auth.identity import Identity

    route = CompiledRoute.from_config(RouteConfig(path="/api/", upstream="app"), 0)
    ex = exchange("/api/v1/some/thing?x=1", route)
    ex.identity = Identity(method="api_key", name="k")
    before = value("garrison_requests_total", route="/api/", status="200", identity="api_key")
    rm.observe(ex, 200, 0.01)
    after = value("garrison_requests_total", route="/api/", status="200", identity="api_key")
    assert after - before == 1
    assert value("garrison_upstream_duration_seconds_count", route="/api/") >= 1
    ex.identity = Identity(method="made-up", name="k")
    rm.observe(ex, 200)
    assert label_values("garrison_requests_total", "identity") <= {
        "none", "session", "api_key", "jwt", "client_cert", "other"
    }  # fmt: skip


def test_token_usage_is_capped_per_identity_with_an_other_bucket() -> None:
    rm.reset_caches()
    known = label_values("garrison_tokens_total", "identity")
    total_before = sum(value("garrison_tokens_total", identity=i) for i in known)
    spent = 0
    for n in range(rm.MAX_TOKEN_IDENTITIES + 50):
        rm.count_tokens(f"key:k{n:04d}", 10)
        spent += 10
    for n in range(30):
        rm.count_tokens(f"ip:10.0.0.{n}", 1)
        spent += 1
    identities = label_values("garrison_tokens_total", "identity")
    assert len(identities) <= rm.MAX_TOKEN_IDENTITIES + 2  # + "other" + "anonymous"
    assert "other" in identities and "anonymous" in identities
    assert not any(i.startswith("ip:") for i in identities)
    assert value("garrison_tokens_total", identity="other") >= 50 * 10
    total = sum(value("garrison_tokens_total", identity=i) for i in identities)
    assert total - total_before == spent  # nothing is lost to the cap, only merged


def test_auth_failure_reasons_are_capped() -> None:
    rm.reset_caches()
    for n in range(rm.MAX_REASONS + 40):
        rm.observe_reply(exchange("/x"), error_reply(401, f"code_{n}", "no", html=False))
    reasons = label_values("garrison_auth_failures_total", "reason")
    assert "other" in reasons
    assert len(reasons) <= rm.MAX_REASONS * 2 + 1  # earlier tests' reasons plus this cap
    assert value("garrison_auth_failures_total", reason="other") >= 40


@pytest.mark.parametrize("status", [200, 302, 404])
def test_only_401_and_403_count_as_auth_failures(status: int) -> None:
    before = value("garrison_auth_failures_total", reason="probe")
    rm.observe_reply(exchange("/x"), error_reply(status, "probe", "no", html=False))
    assert value("garrison_auth_failures_total", reason="probe") == before


def test_batched_histograms_equal_what_observe_would_give() -> None:
    """The batch path writes prometheus-client's bucket storage directly: compare it with a
    histogram fed by observe() (catches a prometheus-client change to that storage)."""
    from prometheus_client import CollectorRegistry, Histogram

    reference = Histogram("ref", "ref", buckets=rm.LATENCY_BUCKETS, registry=CollectorRegistry())
    batched = Histogram("bat", "bat", buckets=rm.LATENCY_BUCKETS, registry=CollectorRegistry())
    amounts = [0.0, 0.005, 0.0051, 0.3, 1.0, 7.0, 299.0, 301.0, 1e6, 0.01] * 3
    buckets = [0] * len(rm._BOUNDS)
    for amount in amounts:
        reference.observe(amount)
        buckets[rm.bisect_left(rm._BOUNDS, amount)] += 1
    rm._add(batched, buckets, sum(amounts))
    ref = {
        (s.name[3:], s.labels.get("le")): s.value for s in next(iter(reference.collect())).samples
    }
    got = {(s.name[3:], s.labels.get("le")): s.value for s in next(iter(batched.collect())).samples}
    ref = {k: v for k, v in ref.items() if not k[0].endswith("_created")}
    got = {k: v for k, v in got.items() if not k[0].endswith("_created")}
    assert got == pytest.approx(ref) and ref[("_count", None)] == len(amounts)
    assert buckets == [0] * len(rm._BOUNDS)  # handed over, not counted twice


def test_counts_wait_for_the_flush_on_a_loop_and_a_scrape_flushes() -> None:
    import asyncio

    from garrison.observe import metrics

    labels = {"route": "gateway", "status": "204", "identity": "none"}

    async def run() -> tuple[float, float, float]:
        start = value("garrison_requests_total", **labels)
        for _ in range(5):
            rm.observe(exchange("/.garrison/x"), 204)
        held = REGISTRY.get_sample_value("garrison_requests_total", labels) or 0.0  # no flush
        text = metrics.render().decode()
        scraped = REGISTRY.get_sample_value("garrison_requests_total", labels) or 0.0
        assert 'garrison_requests_total{identity="none",route="gateway",status="204"}' in text
        return start, held, scraped

    start, held, scraped = asyncio.run(run())
    assert held == start  # batched: not yet in the registry
    assert scraped == start + 5  # render() flushed first

"""[metrics] settings and the scrape endpoint's address rule, and the Grafana dashboard's
queries checked against the metric names Garrison really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import garrison.limits.redis_backend  # registers its metric in REGISTRY
import garrison.observe.request_metrics  # noqa: F401 - registers the per-request metrics
from garrison.auth.service import AuthService
from garrison.config import ConfigError, MetricsConfig, validate
from garrison.observe.metrics import REGISTRY
from garrison.pipeline.metrics_endpoint import MetricsEndpoint

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-garrison.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


def test_default_allows_loopback_only() -> None:
    config = validate({}).metrics
    assert config.allow == ["127.0.0.0/8", "::1/128"] and config.admin_role is True


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "localhost", "1.2.3"])
def test_bad_network_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate({"metrics": {"allow": [bad]}})
    assert "metrics.allow" in str(info.value) and bad in str(info.value)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.alow"):
        validate({"metrics": {"alow": []}})


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("192.0.2.1", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_allowed_addresses(ip: str, allowed: bool) -> None:
    config = MetricsConfig(allow=["127.0.0.1/32", "::1/128", "10.1.0.0/16"])
    endpoint = MetricsEndpoint(config, AuthService.__new__(AuthService))
    assert endpoint.allowed(ip) is allowed


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_dashboard_queries_name_only_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    known = exported_names()
    used = {name for expr in exprs for name in re.findall(r"\bgarrison_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries no garrison metric"
    assert used <= known, sorted(used - known)
    wanted = {
        "garrison_requests_total",
        "garrison_request_duration_seconds_bucket",
        "garrison_upstream_duration_seconds_bucket",
        "garrison_auth_failures_total",
        "garrison_tokens_total",
        "garrison_limit_refusals_total",
        "garrison_upstream_in_flight",
        "garrison_upstream_queued",
        "garrison_tls_handshakes_total",
        "garrison_certificate_expiry_timestamp_seconds",
        "garrison_client_cert_verifications_total",
    }
    assert wanted <= used, sorted(wanted - used)

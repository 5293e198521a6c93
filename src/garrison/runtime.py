"""What one configuration generation needs at request time, built once (at start and on reload).

Connections read `state.runtime` per request, so a reload swaps everything atomically while
requests already in flight finish with the generation they started with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from garrison import admin
from garrison.admin.guard import AdminGuard
from garrison.admin.service import AdminService
from garrison.auth.service import AuthService
from garrison.config import Config, TimeoutsConfig
from garrison.http.upstream import UpstreamPool
from garrison.limits.fair import FairGate
from garrison.limits.memory import MemoryBackend
from garrison.limits.model import Backend, Budget, Rate
from garrison.observe import metrics
from garrison.observe.accesslog import AccessLog
from garrison.observe.audit import AuditLog
from garrison.pipeline.auth_endpoints import AuthEndpoints
from garrison.pipeline.authorise import Authorise
from garrison.pipeline.client_cert import ClientCertCheck
from garrison.pipeline.cors import cors_stage
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.pipeline.exchange import Headers
from garrison.pipeline.forwarding import Forwarding
from garrison.pipeline.identify import Identify
from garrison.pipeline.limits import Limits, LimitsEndpoint, RouteLimits
from garrison.pipeline.metrics_endpoint import MetricsEndpoint
from garrison.pipeline.pipeline import Pipeline
from garrison.pipeline.pki_endpoints import PkiEndpoints
from garrison.pipeline.routes import RouteTable
from garrison.pipeline.routing import RouteMatch
from garrison.pipeline.target import RequestTarget
from garrison.pki.ca import CertificateAuthority

log = logging.getLogger("garrison")


@dataclass(slots=True)
class Runtime:
    config: Config
    pipeline: Pipeline
    pools: dict[str, UpstreamPool]
    security_headers: Headers
    timeouts: TimeoutsConfig
    max_body: int
    max_header_bytes: int
    max_headers: int
    access_log: AccessLog
    endpoints: GatewayEndpoints
    audit: AuditLog
    client_certs: bool = False
    metrics: bool = True  # [metrics] enabled: per-request counters and histograms

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def security_headers(config: Config) -> Headers:
    server = config.server
    hsts = b"max-age=%d" % int(server.hsts_max_age)
    if server.hsts_include_subdomains:
        hsts += b"; includeSubDomains"
    headers: Headers = [(b"strict-transport-security", hsts)] if server.hsts_max_age else []
    headers.append((b"x-content-type-options", b"nosniff"))
    headers.append((b"referrer-policy", server.referrer_policy.encode()))
    return headers


def limits_stage(config: Config, backend: Backend, gates: dict[str, FairGate]) -> list[Limits]:
    """The limits stage, or nothing when no route or upstream sets a limit."""
    routes = {
        index: RouteLimits(
            rates=tuple(Rate.parse(r) for r in route.rate),
            concurrency=route.concurrency,
            budget=Budget.parse(route.tokens) if route.tokens else None,
            queue_timeout=route.queue_timeout,
        )
        for index, route in enumerate(config.route)
        if route.rate or route.concurrency or route.tokens
    }
    wanted = {u.name: u.max_in_flight for u in config.upstream if u.max_in_flight}
    for name in list(gates):
        if gates[name].slots != wanted.get(name):
            del gates[name]  # a changed size starts a new gate; requests on the old finish there
    for name, slots in wanted.items():
        gates.setdefault(name, FairGate(slots))
    if not routes and not gates:
        return []
    return [Limits(backend, routes, dict(gates))]


def build_runtime(
    config: Config,
    access_log: AccessLog,
    auth: AuthService,
    build_crl: Callable[[], bytes] | None = None,
    limits_backend: Backend | None = None,
    gates: dict[str, FairGate] | None = None,
    audit: AuditLog | None = None,
    ca: CertificateAuthority | None = None,
) -> Runtime:
    """Build the pipeline and pools for `config` (the request path's shape lives here)."""
    pools = {
        u.name: UpstreamPool(
            u.name, u.host, u.port, config.server.timeouts.upstream_connect, u.max_idle_connections
        )
        for u in config.upstream
    }
    metrics.track_upstreams(pools)
    audit = audit if audit is not None else AuditLog.disabled()
    endpoints = GatewayEndpoints()
    auth_endpoints = AuthEndpoints(auth, audit)
    auth_endpoints.register(endpoints)
    PkiEndpoints(auth.revocation, build_crl).register(endpoints)
    if config.metrics.enabled:
        MetricsEndpoint(config.metrics, auth).register(endpoints)
    backend = limits_backend or MemoryBackend()
    endpoints.add("/.garrison/limits", LimitsEndpoint(backend, [r.path for r in config.route]))
    if config.admin.enabled:
        if config.admin.require_client_cert and config.client_certs.mode == "off":
            log.warning(
                "[admin] require_client_cert is set but [client_certs] mode is off: "
                "no client certificate is ever asked for, so nobody can use the admin"
            )
        admin.install(
            endpoints,
            AdminService(auth, audit, config, ca),
            AdminGuard(config.admin, auth, audit),
        )
    forwarding = Forwarding(config.server.trusted_proxies)
    client_certs = config.client_certs.mode != "off"
    cert_check = (
        [ClientCertCheck(config.client_certs, auth.revocation, audit)] if client_certs else []
    )
    pipeline = Pipeline(
        [
            RequestTarget(),
            forwarding,  # first: backoff and logs need the real client IP
            *cert_check,  # before endpoints: "required" covers the login page too
            endpoints,
            RouteMatch(RouteTable(config.route)),
            *cors_stage(config),  # before identify: preflights carry no credentials
            Identify(auth, auth_endpoints.token),
            Authorise(auth),
            *limits_stage(
                config, limits_backend or MemoryBackend(), {} if gates is None else gates
            ),
        ]
    )
    return Runtime(
        config=config,
        pipeline=pipeline,
        pools=pools,
        security_headers=security_headers(config),
        timeouts=config.server.timeouts,
        max_body=config.server.max_body,
        max_header_bytes=config.server.max_header_bytes,
        max_headers=config.server.max_headers,
        access_log=access_log,
        endpoints=endpoints,
        audit=audit,
        client_certs=client_certs,
        metrics=config.metrics.enabled,
    )

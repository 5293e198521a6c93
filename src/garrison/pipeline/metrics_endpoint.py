"""`/.garrison/metrics`: the Prometheus exposition, for allowed addresses or admins only.

The client address is the one Forwarding resolved (trusted_proxies only), so a public client
behind a local reverse proxy is not taken for a loopback one. Anyone else must show a session
or bearer credential of a user with role `admin`; a refusal is a bare 403 that says nothing
about the metrics. Nothing is cached: the text is rendered per scrape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from garrison.auth.identity import Identity
from garrison.auth.service import AuthFailure, AuthService
from garrison.auth.sessions import COOKIE
from garrison.config import MetricsConfig
from garrison.netaddr import NetworkList
from garrison.observe import metrics
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import StageResult

PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
ADMIN = "admin"


class MetricsEndpoint:
    def __init__(self, config: MetricsConfig, auth: AuthService) -> None:
        self.networks = NetworkList(config.allow)
        self.admin_role = config.admin_role
        self.auth = auth

    def register(self, endpoints: GatewayEndpoints) -> None:
        endpoints.add("/.garrison/metrics", self)

    def __call__(self, ex: Exchange) -> StageResult:
        if ex.method not in ("GET", "HEAD"):
            return error_reply(405, "method_not_allowed", "GET only", html=False)
        if self.allowed(ex.client_ip or ex.peer_ip):
            return _exposition()
        if not self.admin_role:
            return _refused()
        pending = self._identity(ex)
        if pending is None or isinstance(pending, Identity):
            return _exposition() if _is_admin(pending) else _refused()
        return self._later(pending)

    def allowed(self, ip: str) -> bool:
        return ip in self.networks

    def _identity(self, ex: Exchange) -> Identity | Awaitable[Identity | None] | None:
        now = time.time()
        try:
            authorization = ex.header(b"authorization")
            if authorization is not None:
                scheme, _, credential = authorization.partition(b" ")
                text = credential.strip().decode("latin-1")
                if scheme.lower() != b"bearer" or not text:
                    return None
                if text.startswith("gk_"):
                    return self.auth.identify_key(text, now)
                return self.auth.identify_token(text, now)
            cookie = ex.cookie(COOKIE)
            if cookie is not None:
                return self.auth.identify_session(cookie, now)
        except AuthFailure:
            return None
        return None

    @staticmethod
    async def _later(pending: Awaitable[Identity | None]) -> Reply:
        try:
            ident = await pending
        except Exception:  # a bad credential or an unreachable store: refuse (fail closed)
            return _refused()
        return _exposition() if _is_admin(ident) else _refused()


def _is_admin(ident: Identity | None) -> bool:
    return ident is not None and ADMIN in ident.roles


def _exposition() -> Reply:
    return Reply(200, metrics.render(), PROMETHEUS_TYPE)  # gateway replies carry no-store


def _refused() -> Reply:
    return error_reply(403, "forbidden", "not allowed", html=False)

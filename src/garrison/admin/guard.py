"""Who may use the admin UI and API: one check in front of every admin page and call.

In order: the client address (after trusted_proxies, as for /.garrison/metrics) must be in
`[admin] allow` (loopback by default); a cross-site request is refused whatever it carries;
a credential (session cookie, bearer JWT or API key) must name a user with role `admin`; a
credential restricted by scopes (an API key, a scoped token) must hold scope `admin`; with
`require_client_cert`, the connection's verified client certificate must be the same user's.

The endpoints stage runs before the Identify stage, so the credential is read here, the same
way Identify reads it. A refusal says only "not allowed" (the client does not learn which
check failed); the audit log gets `admin_refused` with the reason. Only a request with no
usable credential at all is told to sign in (401 JSON, or a redirect to the login page).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from urllib.parse import quote

from sqlalchemy.exc import SQLAlchemyError

from garrison.auth.identity import Identity
from garrison.auth.service import AuthFailure, AuthService
from garrison.auth.sessions import COOKIE
from garrison.config import AdminConfig
from garrison.netaddr import NetworkList
from garrison.observe.audit import AuditLog
from garrison.pipeline.auth_endpoints import cross_site
from garrison.pipeline.exchange import Exchange, Reply, error_reply

log = logging.getLogger("garrison.admin")

ADMIN = "admin"  # the role, and the scope a restricted credential needs
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED = "You are not allowed to use the Garrison admin interface."


class _Refusal(Exception):
    def __init__(self, reason: str, identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.identity = identity


class AdminGuard:
    """Built per runtime generation from `[admin]`; `check` is called once per admin request."""

    def __init__(
        self, config: AdminConfig, auth: AuthService, audit: AuditLog | None = None
    ) -> None:
        self.config = config
        self.networks = NetworkList(config.allow)
        self.auth = auth
        self.audit = audit if audit is not None else AuditLog.disabled()

    def allowed_address(self, ip: str) -> bool:
        return ip in self.networks

    @staticmethod
    def same_origin(ex: Exchange) -> bool:
        """No sign of another site (Origin / Sec-Fetch-Site): what a form post must show."""
        return not cross_site(ex)

    @staticmethod
    def proven_same_origin(ex: Exchange) -> bool:
        """Positive proof of the same origin: Origin is this site, or Sec-Fetch-Site says so."""
        origin = ex.header(b"origin")
        if origin is not None:
            return origin.decode("latin-1") == f"https://{ex.host}"
        return ex.header(b"sec-fetch-site") == b"same-origin"

    async def check(self, ex: Exchange) -> Identity | Reply:
        """The admin's Identity, or the Reply that refuses the request."""
        try:
            ident = await self._check(ex)
        except _Refusal as refusal:
            return self._refuse(ex, refusal)
        except (SQLAlchemyError, OSError) as exc:  # fail closed, and say it is not the caller
            log.error("admin: identity store unavailable: %s", exc)
            reply = error_reply(
                503, "auth_unavailable", "cannot check credentials right now", html=ex.wants_html()
            )
            reply.headers.append((b"retry-after", b"5"))
            return reply
        if ident is None:
            return self._sign_in(ex)
        ex.identity = ident  # the request's audit line names the admin
        return ident

    async def _check(self, ex: Exchange) -> Identity | None:
        if not self.config.enabled:
            raise _Refusal("disabled")
        if not self.allowed_address(ex.client_ip or ex.peer_ip):
            raise _Refusal("address")
        if cross_site(ex):
            raise _Refusal("cross_site")
        pending = self._identity(ex)
        ident = pending if pending is None or isinstance(pending, Identity) else await pending
        if ident is None:
            return None
        if ADMIN not in ident.roles:
            raise _Refusal("role", ident)
        if ident.scopes is not None and ADMIN not in ident.scopes:
            raise _Refusal("scope", ident)
        if self.config.require_client_cert:
            cert = ex.cert_identity
            if cert is None or cert.name != ident.name:
                raise _Refusal("client_cert", ident)
        return ident

    def _identity(self, ex: Exchange) -> Identity | Awaitable[Identity | None] | None:
        """The caller, in Identify's order: Authorization, X-API-Key, then the session cookie.
        A presented credential that fails is a refusal, never a reason to try the next one."""
        now = time.time()
        try:
            authorization = ex.header(b"authorization")
            if authorization is not None:
                scheme, _, credential = authorization.partition(b" ")
                text = credential.strip().decode("latin-1")
                if scheme.lower() != b"bearer" or not text:
                    raise _Refusal("credential")
                if text.startswith("gk_"):
                    return _awaitable_failure(self.auth.identify_key(text, now))
                return _awaitable_failure(self.auth.identify_token(text, now))
            api_key = ex.header(b"x-api-key")
            if api_key is not None:
                return _awaitable_failure(self.auth.identify_key(api_key.decode("latin-1"), now))
            cookie = ex.cookie(COOKIE)
            if cookie is not None:
                return self.auth.identify_session(cookie, now)
        except AuthFailure:
            raise _Refusal("credential") from None
        return None

    def _refuse(self, ex: Exchange, refusal: _Refusal) -> Reply:
        ident = refusal.identity
        fields: dict[str, object] = {
            "reason": refusal.reason,
            "client_ip": ex.client_ip or ex.peer_ip,
            "method": ex.method,
            "path": ex.path,
        }
        if ident is not None:
            fields["identity"] = ident.name
            fields["auth"] = ident.method
        self.audit.event("admin_refused", fields)
        return error_reply(403, "forbidden", REFUSED, html=ex.wants_html())

    @staticmethod
    def _sign_in(ex: Exchange) -> Reply:
        if ex.wants_html() and ex.method in ("GET", "HEAD"):
            target = quote(ex.path, safe="/.-_~")
            reply = Reply.redirect(f"/.garrison/login?next={target}", 303)
            reply.code = "login_required"
            return reply
        reply = error_reply(401, "login_required", "sign in as an administrator", html=False)
        reply.headers.append((b"www-authenticate", b'Bearer realm="garrison-admin"'))
        return reply


def _awaitable_failure(
    result: Identity | Awaitable[Identity],
) -> Identity | Awaitable[Identity | None]:
    """An identify_* result whose later AuthFailure becomes a refusal (not a crash)."""
    if isinstance(result, Identity):
        return result

    async def wait() -> Identity | None:
        try:
            return await result
        except AuthFailure:
            raise _Refusal("credential") from None

    return wait()

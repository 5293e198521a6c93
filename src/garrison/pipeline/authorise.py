"""Stage: may this caller use this route (DESIGN §1 "authorise"), and what the upstream learns.

No identity: a browser navigating to a page is sent to the login page, anything else gets a
401 JSON answer with a `WWW-Authenticate` challenge (RFC 6750). An identity the route's
`allow` does not admit gets 403. Admitted callers are described to the upstream by
X-Forwarded-User, X-Forwarded-Email, X-Garrison-Roles and X-Garrison-Assertion (a short-lived
JWT signed by Garrison, verifiable against /.garrison/jwks.json); incoming headers of those
names were already dropped by the data plane.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

from garrison.auth.identity import Identity, header_value
from garrison.auth.service import AuthService
from garrison.pipeline.exchange import Exchange, Headers, Reply, error_reply
from garrison.pipeline.pipeline import Stage
from garrison.pipeline.routes import CompiledRoute

LOGIN_PATH = "/.garrison/login"
REFRESH_MARGIN = 60.0


class Authorise(Stage):
    name = "authorise"

    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    def __call__(self, ex: Exchange) -> Reply | None:
        route = ex.route
        assert route is not None
        if route.public:
            return None
        ident = ex.identity
        cert = ex.cert_identity
        if cert is not None and "client_cert" in route.methods:
            ident, mismatch = _combine(route, ident, cert)
            if mismatch:
                return refusal_reply(ex, "mismatch")
            ex.identity = ident
        elif ident is not None and not _accepted(route, ident.method):
            ident = None  # e.g. "client_cert+session" with a session but no certificate
        if ident is None:
            return self.challenge(ex, route)
        refusal = _refusal(ident, route)
        if refusal is not None:
            return refusal_reply(ex, refusal)
        now = time.time()
        cached = ident.headers.get(route.upstream)
        if cached is None or cached[1] - REFRESH_MARGIN < now:
            cached = self._headers(ident, route.upstream, now)
            ident.headers[route.upstream] = cached
        ex.identity_block = cached[0]
        return None

    def _headers(self, ident: Identity, upstream: str, now: float) -> tuple[bytes, float]:
        assertion, until = self.auth.assertion(ident, upstream, now)
        headers: Headers = [(b"x-forwarded-user", header_value(ident.name))]
        if ident.email:
            headers.append((b"x-forwarded-email", header_value(ident.email)))
        headers.append((b"x-garrison-roles", header_value(",".join(ident.roles))))
        headers.append((b"x-garrison-assertion", assertion.encode("ascii")))
        return b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers), until

    @staticmethod
    def challenge(ex: Exchange, route: CompiledRoute) -> Reply:
        if ex.auth_error:
            return invalid_token(ex.auth_error)
        if all("client_cert" in entry for entry in route.entries) and ex.cert_identity is None:
            # Only a certificate can open this route: a login page would not help.
            message = (
                "this page needs a client certificate: install the certificate (.p12 file) "
                "your administrator gave you, then reload"
            )
            return error_reply(403, "client_cert_required", message, html=ex.wants_html())
        if "session" in route.methods and ex.method in ("GET", "HEAD") and ex.wants_html():
            target = ex.path + ("?" + ex.query.decode("latin-1") if ex.query else "")
            location = f"{LOGIN_PATH}?next={quote(target, safe='')}"
            return Reply(
                302,
                b"",
                b"text/plain",
                [(b"location", location.encode("ascii"))],
                code="login_required",
            )
        reply = error_reply(401, "authentication_required", _needs(route), html=False)
        reply.headers.append((b"www-authenticate", b'Bearer realm="garrison"'))
        return reply


def invalid_token(reason: str) -> Reply:
    """401 for a credential that was presented and refused (RFC 6750 §3.1)."""
    reply = error_reply(401, "invalid_token", reason, html=False)
    description = json.dumps(reason)[1:-1].replace('"', "'")
    challenge = f'Bearer realm="garrison", error="invalid_token", error_description="{description}"'
    reply.headers.append((b"www-authenticate", challenge.encode("ascii", "replace")))
    return reply


def _accepted(route: CompiledRoute, method: str) -> bool:
    return method in route.singles


def _combine(
    route: CompiledRoute, ident: Identity | None, cert: Identity
) -> tuple[Identity | None, bool]:
    """(admitted identity or None, mismatch) when a valid certificate came with the request.

    Entries are tried shortest first: a plain method admits its identity alone, "client_cert"
    admits the certificate, "client_cert+X" needs X's identity to name the certificate's
    person (else a mismatch: 403, not a login prompt)."""
    mismatch = False
    for entry in route.entries:
        if "client_cert" not in entry:
            if ident is not None and entry == {ident.method}:
                return ident, False
        elif len(entry) == 1:
            return cert, False
        elif ident is not None and ident.method in entry:
            if ident.name == cert.name:
                return ident, False
            mismatch = True
    return None, mismatch


def _needs(route: CompiledRoute) -> str:
    names = {
        "session": "a login session",
        "api_key": "an API key",
        "jwt": "a bearer token",
        "client_cert": "a client certificate",
    }
    accepted = [names[m] for m in names if m in route.methods]
    return "authentication required: send " + " or ".join(accepted)


def _refusal(ident: Identity, route: CompiledRoute) -> str | None:
    if route.allow_users and ident.name not in route.allow_users:
        return "user"
    if route.allow_roles and route.allow_roles.isdisjoint(ident.roles):
        return "role"
    if (
        route.allow_scopes
        and ident.scopes is not None
        and route.allow_scopes.isdisjoint(ident.scopes)
    ):
        return "scope"
    return None


def refusal_reply(ex: Exchange, what: str) -> Reply:
    messages = {
        "user": "this route is not open to your account",
        "role": "your account lacks a role this route requires",
        "scope": "your credential lacks a scope this route requires",
        "mismatch": "your client certificate and your login belong to different people",
    }
    reply = error_reply(403, f"forbidden_{what}", messages[what], html=ex.wants_html())
    if what == "scope":
        reply.headers.append(
            (b"www-authenticate", b'Bearer realm="garrison", error="insufficient_scope"')
        )
    return reply

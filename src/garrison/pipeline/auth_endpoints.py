"""Gateway endpoints for people and scripts: login, logout, token, JWKS (under /.garrison/).

Every state-changing endpoint refuses a cross-site request (Origin / Sec-Fetch-Site), and the
login form also carries a double-submit CSRF token. Password checks (argon2) run in a thread,
behind per-account backoff (in the store) and per-IP backoff (in memory).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, unquote

from garrison.auth.identity import Identity
from garrison.auth.pages import login_page, logout_page
from garrison.auth.service import AuthFailure, AuthService
from garrison.auth.sessions import COOKIE
from garrison.observe.audit import AuditLog
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply, error_reply

CSRF_COOKIE = "__Host-garrison-csrf"
MAX_FORM = 16 * 1024
LOGIN_FAILED = "Invalid user name or password."


def _cookie(name: str, value: str, max_age: int | None, same_site: str = "Lax") -> bytes:
    parts = [f"{name}={value}", "Path=/", "Secure", "HttpOnly", f"SameSite={same_site}"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode("ascii")


def safe_next(value: str | None) -> str:
    """Only a path on this site: never //host, /\\host, a scheme, or the login page itself."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 32 or c == "\\" for c in value) or value.startswith("/.garrison/log"):
        return "/"
    return value


def cross_site(ex: Exchange) -> bool:
    """True for a request a browser sent from another site (CSRF), by Origin or Fetch metadata."""
    origin = ex.header(b"origin")
    if origin is not None and origin.decode("latin-1") != f"https://{ex.host}":
        return True
    site = ex.header(b"sec-fetch-site")
    return site is not None and site not in (b"same-origin", b"none")


def _html(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return Reply(status, body, b"text/html; charset=utf-8", headers or [])


def _oauth_error(status: int, error: str, description: str) -> Reply:
    reply = Reply.json(status, {"error": error, "error_description": description})
    reply.code = error
    if status == 401:
        reply.headers.append((b"www-authenticate", b'Basic realm="garrison"'))
    return reply


def _params(ex: Exchange, body: bytes) -> dict[str, str]:
    """Form or JSON body as flat string fields; ValueError when it is neither."""
    ctype = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
    text = body.decode("utf-8")
    if ctype == b"application/json":
        data = json.loads(text) if text else {}
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    if ctype in (b"application/x-www-form-urlencoded", b""):
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=32, strict_parsing=False)
        return {k: v[0] for k, v in fields.items()}
    raise ValueError("send application/x-www-form-urlencoded or application/json")


class AuthEndpoints:
    """Registers the handlers on the gateway's endpoint router."""

    def __init__(self, auth: AuthService, audit: AuditLog | None = None) -> None:
        self.auth = auth
        self.audit = audit if audit is not None else AuditLog.disabled()

    def _account(self, typed: str) -> str | None:
        """The account a login named, for the audit line; None when no such account exists:
        people type passwords into the user name field, and that must not reach a log."""
        return typed if typed in self.auth.directory else None

    def register(self, endpoints: GatewayEndpoints) -> None:
        endpoints.add("/.garrison/login", self.login)
        endpoints.add("/.garrison/logout", self.logout)
        endpoints.add("/.garrison/token", self.token)
        endpoints.add("/.garrison/jwks.json", self.jwks)

    # -- login ----------------------------------------------------------------------------------
    def login(self, ex: Exchange) -> Reply | Any:
        if ex.method in ("GET", "HEAD"):
            next_path = safe_next(_query_param(ex, "next"))
            return self._form(next_path)
        if ex.method != "POST":
            return _method_not_allowed(ex, b"GET, HEAD, POST")
        return self._login_post(ex)

    def _form(
        self, next_path: str, username: str = "", error: str = "", status: int = 200
    ) -> Reply:
        csrf = secrets.token_urlsafe(24)
        cookie = _cookie(CSRF_COOKIE, csrf, 3600, same_site="Strict")
        return _html(
            status, login_page(csrf, next_path, username, error), [(b"set-cookie", cookie)]
        )

    async def _login_post(self, ex: Exchange) -> Reply:
        try:
            fields = _params(ex, await ex.read_body(MAX_FORM))
        except BodyTooLarge:
            return error_reply(413, "body_too_large", "login form too large", html=True)
        except (ValueError, UnicodeDecodeError):
            return error_reply(400, "bad_form", "the login form could not be read", html=True)
        next_path = safe_next(fields.get("next"))
        username = fields.get("username", "")[:64]
        cookie_token = ex.cookie(CSRF_COOKIE) or ""
        form_token = fields.get("csrf", "")
        if (
            cross_site(ex)
            or not cookie_token
            or not hmac.compare_digest(cookie_token.encode(), form_token.encode())
        ):
            return self._form(next_path, username, "Your sign-in form expired; try again.", 403)
        now = time.time()
        wait = self.auth.ip_blocked_for(ex.client_ip or ex.peer_ip, now)
        if wait > 0:
            reply = self._form(
                next_path, username, f"Too many failed attempts; wait {int(wait) + 1} s.", 429
            )
            reply.headers.append((b"retry-after", str(int(wait) + 1).encode()))
            self._login_event(ex, "login_blocked", username, "ip_backoff", wait_s=int(wait) + 1)
            return reply
        result = await self.auth.login(username, fields.get("password", ""), now)
        if result is None:
            self.auth.ip_failed(ex.client_ip or ex.peer_ip, now)
            self._login_event(ex, "login_failed", username, "bad_credentials")
            return self._form(next_path, username, LOGIN_FAILED, 401)
        self.auth.ip_succeeded(ex.client_ip or ex.peer_ip)
        self._login_event(ex, "login_ok", result[1].name, "")
        old = ex.cookie(COOKIE)
        if old:
            await self.auth.logout(old)  # a fresh id at every login (no session fixation)
        value, _user = result
        max_age = int(self.auth.config.session_max)
        return Reply(
            303,
            b"",
            b"text/plain",
            [
                (b"location", next_path.encode("latin-1")),
                (b"set-cookie", _cookie(COOKIE, value, max_age)),
                (b"set-cookie", _cookie(CSRF_COOKIE, "", 0, same_site="Strict")),
            ],
        )

    def _login_event(
        self, ex: Exchange, event: str, typed: str, reason: str, **extra: object
    ) -> None:
        fields: dict[str, object] = {
            "user": self._account(typed),
            "client_ip": ex.client_ip or ex.peer_ip,
            "path": ex.path,
            **extra,
        }
        if reason:
            fields["reason"] = reason
        self.audit.event(event, fields)

    # -- logout ---------------------------------------------------------------------------------
    def logout(self, ex: Exchange) -> Reply | Any:
        if ex.method in ("GET", "HEAD"):
            return _html(200, logout_page(ex.cookie(COOKIE) is not None))
        if ex.method != "POST":
            return _method_not_allowed(ex, b"GET, HEAD, POST")
        return self._logout_post(ex)

    async def _logout_post(self, ex: Exchange) -> Reply:
        if cross_site(ex):
            return error_reply(403, "cross_site", "cross-site sign-out refused", html=True)
        try:
            fields = _params(ex, await ex.read_body(MAX_FORM))
        except (BodyTooLarge, ValueError, UnicodeDecodeError):
            fields = {}
        cookie = ex.cookie(COOKIE)
        if cookie:
            everywhere = fields.get("everywhere") in ("1", "true", "on")
            user = self.auth.session_user(cookie)
            await self.auth.logout(cookie, everywhere=everywhere)
            self.audit.event(
                "logout",
                {"user": user, "client_ip": ex.client_ip or ex.peer_ip, "everywhere": everywhere},
            )
        return Reply(
            303,
            b"",
            b"text/plain",
            [
                (b"location", b"/.garrison/logout"),
                (b"set-cookie", _cookie(COOKIE, "", 0)),
            ],
        )

    # -- token (OAuth2 password and client-credentials grants) -------------------------------------
    def token(self, ex: Exchange) -> Reply | Any:
        if ex.method != "POST":
            return _method_not_allowed(ex, b"POST")
        if cross_site(ex) and not ex.cors_allowed:  # allowed: a route's [cors] names the origin
            return _oauth_error(403, "access_denied", "cross-site token request refused")
        return self._token(ex)

    async def _token(self, ex: Exchange) -> Reply:
        try:
            fields = _params(ex, await ex.read_body(MAX_FORM))
        except BodyTooLarge:
            return _oauth_error(413, "invalid_request", "request body too large")
        except (ValueError, UnicodeDecodeError) as exc:
            return _oauth_error(400, "invalid_request", f"unreadable request body: {exc}")
        grant = fields.get("grant_type") or ("password" if "username" in fields else "")
        requested = fields["scope"].split() if fields.get("scope") else None
        if grant == "password":
            return await self._password_grant(ex, fields, requested)
        if grant == "client_credentials":
            return await self._client_grant(ex, fields, requested)
        return _oauth_error(
            400, "unsupported_grant_type", "use grant_type=password or client_credentials"
        )

    async def _password_grant(
        self, ex: Exchange, fields: dict[str, str], requested: list[str] | None
    ) -> Reply:
        ip = ex.client_ip or ex.peer_ip
        now = time.time()
        wait = self.auth.ip_blocked_for(ip, now)
        if wait > 0:
            reply = _oauth_error(429, "slow_down", "too many failed attempts from this address")
            reply.headers.append((b"retry-after", str(int(wait) + 1).encode()))
            self._token_event(
                ex, "token_refused", fields.get("username", ""), "password", "ip_backoff"
            )
            return reply
        user = await self.auth.check_password(
            fields.get("username", ""), fields.get("password", ""), now
        )
        if user is None:
            self.auth.ip_failed(ip, now)
            self._token_event(
                ex, "token_refused", fields.get("username", ""), "password", "bad_credentials"
            )
            return _oauth_error(400, "invalid_grant", "invalid user name or password")
        self.auth.ip_succeeded(ip)
        reply = self._issued(user.name, user.roles, user.email, requested)
        self._token_event(ex, "token_issued", user.name, "password", "", scopes=requested)
        return reply

    async def _client_grant(
        self, ex: Exchange, fields: dict[str, str], requested: list[str] | None
    ) -> Reply:
        secret = fields.get("client_secret") or _basic_secret(ex) or ""
        try:
            result = self.auth.identify_key(secret, time.time())
            ident: Identity = result if isinstance(result, Identity) else await result
        except AuthFailure as exc:
            self._token_event(ex, "token_refused", "", "client_credentials", str(exc))
            return _oauth_error(401, "invalid_client", str(exc))
        granted = sorted(ident.scopes or ())
        key = {"key_id": ident.key_id}
        if requested is not None:
            if not set(requested) <= set(granted):
                self._token_event(
                    ex, "token_refused", ident.name, "client_credentials", "invalid_scope", **key
                )
                return _oauth_error(400, "invalid_scope", "the key does not hold these scopes")
            granted = requested
        reply = self._issued(ident.name, ident.roles, ident.email, granted)
        self._token_event(
            ex, "token_issued", ident.name, "client_credentials", "", scopes=granted, **key
        )
        return reply

    def _token_event(
        self, ex: Exchange, event: str, who: str, grant: str, reason: str, **extra: object
    ) -> None:
        fields: dict[str, object] = {
            "identity": who if who.startswith("key:") else self._account(who),
            "grant": grant,
            "client_ip": ex.client_ip or ex.peer_ip,
            "path": ex.path,
            **extra,
        }
        if reason:
            fields["reason"] = reason
        self.audit.event(event, fields)

    def _issued(
        self, subject: str, roles: tuple[str, ...], email: str | None, scopes: list[str] | None
    ) -> Reply:
        token, expires_in = self.auth.issue_token(subject, roles, email, scopes)
        payload: dict[str, object] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }
        if scopes is not None:
            payload["scope"] = " ".join(scopes)
        return Reply.json(200, payload, [(b"pragma", b"no-cache")])

    # -- JWKS -----------------------------------------------------------------------------------
    def jwks(self, ex: Exchange) -> Reply:
        if ex.method not in ("GET", "HEAD"):
            return _method_not_allowed(ex, b"GET, HEAD")
        return Reply.json(200, self.auth.signing.jwks())


def _basic_secret(ex: Exchange) -> str | None:
    value = ex.header(b"authorization")
    if value is None or value[:6].lower() != b"basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return unquote(decoded.partition(":")[2]) or None


def _query_param(ex: Exchange, name: str) -> str | None:
    if not ex.query:
        return None
    values = parse_qs(ex.query.decode("latin-1"), max_num_fields=32).get(name)
    return values[0] if values else None


def _method_not_allowed(ex: Exchange, allow: bytes) -> Reply:
    reply = error_reply(405, "method_not_allowed", "method not allowed here", html=ex.wants_html())
    reply.headers.append((b"allow", allow))
    return reply

"""The JSON admin API under /.garrison/api/: a thin layer over AdminService.

Every call passes the AdminGuard first (so an unknown path is a 403 for a non-admin, not a
404 that maps the API). Then: route by the table below (404 JSON for an unknown path, 405
with Allow for a known path and another method), CSRF for cookie-authenticated unsafe calls
(same origin proven by Origin or Sec-Fetch-Site, and the `X-Garrison-CSRF: 1` header that a
cross-site form cannot send), a bounded body read, pydantic validation (422 with the field
paths, never the values), and the service. An unexpected exception is a 500 with an id that
is also in the server log; the client never sees a traceback.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError

from garrison.admin import models as m
from garrison.admin.guard import AdminGuard
from garrison.admin.service import AdminError, AdminService
from garrison.admin.views import CertView, KeyView, Overview, SessionView, UserView
from garrison.auth.identity import Identity
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply

if TYPE_CHECKING:
    from garrison.pipeline.endpoints import GatewayEndpoints

log = logging.getLogger("garrison.admin")

PREFIX = "/.garrison/api"
MAX_BODY = 64 * 1024
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_HEADER = b"x-garrison-csrf"
_PARAMS = {
    "name": m.NAME,
    "key_id": m.KEY_ID,
    "serial": m.SERIAL,
    "session_id": m.SESSION_ID,
}
Params = dict[str, str]
Result = tuple[int, object]
Call = Callable[[AdminService, Identity, Params, Any], Awaitable[Result]]


@dataclass(frozen=True)
class Op:
    """One operation: the router, the validator and the OpenAPI document all read it."""

    method: str
    path: str  # under PREFIX, with {name} placeholders
    call: Call
    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    response: Any = None  # a model, a view dataclass, or list[...] of one
    regex: re.Pattern[str] = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        pattern = re.sub(
            r"\{(\w+)\}", lambda g: f"(?P<{g[1]}>{_PARAMS[g[1]].strip('^$')})", self.path
        )
        object.__setattr__(self, "regex", re.compile(pattern + r"\Z"))


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _users(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.list_users()


async def _user_add(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 201, await s.create_user(a, b.name, b.password, b.roles, b.email)


async def _user_get(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.get_user(p["name"])


async def _user_patch(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    view = await s.get_user(p["name"])
    if b.roles is not None:
        view = await s.set_roles(a, p["name"], b.roles)
    if b.disabled is not None:
        view = await s.set_user_disabled(a, p["name"], b.disabled)
    return 200, view


async def _user_password(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.reset_password(a, p["name"], b.password)


async def _user_sessions_revoke(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, {"revoked": await s.revoke_user_sessions(a, p["name"])}


async def _keys(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.list_keys()


async def _key_add(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    view, secret = await s.create_key(
        a, b.name, b.owner, b.scopes, (), b.rate, b.tokens, b.expires_days
    )
    return 201, {"key": _plain(view), "secret": secret}


async def _key_get(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.get_key(p["key_id"])


async def _key_revoke(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.revoke_key(a, p["key_id"])


async def _key_rotate(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    view, secret = await s.rotate_key(a, p["key_id"], b.grace_seconds)
    return 200, {"key": _plain(view), "secret": secret}


async def _key_limits(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.set_key_limits(a, p["key_id"], b.rate, b.tokens)


async def _certs(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.list_certs()


async def _cert_add(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    view, p12 = await s.issue_cert(a, b.name, b.roles, b.days, b.p12_password, b.email)
    return 201, {"cert": _plain(view), "p12": _b64(p12)}


async def _cert_revoke(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.revoke_cert(a, p["serial"], b.reason)


async def _cert_renew(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    view, p12 = await s.renew_cert(a, p["serial"], b.p12_password, b.days)
    return 201, {"cert": _plain(view), "p12": _b64(p12)}


async def _sessions(s: AdminService, a: Identity, p: Params, q: Any) -> Result:
    return 200, await s.list_sessions(q.user)


async def _session_revoke(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    await s.revoke_session(a, p["session_id"])
    return 200, {"revoked": 1}


async def _audit(s: AdminService, a: Identity, p: Params, q: Any) -> Result:
    return 200, await s.search_audit(
        q.identity, q.route, q.status, q.since, q.until, q.event, q.limit
    )


async def _overview(s: AdminService, a: Identity, p: Params, b: Any) -> Result:
    return 200, await s.overview()


OPS: tuple[Op, ...] = (
    Op("GET", "/overview", _overview, "Traffic, errors, limit hits, upstreams, expiries",
       response=Overview),
    Op("GET", "/users", _users, "List users", response=list[UserView]),
    Op("POST", "/users", _user_add, "Create a user", m.UserCreate, status=201,
       response=UserView),
    Op("GET", "/users/{name}", _user_get, "One user", response=UserView),
    Op("PATCH", "/users/{name}", _user_patch, "Disable/enable a user, or set their roles",
       m.UserPatch, response=UserView),
    Op("POST", "/users/{name}/password", _user_password,
       "Set a new password (ends the user's sessions)", m.PasswordReset, response=UserView),
    Op("DELETE", "/users/{name}/sessions", _user_sessions_revoke,
       "End every session of a user", response=m.Revoked),
    Op("GET", "/keys", _keys, "List API keys (never a secret)", response=list[KeyView]),
    Op("POST", "/keys", _key_add, "Create an API key (its secret is shown once)", m.KeyCreate,
       status=201, response=m.KeyCreated),
    Op("GET", "/keys/{key_id}", _key_get, "One API key", response=KeyView),
    Op("DELETE", "/keys/{key_id}", _key_revoke, "Revoke an API key at once",
       response=KeyView),
    Op("POST", "/keys/{key_id}/rotate", _key_rotate,
       "Give a key a new secret (shown once)", m.KeyRotate, response=m.KeyCreated),
    Op("PUT", "/keys/{key_id}/limits", _key_limits, "Set a key's own rates and token budget",
       m.KeyLimits, response=KeyView),
    Op("GET", "/certs", _certs, "List client certificates", response=list[CertView]),
    Op("POST", "/certs", _cert_add, "Issue a client certificate (.p12 returned once)",
       m.CertIssue, status=201, response=m.CertIssued),
    Op("POST", "/certs/{serial}/revoke", _cert_revoke, "Revoke a client certificate",
       m.CertRevoke, response=CertView),
    Op("POST", "/certs/{serial}/renew", _cert_renew,
       "Renew a client certificate (.p12 returned once; the old one is superseded)",
       m.CertRenew, status=201, response=m.CertIssued),
    Op("GET", "/sessions", _sessions, "List live sessions", query=m.SessionParams,
       response=list[SessionView]),
    Op("DELETE", "/sessions/{session_id}", _session_revoke, "End one session",
       response=m.Revoked),
    Op("GET", "/audit", _audit, "Search the audit log, newest first", query=m.AuditParams,
       response=list[m.AuditRecord]),
)  # fmt: skip


def _error(status: int, code: str, message: str, **extra: object) -> Reply:
    reply = Reply.json(status, {"error": {"code": code, "message": message, **extra}})
    reply.code = code
    return reply


def _invalid(exc: ValidationError, where: str) -> Reply:
    fields = [
        {
            "loc": ".".join([where, *(str(p) for p in e["loc"])]),
            "msg": e["msg"],
            "type": e["type"],
        }
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
    return _error(422, "invalid", "the request is not valid", fields=fields[:50])


class AdminApi:
    """Registered under /.garrison/api/ (see garrison.admin.install)."""

    def __init__(self, service: AdminService, guard: AdminGuard) -> None:
        self.service = service
        self.guard = guard
        self._openapi: bytes | None = None

    def register(self, endpoints: GatewayEndpoints) -> None:
        endpoints.add_prefix(PREFIX + "/", self)

    def routes(self) -> list[tuple[str, str]]:
        """Every (method, path) served, for tests that must cover them all."""
        return [("GET", PREFIX + "/openapi.json")] + [(op.method, PREFIX + op.path) for op in OPS]

    def __call__(self, ex: Exchange) -> Awaitable[Reply]:
        return self._handle(ex)

    async def _handle(self, ex: Exchange) -> Reply:
        try:
            checked = await self.guard.check(ex)
            if isinstance(checked, Reply):
                return checked
            return await self._dispatch(ex, checked)
        except AdminError as exc:
            return _error(exc.status, exc.code, exc.message)
        except Exception:
            incident = secrets.token_hex(6)
            log.exception("admin API failure %s on %s %s", incident, ex.method, ex.path)
            return _error(500, "internal_error", "the admin API failed", id=incident)

    async def _dispatch(self, ex: Exchange, actor: Identity) -> Reply:
        path = ex.path[len(PREFIX) :].rstrip("/") or "/"
        method = "GET" if ex.method == "HEAD" else ex.method
        if path == "/openapi.json":
            if method != "GET":
                return _not_allowed(["GET"])
            return Reply(200, self._openapi_doc(), b"application/json")
        candidates = [(op, match) for op in OPS if (match := op.regex.match(path))]
        if not candidates:
            return _error(404, "not_found", "no such admin API endpoint")
        chosen = next(((op, mt) for op, mt in candidates if op.method == method), None)
        if chosen is None:
            return _not_allowed([op.method for op, _ in candidates])
        op, match = chosen
        if method in UNSAFE and actor.method == "session" and not self._csrf_ok(ex):
            self.guard.audit.event(
                "admin_refused",
                {"reason": "csrf", "identity": actor.name, "method": ex.method, "path": ex.path},
            )
            return _error(
                403, "csrf", "send X-Garrison-CSRF: 1 from the same origin with a session"
            )
        args: Any = None
        if op.query is not None:
            parsed = _query(ex)
            if isinstance(parsed, Reply):
                return parsed
            try:
                args = op.query.model_validate(parsed)
            except ValidationError as exc:
                return _invalid(exc, "query")
        if method in UNSAFE:
            body = await _body(ex, op.body)
            if isinstance(body, Reply):
                return body
            args = body
        status, payload = await op.call(self.service, actor, match.groupdict(), args)
        return Reply.json(status, _plain(payload))

    def _csrf_ok(self, ex: Exchange) -> bool:
        return ex.header(CSRF_HEADER) == b"1" and self.guard.proven_same_origin(ex)

    def _openapi_doc(self) -> bytes:
        if self._openapi is None:
            from garrison.admin.openapi import document

            self._openapi = json.dumps(document(OPS, PREFIX), separators=(",", ":")).encode()
        return self._openapi


def _not_allowed(methods: list[str]) -> Reply:
    allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
    reply = _error(405, "method_not_allowed", f"use {', '.join(allowed)}")
    reply.headers.append((b"allow", ", ".join(allowed).encode()))
    return reply


def _query(ex: Exchange) -> dict[str, str] | Reply:
    if not ex.query:
        return {}
    try:
        fields = parse_qs(
            ex.query.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
            max_num_fields=32,
        )  # fmt: skip
    except (UnicodeDecodeError, ValueError):
        return _error(400, "bad_query", "the query string could not be read")
    repeated = [name for name, values in fields.items() if len(values) > 1]
    if repeated:
        return _error(422, "invalid", f"give {repeated[0]!r} once")
    return {name: values[0] for name, values in fields.items()}


async def _body(ex: Exchange, model: type[BaseModel] | None) -> BaseModel | Reply | None:
    try:
        raw = await ex.read_body(MAX_BODY)
    except BodyTooLarge:
        return _error(413, "body_too_large", f"the body is over {MAX_BODY} bytes")
    if model is None:
        return None
    ctype = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if raw.strip() and ctype != b"application/json":
        return _error(415, "unsupported_media_type", "send application/json")
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        return _error(400, "bad_json", "the body is not valid JSON")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        return _invalid(exc, "body")
    except RecursionError:
        return _error(400, "bad_json", "the body is nested too deeply")

"""Stage: who is calling (DESIGN §1 "identify"), from the credentials the route accepts.

Order: an `Authorization: Bearer` header (a Garrison API key `gk_...` or a JWT), then
`X-API-Key`, then the session cookie. A credential that is presented but wrong is an error
(`ex.auth_error`), never silently skipped in favour of another one. The credential Garrison
consumed is removed from what the upstream receives: the app never sees a key, a token or a
session id it could leak.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from garrison.auth.apikeys import parse_key
from garrison.auth.identity import Identity
from garrison.auth.service import AuthFailure, AuthService
from garrison.auth.sessions import COOKIE
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import Stage, StageResult

Resolver = Callable[[str, float], Identity | Awaitable[Identity] | None]
log = logging.getLogger("garrison.auth")
_COOKIE_PREFIX = COOKIE.encode() + b"="
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"cookie"})


class Identify(Stage):
    name = "identify"

    def __init__(
        self, auth: AuthService, token_endpoint: Callable[[Exchange], StageResult]
    ) -> None:
        self.auth = auth
        self.token_endpoint = token_endpoint

    def __call__(self, ex: Exchange) -> StageResult:
        route = ex.route
        assert route is not None
        if route.token_alias is not None and ex.path == route.token_alias:
            return self.token_endpoint(ex)
        if route.public:
            return None
        methods = route.methods
        authorization = api_key = None
        has_cookie = False
        for name, value in ex.headers:  # one set lookup per header: this runs on every request
            if name in _CREDENTIAL_HEADERS:
                if name == b"authorization":
                    authorization = value
                elif name == b"x-api-key":
                    api_key = value
                else:
                    has_cookie = True
        now = time.time()
        if authorization is not None:
            scheme, _, credential = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not credential.strip():
                ex.auth_error = "use Authorization: Bearer <API key or token>"
                return None
            text = credential.strip().decode("latin-1")
            _drop(ex, b"authorization", authorization)
            if text.startswith("gk_"):
                if "api_key" not in methods:
                    ex.auth_error = "API keys are not accepted on this route"
                    return None
                return self._resolve_key(ex, text, now)
            if "jwt" not in methods:
                ex.auth_error = "bearer tokens are not accepted on this route"
                return None
            return self._resolve(ex, self.auth.identify_token, text, now)
        if api_key is not None:
            _drop(ex, b"x-api-key", api_key)
            if "api_key" not in methods:
                ex.auth_error = "API keys are not accepted on this route"
                return None
            return self._resolve_key(ex, api_key.decode("latin-1"), now)
        if has_cookie and "session" in methods:
            cookie = ex.cookie(COOKIE)
            if cookie is not None:
                _drop_cookie(ex)
                return self._resolve(ex, self.auth.identify_session, cookie, now)
        return None

    def _resolve_key(self, ex: Exchange, text: str, now: float) -> StageResult:
        return self._resolve(ex, self.auth.identify_key, text, now, key=True)

    def _resolve(
        self, ex: Exchange, resolver: Resolver, text: str, now: float, key: bool = False
    ) -> StageResult:
        try:
            result = resolver(text, now)
        except AuthFailure as exc:
            _refused(ex, exc, text if key else "")
            return None
        if result is None or isinstance(result, Identity):
            ex.identity = result
            return None
        return self._wait(ex, result, text if key else "")

    @staticmethod
    async def _wait(ex: Exchange, pending: Awaitable[Identity | None], key: str) -> Reply | None:
        try:
            ex.identity = await pending
        except AuthFailure as exc:
            _refused(ex, exc, key)
        except (SQLAlchemyError, OSError) as exc:
            # Fail closed, but say what happened: a 401 would tell the client its key is bad.
            log.error("identity store unavailable: %s", exc)
            reply = error_reply(
                503,
                "auth_unavailable",
                "cannot check credentials right now; try again",
                html=ex.wants_html(),
            )
            reply.headers.append((b"retry-after", b"5"))
            return reply
        return None


def _refused(ex: Exchange, failure: AuthFailure, key: str) -> None:
    """A presented credential was refused; an API key's id (not a secret) is kept for the
    logs, so that the audit says which key was turned away."""
    ex.auth_error = str(failure)
    parsed = parse_key(key) if key else None
    if parsed is not None:
        ex.refused_key_id = parsed[0]


def _drop(ex: Exchange, header: bytes, value: bytes) -> None:
    """Remove every copy of a consumed credential header (list.remove: no list rebuilt)."""
    headers = ex.headers
    headers.remove((header, value))
    for name, _ in headers:
        if name == header:
            ex.headers = [(n, v) for n, v in headers if n != header]
            return


def _drop_cookie(ex: Exchange) -> None:
    """Remove the session cookie (and only it) from the Cookie header(s) sent upstream."""
    kept: list[tuple[bytes, bytes]] = []
    for name, value in ex.headers:
        if name == b"cookie":
            parts = [p for p in value.split(b";") if not p.strip().startswith(_COOKIE_PREFIX)]
            value = b";".join(parts).strip()
            if not value:
                continue
        kept.append((name, value))
    ex.headers = kept

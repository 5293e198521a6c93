"""What flows through the pipeline: the Exchange (one request) and the Reply (an early answer).

Stages never see sockets or protocol objects, only these, so the data plane can change without
touching a stage.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from garrison.auth.identity import Identity
    from garrison.pipeline.routes import CompiledRoute
    from garrison.pki.peer import PeerCert

Headers = list[tuple[bytes, bytes]]


class BodySource(Protocol):
    """The request body, for the few gateway endpoints that read one (login, token)."""

    def read_body(self, limit: int) -> Awaitable[bytes]: ...


class ResponseObserver(Protocol):
    """Sees the response body on its way to the client and may rewrite it (usage events)."""

    rewrites: bool

    def begin(self, content_type: bytes | None) -> None: ...

    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class BodyTooLarge(Exception):
    """The body is longer than the endpoint accepts."""


@dataclass(slots=True)
class Exchange:
    """One request on its way through the gateway. Header names are lower-case bytes."""

    method: str
    target: bytes
    version: str
    headers: Headers
    peer_ip: str
    tls: bool = True
    client_ip: str = ""
    host: str = ""
    path: str = ""
    query: bytes = b""
    route: CompiledRoute | None = None
    upstream_target: bytes = b""
    forwarded_prefix: str = ""
    upstream_headers: Headers = field(default_factory=list)
    identity_block: bytes = b""
    # Header lines (`name: value\r\n`, already serialised) for whatever the client gets: the
    # proxied response or the gateway's own reply (rate limit state, CORS). Bytes, not a list
    # of pairs: one concatenation per stage instead of tuples walked again at write time.
    response_head_extra: bytes = b""
    # The CORS stage admitted this request's Origin by name (not through "*"): the token
    # alias then accepts the cross-site call, which a browser page on that origin makes.
    cors_allowed: bool = False
    started: float = 0.0
    stage: str = ""
    identity: Identity | None = None
    peer_cert: PeerCert | None = None
    cert_identity: Identity | None = None
    auth_error: str = ""
    # The id part of an API key that was presented and refused (revoked, expired, unknown):
    # not a secret, and what an operator needs to see who was refused.
    refused_key_id: str = ""
    body_source: BodySource | None = None
    # Set by stages that hold something until the request ends (a concurrency slot, a GPU
    # slot, a token budget): each is called exactly once, however the request ends.
    on_finish: list[Callable[[], None]] | None = None
    body_override: bytes | None = None  # a rewritten request body (token budgets)
    response_observer: ResponseObserver | None = None

    finished: bool = False

    def finally_(self, hook: Callable[[], None]) -> None:
        """Run `hook` when the request ends (at once if it already has)."""
        if self.finished:
            hook()
        elif self.on_finish is None:
            self.on_finish = [hook]
        else:
            self.on_finish.append(hook)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def cookie(self, name: str) -> str | None:
        """The value of one cookie, or None. Parsed only when asked for."""
        prefix = name + "="
        for key, value in self.headers:
            if key != b"cookie":
                continue
            for part in value.decode("latin-1").split(";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix) :]
        return None

    async def read_body(self, limit: int) -> bytes:
        """The whole (small) request body; BodyTooLarge past `limit` bytes."""
        if self.body_source is None:
            return b""
        return await self.body_source.read_body(limit)

    def wants_html(self) -> bool:
        """Browsers get HTML error pages; API clients (JSON or no text/html) get JSON."""
        accept = (self.header(b"accept") or b"").lower()
        return b"text/html" in accept and b"application/json" not in accept


@dataclass(slots=True)
class Reply:
    """An answer produced by the gateway itself instead of the upstream."""

    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: Headers = field(default_factory=list)
    code: str = ""  # why, for the audit log: the error code, or login_required, ...

    @classmethod
    def json(cls, status: int, payload: object, headers: Headers | None = None) -> Reply:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, body, b"application/json", headers or [])

    @classmethod
    def redirect(cls, location: str, status: int = 301) -> Reply:
        return cls(status, b"", b"text/plain", [(b"location", location.encode("latin-1"))])


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

_ERROR_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{status} {title}</title>
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;background:#f5f6f8;color:#1f2933;
margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}}
main{{background:#fff;border-radius:12px;box-shadow:0 2px 12px rgba(0,0,0,.08);padding:2.5rem 3rem;
max-width:34rem}}
h1{{margin:0 0 .5rem;font-size:1.4rem}} p{{line-height:1.5;margin:.5rem 0}}
code{{color:#52606d;font-size:.85rem}}
</style></head>
<body><main><h1>{status} {title}</h1><p>{message}</p><p><code>{code}</code></p></main></body></html>
"""


def error_reply(status: int, code: str, message: str, *, html: bool) -> Reply:
    """An error in the form the client reads: a small HTML page or a JSON object. Never a trace."""
    if html:
        page = _ERROR_PAGE.format(
            status=status,
            title=_TITLES.get(status, "Error"),
            message=escape(message),
            code=escape(code),
        )
        return Reply(status, page.encode(), b"text/html; charset=utf-8", code=code)
    reply = Reply.json(status, {"error": {"code": code, "message": message}})
    reply.code = code
    return reply


class Stage(Protocol):
    """One step of the pipeline: answer with a Reply to end the request, or None to go on."""

    name: str

    def __call__(self, ex: Exchange) -> Awaitable[Reply | None]: ...


StageFunc = Callable[[Exchange], Awaitable[Reply | None]]

"""Rendering for the admin web UI: the jinja2 environment, CSRF and flash cookies, page replies.

Everything here is stateless across requests and processes: the CSRF token is a double-submit
cookie (SameSite=Strict) echoed in a hidden field, and a flash message travels in a short-lived
cookie, so a gateway running several worker processes needs no shared memory for the UI.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from garrison.pipeline.exchange import Exchange, Reply

BASE = "/.garrison/admin/"
STATIC = BASE + "static/"
CSRF_COOKIE = "__Host-garrison-admin-csrf"
FLASH_COOKIE = "__Host-garrison-admin-flash"
CSRF_FIELD = "csrf"
FLASH_MAX = 300
HERE = Path(__file__).resolve().parent

# No inline script or style anywhere: the one stylesheet and the one (optional) script are
# served by the gateway itself. form-action 'self' keeps a tampered page from posting elsewhere.
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"cache-control", b"no-store"),
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]
_TYPES = {
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}


def cookie(name: str, value: str, max_age: int | None) -> bytes:
    """A __Host- cookie: Secure, Path=/, HttpOnly (no script reads any of them), Strict."""
    parts = [f"{name}={value}", "Path=/", "Secure", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode("ascii")


def csrf_ok(ex: Exchange, form_token: str) -> bool:
    """The double-submit check: the cookie (which another site cannot read or set) equals the
    hidden field; compared in constant time."""
    cookie_token = ex.cookie(CSRF_COOKIE) or ""
    if len(cookie_token) < 16 or not form_token:
        return False
    return hmac.compare_digest(cookie_token.encode(), form_token.encode())


def flash_cookie(kind: str, text: str) -> bytes:
    """A message for the next page (post-redirect-get). Never carries a secret."""
    data = json.dumps([kind, text[:FLASH_MAX]], separators=(",", ":")).encode()
    return cookie(FLASH_COOKIE, base64.urlsafe_b64encode(data).decode().rstrip("="), 60)


def read_flash(ex: Exchange) -> tuple[str, str] | None:
    raw = ex.cookie(FLASH_COOKIE)
    if not raw:
        return None
    try:
        kind, text = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, TypeError, binascii.Error):
        return None
    if kind not in ("ok", "error") or not isinstance(text, str):
        return None
    return kind, text[:FLASH_MAX]


def _moment(value: object) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str):
        try:
            return _moment(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def when(value: object) -> str:
    """Epoch seconds, datetime or ISO text as `2026-11-23 11:40` (UTC, as the sidebar says)."""
    moment = _moment(value)
    if moment is None:
        return "—" if value in (None, "") else str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def when_exact(value: object) -> str:
    moment = _moment(value)
    if moment is None:
        return "—" if value in (None, "") else str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def badge(status: object) -> str:
    """The CSS class for a status word: green for live, red for dead, amber for soon-dead."""
    word = str(status or "").lower()
    if word in ("active", "valid", "ok", "enabled", "healthy", "allowed", "up"):
        return "badge ok"
    if word in ("revoked", "disabled", "refused", "down", "unhealthy", "failed", "error"):
        return "badge bad"
    if word in ("expired", "unknown"):
        return "badge muted"
    return "badge warn"


def status_class(value: object) -> str:
    try:
        code = int(str(value))
    except ValueError:
        return "badge muted"
    return "badge ok" if code < 400 else ("badge warn" if code < 500 else "badge bad")


def joined(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(str(v) for v in sorted(value, key=str))
    return str(value)


class Assets:
    """The static files, read once; URLs carry a content hash, so they can be cached forever."""

    def __init__(self, folder: Path = HERE / "static") -> None:
        self.files: dict[str, tuple[bytes, bytes]] = {}
        self.version: dict[str, str] = {}
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.suffix in _TYPES:
                data = path.read_bytes()
                self.files[path.name] = (data, _TYPES[path.suffix])
                self.version[path.name] = hashlib.sha256(data).hexdigest()[:12]

    def url(self, name: str) -> str:
        return f"{STATIC}{name}?v={self.version.get(name, '0')}"

    def reply(self, name: str) -> Reply | None:
        found = self.files.get(name)
        if found is None:
            return None
        data, ctype = found
        return Reply(
            200,
            data,
            ctype,
            [
                (b"cache-control", b"private, max-age=31536000, immutable"),
                (b"x-content-type-options", b"nosniff"),
            ],
        )


class Renderer:
    """Turns a template and a context into a finished page reply (headers, cookies, flash)."""

    def __init__(self, templates: Path = HERE / "templates") -> None:
        self.assets = Assets()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            when=when, when_exact=when_exact, badge=badge, status_class=status_class, joined=joined
        )
        self.env.globals.update(base=BASE, static=self.assets.url, csrf_field=CSRF_FIELD, values={})

    def page(
        self,
        ex: Exchange,
        template: str,
        status: int = 200,
        *,
        admin: str = "",
        **context: Any,
    ) -> Reply:
        """A full page. Sets the CSRF cookie when the browser has none and uses up the flash."""
        headers = list(PAGE_HEADERS)
        token = ex.cookie(CSRF_COOKIE) or ""
        if len(token) < 16:
            token = secrets.token_urlsafe(32)
            headers.append((b"set-cookie", cookie(CSRF_COOKIE, token, None)))
        flash = context.pop("flash", None) or read_flash(ex)
        if ex.cookie(FLASH_COOKIE) is not None:
            headers.append((b"set-cookie", cookie(FLASH_COOKIE, "", 0)))
        html = self.env.get_template(template).render(
            csrf=token, flash=flash, admin=admin, **context
        )
        reply = Reply(status, html.encode(), b"text/html; charset=utf-8", headers)
        if status >= 400:
            reply.code = "admin_" + template.removesuffix(".html")
        return reply


def redirect(to: str, kind: str = "", text: str = "") -> Reply:
    """303 to a page of the UI (PRG), with a flash message for it when given."""
    headers = [(b"location", (BASE + to).encode("latin-1")), (b"cache-control", b"no-store")]
    if text:
        headers.append((b"set-cookie", flash_cookie(kind or "ok", text)))
    return Reply(303, b"", b"text/plain", headers)

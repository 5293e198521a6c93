"""The admin UI's form posts: one small function per change, each calling the admin service.

The caller (AdminUI.post) has already checked the guard, the same-origin rule and the CSRF
token. A success redirects with a flash (post-redirect-get); an AdminError redirects back with
its message, which the service promises is safe to show (a refused create form is shown again,
filled in). The four answers that carry a secret
(a new or rotated key, a new or renewed .p12) are pages, sent once with `no-store`: the secret
is never stored by the UI and never reachable again.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from garrison.admin.service import AdminError
from garrison.admin.ui_render import redirect
from garrison.pipeline.exchange import Exchange, Reply

if TYPE_CHECKING:
    from garrison.admin.ui import AdminUI
    from garrison.auth.identity import Identity

Form = dict[str, str]
Action = Callable[["AdminUI", Exchange, "Identity", Form], Awaitable[Reply]]
MAX_FORM = 16 * 1024
_SPLIT = re.compile(r"[\s,]+")
_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


def read_form(ex: Exchange, body: bytes) -> Form:
    """An urlencoded form as flat fields; ValueError for any other body."""
    ctype = (ex.header(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != b"application/x-www-form-urlencoded":
        raise ValueError("not a form")
    fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    return {k: v[0] for k, v in fields.items()}


def words(text: str) -> tuple[str, ...]:
    """`admin, user ops` -> ("admin", "user", "ops"): roles and scopes as typed."""
    return tuple(dict.fromkeys(w for w in _SPLIT.split(text.strip()) if w))


class BadInput(Exception):
    """A form field the UI itself cannot read; `message` is shown as a flash."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


Refusal = (AdminError, BadInput)


def rates(text: str) -> list[str] | None:
    """`60/minute, 1000/day` -> ["60/minute", "1000/day"]; None (the routes' own) if empty.
    Split on commas only: a rate may be typed with spaces (`60 / minute`)."""
    return [r.strip() for r in text.split(",") if r.strip()] or None


def number(text: str, what: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 9:
        raise BadInput(f"{what} must be a whole number.")
    return int(text)


def _to(page: str, **query: str) -> str:
    return page + ("?" + urlencode(query) if query else "")


async def _change(call: Awaitable[Any], ok: str, ok_text: str, back: str | None = None) -> Reply:
    """Run one service change; redirect to `ok` with a flash, or back with the error."""
    try:
        await call
    except Refusal as exc:
        return redirect(back or ok, "error", exc.message)
    return redirect(ok, "ok", ok_text)


# -- users ----------------------------------------------------------------------------------
async def user_create(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    name = form.get("name", "").strip()
    try:
        await ui.service.create_user(
            who,
            name,
            form.get("password", ""),
            words(form.get("roles", "")),
            email=form.get("email", "").strip() or None,
        )
    except Refusal as exc:
        return await ui.again(ex, who, "users", form, exc.message)
    return redirect("users", "ok", f"User {name} created.")


def _user_action(disabled: bool) -> Action:
    async def act(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
        name = form.get("name", "")
        call = ui.service.set_user_disabled(who, name, disabled)
        text = f"User {name} {'disabled' if disabled else 'enabled'}."
        return await _change(call, _to("users/edit", name=name), text)

    return act


async def user_password(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    name = form.get("name", "")
    call = ui.service.reset_password(who, name, form.get("password", ""))
    return await _change(call, _to("users/edit", name=name), f"Password of {name} changed.")


async def user_roles(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    name = form.get("name", "")
    call = ui.service.set_roles(who, name, words(form.get("roles", "")))
    return await _change(call, _to("users/edit", name=name), f"Roles of {name} saved.")


# -- API keys -------------------------------------------------------------------------------
def _key_secret_page(
    ui: AdminUI, ex: Exchange, who: Identity, key: Any, secret: str, rotated: bool
) -> Reply:
    """The one page that shows a new (or rotated) key's secret."""
    return ui.page(
        ex,
        who,
        "key_secret.html",
        title="API key",
        nav="keys",
        key=key,
        secret=secret,
        rotated=rotated,
    )


async def key_create(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    try:
        key, secret = await ui.service.create_key(
            who,
            form.get("name", "").strip(),
            owner=form.get("owner", "").strip() or None,
            scopes=words(form.get("scopes", "")),
            rate=rates(form.get("rate", "")),
            tokens=form.get("tokens", "").strip() or None,
            expires_days=number(form.get("expires_days", ""), "Expiry"),
        )
    except Refusal as exc:
        return await ui.again(ex, who, "keys", form, exc.message)
    return _key_secret_page(ui, ex, who, key, secret, rotated=False)


async def key_revoke(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    key_id = form.get("id", "")
    return await _change(ui.service.revoke_key(who, key_id), "keys", f"Key {key_id} revoked.")


async def key_rotate(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    key_id = form.get("id", "")
    try:
        grace = number(form.get("grace_seconds", ""), "The grace period") or 0
        key, secret = await ui.service.rotate_key(who, key_id, grace_seconds=grace)
    except Refusal as exc:
        return redirect(_to("keys/edit", id=key_id), "error", exc.message)
    return _key_secret_page(ui, ex, who, key, secret, rotated=True)


async def key_limits(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    key_id = form.get("id", "")
    call = ui.service.set_key_limits(
        who, key_id, rates(form.get("rate", "")), form.get("tokens", "").strip() or None
    )
    return await _change(call, _to("keys/edit", id=key_id), "Limits saved.")


# -- client certificates ----------------------------------------------------------------------
def _p12_page(
    ui: AdminUI,
    ex: Exchange,
    who: Identity,
    cert: Any,
    p12: bytes,
    password: str,
    generated: bool,
    renewed: bool,
) -> Reply:
    filename = (_FILENAME.sub("-", cert.name).strip("-.") or "client") + ".p12"
    return ui.page(
        ex,
        who,
        "cert_issued.html",
        title="Client certificate",
        nav="certs",
        cert=cert,
        p12_b64=base64.b64encode(p12).decode("ascii"),
        filename=filename,
        password=password if generated else "",
        renewed=renewed,
    )


def _password(form: Form) -> tuple[str, bool]:
    typed = form.get("p12_password", "")
    return (typed, False) if typed else (secrets.token_urlsafe(15), True)


async def cert_issue(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    password, generated = _password(form)
    try:
        cert, p12 = await ui.service.issue_cert(
            who,
            form.get("name", "").strip(),
            roles=words(form.get("roles", "")),
            days=number(form.get("days", ""), "Validity"),
            p12_password=password,
        )
    except Refusal as exc:
        return await ui.again(ex, who, "certs", form, exc.message)
    return _p12_page(ui, ex, who, cert, p12, password, generated, renewed=False)


async def cert_renew(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    serial = form.get("serial", "")
    password, generated = _password(form)
    try:
        cert, p12 = await ui.service.renew_cert(who, serial, p12_password=password)
    except Refusal as exc:
        return redirect("certs", "error", exc.message)
    return _p12_page(ui, ex, who, cert, p12, password, generated, renewed=True)


async def cert_revoke(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    serial = form.get("serial", "")
    call = ui.service.revoke_cert(who, serial, reason=form.get("reason") or "unspecified")
    return await _change(call, "certs", "Certificate revoked.")


# -- sessions ---------------------------------------------------------------------------------
async def session_revoke(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    back = _to("sessions", user=form["user"]) if form.get("user") else "sessions"
    return await _change(
        ui.service.revoke_session(who, form.get("id", "")), back, "Session revoked."
    )


async def sessions_revoke_user(ui: AdminUI, ex: Exchange, who: Identity, form: Form) -> Reply:
    user = form.get("user", "")
    call = ui.service.revoke_user_sessions(who, user)
    return await _change(call, _to("sessions", user=user), f"{user} is signed out everywhere.")


ACTIONS: dict[str, Action] = {
    "users/create": user_create,
    "users/disable": _user_action(True),
    "users/enable": _user_action(False),
    "users/password": user_password,
    "users/roles": user_roles,
    "keys/create": key_create,
    "keys/revoke": key_revoke,
    "keys/rotate": key_rotate,
    "keys/limits": key_limits,
    "certs/issue": cert_issue,
    "certs/renew": cert_renew,
    "certs/revoke": cert_revoke,
    "sessions/revoke": session_revoke,
    "sessions/revoke-user": sessions_revoke_user,
}

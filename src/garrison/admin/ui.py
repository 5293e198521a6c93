"""The admin web UI at /.garrison/admin/: server-rendered pages over the admin service.

Every request under the prefix, the stylesheet included, passes the admin guard first. Pages
are GETs that only read; every change is a POST that carries the CSRF token and passes the
guard's same-origin check, then redirects (post-redirect-get) with a flash message. POST
answers that are pages: those that show a secret once (a new key's secret, a new certificate's
.p12), and a refused create form shown again. Nothing is kept between requests, so any worker
process can answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from garrison.admin.service import AdminError
from garrison.admin.ui_actions import ACTIONS, MAX_FORM, read_form
from garrison.admin.ui_render import BASE, Renderer, csrf_ok, redirect
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply, error_reply

if TYPE_CHECKING:
    from garrison.admin.guard import AdminGuard
    from garrison.admin.service import AdminService
    from garrison.auth.identity import Identity
    from garrison.pipeline.endpoints import GatewayEndpoints

Query = dict[str, str]
PageHandler = Callable[..., Awaitable[Reply]]  # (ui, ex, who, query, **context)
SECRET_FIELDS = ("csrf", "password", "p12_password")
AUDIT_LIMIT = 200
AUDIT_EVENTS = (
    "request",
    "admin_refused",
    "login_ok",
    "login_failed",
    "login_blocked",
    "logout",
    "token_issued",
    "token_refused",
    "user_added",
    "user_disabled",
    "user_enabled",
    "user_password_changed",
    "user_roles_changed",
    "key_created",
    "key_revoked",
    "key_rotated",
    "key_limits_changed",
    "cert_issued",
    "cert_renewed",
    "cert_revoked",
    "client_cert_refused",
    "session_revoked",
)
AUDIT_KEYS = (
    "ts",
    "event",
    "status",
    "decision",
    "identity",
    "user",
    "by",
    "key_id",
    "client_ip",
    "method",
    "path",
    "route",
    "reason",
    "stage",
)
CERT_REASONS = (  # the CRL's reason codes, as the certificate store names them
    ("unspecified", "Unspecified"),
    ("keyCompromise", "Key compromise"),
    ("superseded", "Superseded"),
    ("affiliationChanged", "Affiliation changed"),
    ("cessationOfOperation", "No longer used"),
)


def _query(ex: Exchange) -> Query:
    if not ex.query:
        return {}
    try:
        fields = parse_qs(ex.query.decode("utf-8"), max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0][:256] for k, v in fields.items()}


class AdminUI:
    """Registers one prefix route and answers every page and form under it."""

    def __init__(self, service: AdminService, guard: AdminGuard) -> None:
        self.service = service
        self.guard = guard
        self.render = Renderer()
        self.render.env.globals["cert_reasons"] = dict(CERT_REASONS)

    def register(self, endpoints: GatewayEndpoints) -> None:
        endpoints.add_prefix(BASE, self)

    @staticmethod
    def routes() -> list[tuple[str, str]]:
        """Every page and form, for the tests that must try each one (acceptance 2)."""
        found = [("GET", BASE + page) for page in PAGES]
        found += [("POST", BASE + action) for action in ACTIONS]
        return [*found, ("GET", BASE + "static/admin.css")]

    def __call__(self, ex: Exchange) -> Awaitable[Reply]:
        return self.handle(ex)

    async def handle(self, ex: Exchange) -> Reply:
        who = await self.guard.check(ex)
        if isinstance(who, Reply):
            return who
        if ex.path == BASE[:-1]:
            return Reply.redirect(BASE, 308)
        sub = ex.path[len(BASE) :]
        if sub.startswith("static/"):
            found = self.render.assets.reply(sub[len("static/") :])
            return found or error_reply(404, "not_found", "no such file", html=True)
        if ex.method in ("GET", "HEAD"):
            page = PAGES.get(sub)
            if page is None:
                return self.error(ex, who, 404, "Not found", "There is no such admin page.")
            return await page(self, ex, who, _query(ex))
        if ex.method == "POST":
            return await self.post(ex, who, sub)
        reply = error_reply(405, "method_not_allowed", "GET or POST only", html=True)
        reply.headers.append((b"allow", b"GET, HEAD, POST"))
        return reply

    async def post(self, ex: Exchange, who: Identity, sub: str) -> Reply:
        action = ACTIONS.get(sub)
        if action is None:
            return self.error(ex, who, 404, "Not found", "There is no such admin action.")
        try:
            form = read_form(ex, await ex.read_body(MAX_FORM))
        except BodyTooLarge:
            return self.error(ex, who, 413, "Form too large", "The form was too large.")
        except (ValueError, UnicodeDecodeError):
            return self.error(ex, who, 400, "Unreadable form", "The form could not be read.")
        if not self.guard.same_origin(ex) or not csrf_ok(ex, form.get("csrf", "")):
            return self.error(
                ex,
                who,
                403,
                "Form expired",
                "This form expired or came from another site. Reload the page and try again.",
            )
        return await action(self, ex, who, form)

    def page(
        self, ex: Exchange, who: Identity, template: str, status: int = 200, **context: Any
    ) -> Reply:
        return self.render.page(ex, template, status, admin=who.name, **context)

    async def again(
        self, ex: Exchange, who: Identity, page: str, form: dict[str, str], why: str
    ) -> Reply:
        """A refused create form, shown again with what was typed (never a password) and why:
        retyping a whole form for one bad field is what makes people give up on a tool."""
        typed = {k: v for k, v in form.items() if k not in SECRET_FIELDS}
        return await PAGES[page](self, ex, who, {}, values=typed, flash=("error", why), status=422)

    def error(
        self, ex: Exchange, who: Identity, status: int, title: str, message: str, back: str = ""
    ) -> Reply:
        return self.render.page(
            ex,
            "error.html",
            status,
            admin=who.name,
            title=title,
            message=message,
            back=back,
            nav=back.split("/")[0],
        )


# -- pages (GET) ------------------------------------------------------------------------------
async def overview(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
    ov = await ui.service.overview()
    return ui.page(ex, who, "overview.html", title="Overview", nav="", ov=ov)


async def users(ui: AdminUI, ex: Exchange, who: Identity, q: Query, **extra: Any) -> Reply:
    found = await ui.service.list_users()
    return ui.page(ex, who, "users.html", title="Users", nav="users", users=found, **extra)


async def user_edit(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
    name = q.get("name", "")
    try:
        user = await ui.service.get_user(name)
    except AdminError as exc:
        return ui.error(ex, who, exc.status, "No such user", exc.message, "users")
    sessions = await ui.service.list_sessions(user=name)
    return ui.page(ex, who, "user.html", title=user.name, nav="users", user=user, sessions=sessions)


async def _key(ui: AdminUI, key_id: str) -> Any:
    try:
        return await ui.service.get_key(key_id)
    except AdminError:
        return None


async def _cert(ui: AdminUI, serial: str) -> Any:
    return next((c for c in await ui.service.list_certs() if c.serial == serial), None)


Shown = Callable[[AdminUI, Exchange, "Identity", Any], Reply]


def _about(
    find: Callable[[AdminUI, str], Awaitable[Any]], field: str, section: str, title: str, text: str
) -> Callable[[Shown], PageHandler]:
    """For the pages about one key or certificate, named by the query's `field`: `find` looks
    it up, and one that does not exist is a 404 page (`title`, `text`) that leads back to
    `section`; the decorated function shows the one found."""

    def wrap(show: Shown) -> PageHandler:
        async def page(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
            found = await find(ui, q.get(field, ""))
            if found is None:
                return ui.error(ex, who, 404, title, text, section)
            return show(ui, ex, who, found)

        return page

    return wrap


_about_key = _about(_key, "id", "keys", "No such key", "That API key does not exist.")
_about_cert = _about(_cert, "serial", "certs", "No such certificate", "Unknown serial.")


REVOKE_PAGES = {  # section: (its list's label, the page's title, the button, reasons offered)
    "keys": ("API keys", "Revoke API key", "Revoke key", ()),
    "certs": (
        "Client certificates",
        "Revoke client certificate",
        "Revoke certificate",
        CERT_REASONS,
    ),
}


def _confirm_revoke(
    ui: AdminUI, ex: Exchange, who: Identity, section: str, hidden: dict[str, str], message: str
) -> Reply:
    """The confirm page before a revocation in `section` (REVOKE_PAGES): its form posts
    `hidden` to `<section>/revoke`, and Cancel goes back to the section's list."""
    back_label, title, button, reasons = REVOKE_PAGES[section]
    return ui.page(
        ex,
        who,
        "confirm.html",
        title=title,
        nav=section,
        message=message,
        action=f"{section}/revoke",
        hidden=hidden,
        button=button,
        back=section,
        back_label=back_label,
        reasons=reasons,
    )


async def keys(ui: AdminUI, ex: Exchange, who: Identity, q: Query, **extra: Any) -> Reply:
    found = await ui.service.list_keys()
    return ui.page(ex, who, "keys.html", title="API keys", nav="keys", keys=found, **extra)


@_about_key
def key_edit(ui: AdminUI, ex: Exchange, who: Identity, key: Any) -> Reply:
    return ui.page(ex, who, "key.html", title=key.name, nav="keys", key=key)


@_about_key
def key_revoke(ui: AdminUI, ex: Exchange, who: Identity, key: Any) -> Reply:
    message = (
        f"Revoke the key “{key.name}” ({key.id})? Every request with it is refused "
        "from now on. This cannot be undone."
    )
    return _confirm_revoke(ui, ex, who, "keys", {"id": key.id}, message)


async def certs(ui: AdminUI, ex: Exchange, who: Identity, q: Query, **extra: Any) -> Reply:
    found = await ui.service.list_certs()
    return ui.page(
        ex, who, "certs.html", title="Client certificates", nav="certs", certs=found, **extra
    )


@_about_cert
def cert_renew(ui: AdminUI, ex: Exchange, who: Identity, cert: Any) -> Reply:
    return ui.page(ex, who, "cert_renew.html", title="Renew", nav="certs", cert=cert)


@_about_cert
def cert_revoke(ui: AdminUI, ex: Exchange, who: Identity, cert: Any) -> Reply:
    message = (
        f"Revoke the certificate “{cert.name}”? It goes on the revocation list and "
        "is refused at the next TLS handshake. This cannot be undone."
    )
    return _confirm_revoke(ui, ex, who, "certs", {"serial": cert.serial}, message)


async def sessions(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
    user = q.get("user", "").strip() or None
    found = await ui.service.list_sessions(user=user)
    return ui.page(
        ex,
        who,
        "sessions.html",
        title="Sessions",
        nav="sessions",
        sessions=found,
        user=user,
        current_session=who.session_hash,
    )


async def audit(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
    fields = ("identity", "route", "status", "event", "since", "until")
    shown = {k: q.get(k, "").strip() for k in fields}
    rows: list[dict[str, Any]] = []
    flash: tuple[str, str] | None = None
    status = shown["status"]
    if status and not status.isdigit():
        flash = ("error", "Status must be a number.")
    else:
        try:
            found = await ui.service.search_audit(
                identity=shown["identity"] or None,
                route=shown["route"] or None,
                status=int(status) if status else None,
                since=_epoch(shown["since"]),
                until=_epoch(shown["until"]),
                event=shown["event"] or None,
                limit=AUDIT_LIMIT,
            )
        except AdminError as exc:
            found, flash = [], ("error", exc.message)
        rows = [{k: line.get(k) for k in AUDIT_KEYS} for line in found]
        for row in rows:
            row["identity"] = row["identity"] or row["user"] or row["by"]
    return ui.page(
        ex,
        who,
        "audit.html",
        title="Audit log",
        nav="audit",
        q=shown,
        rows=rows,
        events=AUDIT_EVENTS,
        limit=AUDIT_LIMIT,
        flash=flash,
    )


def _epoch(value: str) -> float | None:
    """A datetime-local value (`2026-11-23T11:40`), taken as UTC, as epoch seconds."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.replace(tzinfo=moment.tzinfo or UTC).timestamp()


async def _root_redirect(ui: AdminUI, ex: Exchange, who: Identity, q: Query) -> Reply:
    return redirect("")


PAGES: dict[str, PageHandler] = {
    "": overview,
    "index.html": _root_redirect,
    "users": users,
    "users/edit": user_edit,
    "keys": keys,
    "keys/edit": key_edit,
    "keys/revoke": key_revoke,
    "certs": certs,
    "certs/renew": cert_renew,
    "certs/revoke": cert_revoke,
    "sessions": sessions,
    "audit": audit,
}

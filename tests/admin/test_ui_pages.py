"""The admin UI's pages and forms, driven in process through the real guard and admin service
(real SQLite, real argon2, real sessions): what the browser test cannot see cheaply — headers,
escaping, every CSRF refusal, the secret shown once, errors as flash messages.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from garrison.admin.guard import AdminGuard
from garrison.admin.service import AdminService
from garrison.admin.ui import AdminUI
from garrison.admin.ui_render import CSRF_COOKIE, FLASH_COOKIE
from garrison.auth.service import AuthService
from garrison.auth.sessions import COOKIE
from garrison.auth.users import Users
from garrison.config import validate
from garrison.observe.audit import AuditLog
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply
from garrison.store.db import open_store

HOST = "gw.test"
BASE = "/.garrison/admin/"
ADMIN_PW = "admin-password-0123"


class Body:
    """A request body source, as the data plane hands one to a local endpoint."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_body(self, limit: int) -> bytes:
        if len(self.data) > limit:
            raise BodyTooLarge
        return self.data


class Browser:
    """Keeps cookies like a browser and sends same-origin requests unless told otherwise."""

    def __init__(self, ui: AdminUI, loop: asyncio.AbstractEventLoop) -> None:
        self.ui = ui
        self.loop = loop
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        ctype: bytes = b"application/x-www-form-urlencoded",
    ) -> Reply:
        target = path.encode()
        raw_path, _, query = path.partition("?")
        sent = [(b"host", HOST.encode()), (b"accept", b"text/html")]
        if self.cookies:
            jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            sent.append((b"cookie", jar.encode()))
        extra = headers or []
        if method == "POST":
            sent.append((b"content-type", ctype))
            if not any(name == b"origin" for name, _ in extra):
                sent.append((b"origin", f"https://{HOST}".encode()))
        sent += extra
        ex = Exchange(method, target, "1.1", sent, "127.0.0.1")
        ex.path, ex.query, ex.host = raw_path, query.encode(), HOST
        ex.body_source = Body(urlencode(form or {}).encode())
        reply = self.loop.run_until_complete(self.ui.handle(ex))
        for name, value in reply.headers:
            if name == b"set-cookie":
                pair = value.decode().split(";")[0]
                key, _, val = pair.partition("=")
                if "Max-Age=0" in value.decode():
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = val
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", BASE + path)

    def post(self, path: str, form: dict[str, str], **kw: object) -> Reply:
        return self.request("POST", BASE + path, form, **kw)  # type: ignore[arg-type]

    @property
    def csrf(self) -> str:
        return self.cookies[CSRF_COOKIE]


def header(reply: Reply, name: bytes) -> str:
    return next((v.decode() for k, v in reply.headers if k == name), "")


def text(reply: Reply) -> str:
    return reply.body.decode()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


@pytest.fixture
def setup(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> tuple[AdminUI, AuthService]:
    engine = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    Users(engine).add("root", ADMIN_PW, roles=["admin"])
    Users(engine).add("carol", "carol-password-0123", roles=["user"])
    config = validate({})
    auth = AuthService(engine, config.auth)
    audit = AuditLog.disabled()
    return AdminUI(AdminService(auth, audit, config), AdminGuard(config.admin, auth, audit)), auth


def signed_in(
    setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop, user: str = "root"
) -> Browser:
    ui, auth = setup
    password = ADMIN_PW if user == "root" else "carol-password-0123"
    result = loop.run_until_complete(auth.login(user, password, time.time()))
    assert result is not None
    browser = Browser(ui, loop)
    browser.cookies[COOKIE] = result[0]
    return browser


@pytest.fixture
def admin(setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop) -> Browser:
    browser = signed_in(setup, loop)
    assert browser.get("").status == 200  # the first page sets the CSRF cookie
    return browser


PAGES = ["", "users", "users/edit?name=root", "keys", "certs", "sessions", "audit"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_is_private_strict_and_signed(admin: Browser, page: str) -> None:
    reply = admin.get(page)
    assert reply.status == 200, text(reply)
    assert reply.content_type.startswith(b"text/html")
    assert header(reply, b"cache-control") == "no-store"
    csp = header(reply, b"content-security-policy")
    assert "default-src 'none'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    body = text(reply)
    assert "<style" not in body and " style=" not in body  # CSS only from the stylesheet
    assert re.search(r"<script(?![^>]*\bsrc=)", body) is None  # no inline script
    assert 'data-testid="signed-in-as">root<' in body
    assert "&amp;#" not in body  # nothing escaped twice
    forms = re.findall(r'<form method="post" action="([^"]+)"[^>]*>(.*?)</form>', body, re.S)
    for action, form in forms:
        if action != "/.garrison/logout":
            assert f'name="csrf" value="{admin.csrf}"' in form, action


def test_pages_and_assets_refused_without_a_session(
    setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop
) -> None:
    anonymous = Browser(setup[0], loop)
    reply = anonymous.get("users")
    assert reply.status == 303
    assert header(reply, b"location").startswith("/.garrison/login?next=")
    assert anonymous.get("static/admin.css").status == 303
    carol = signed_in(setup, loop, "carol")
    for page in ("", "keys", "static/admin.css"):
        assert carol.get(page).status == 403
    assert carol.post("users/create", {"csrf": "x" * 32}).status == 403


def test_stylesheet_is_versioned_by_content_and_cached(admin: Browser) -> None:
    page = text(admin.get(""))
    url = re.search(r'href="(/\.garrison/admin/static/admin\.css\?v=[0-9a-f]{12})"', page)
    assert url is not None
    css = admin.request("GET", url.group(1))
    assert css.status == 200 and css.content_type.startswith(b"text/css")
    assert "immutable" in header(css, b"cache-control")
    assert admin.get("static/nope.css").status == 404
    assert admin.get("no-such-page").status == 404


def test_form_posts_need_the_csrf_token_and_the_same_origin(
    admin: Browser, setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop
) -> None:
    form = {"name": "dave", "password": "dave-password-0123", "roles": "user"}
    assert admin.post("users/create", form).status == 403  # no token in the form
    assert admin.post("users/create", {**form, "csrf": "A" * 43}).status == 403  # wrong token
    cross = [(b"origin", b"https://evil.example")]
    assert admin.post("users/create", {**form, "csrf": admin.csrf}, headers=cross).status == 403
    fetch = [(b"sec-fetch-site", b"cross-site")]
    assert admin.post("users/create", {**form, "csrf": admin.csrf}, headers=fetch).status == 403
    no_cookie = signed_in(setup, loop)  # a session but never loaded a page: no CSRF cookie
    assert no_cookie.post("users/create", {**form, "csrf": admin.csrf}).status == 403
    json_body = admin.post("users/create", {**form, "csrf": admin.csrf}, ctype=b"text/plain")
    assert json_body.status == 400
    assert "dave" not in text(admin.get("users"))

    done = admin.post("users/create", {**form, "csrf": admin.csrf})
    assert done.status == 303
    assert header(done, b"location") == BASE + "users"
    page = admin.get("users")
    assert "User dave created." in text(page)
    assert 'data-user="dave"' in text(page)
    assert FLASH_COOKIE not in admin.cookies  # shown once, then cleared
    assert "User dave created." not in text(admin.get("users"))


def test_service_refusals_become_readable_flash_messages(admin: Browser) -> None:
    form = {"csrf": admin.csrf, "name": "eve", "password": "short", "roles": "ops, user"}
    reply = admin.post("users/create", form)
    assert reply.status == 422  # the form again, with what was typed and why
    page = text(reply)
    assert 'role="alert"' in page and "password needs at least" in page
    assert 'value="eve"' in page and 'value="ops, user"' in page
    assert 'value="short"' not in page  # never a password
    assert "Traceback" not in page
    bad_days = admin.post("certs/issue", {"csrf": admin.csrf, "name": "x", "days": "soon"})
    assert bad_days.status == 422 and "Validity must be a whole number." in text(bad_days)
    mine = admin.post("users/disable", {"csrf": admin.csrf, "name": "root"})
    assert header(mine, b"location") == BASE + "users/edit?name=root"
    assert "cannot disable your own account" in text(admin.get("users/edit?name=root"))
    audit = text(admin.get("audit?status=401"))  # this setup's audit log is off: not searchable
    assert 'role="alert"' in audit and "not a file" in audit
    assert "must be a number" in text(admin.get("audit?status=abc"))
    assert admin.get("users/edit?name=nobody").status == 404


def test_text_is_escaped_everywhere_it_is_echoed(admin: Browser) -> None:
    evil = '<script>alert("x")</script>'
    page = text(admin.get("audit?" + urlencode({"identity": evil, "route": '"><b>'})))
    assert evil not in page and "&lt;script&gt;" in page
    assert '"><b>' not in page
    flash = base64.urlsafe_b64encode(json.dumps(["error", evil]).encode()).decode()
    admin.cookies[FLASH_COOKIE] = flash.rstrip("=")
    page = text(admin.get("users"))
    assert evil not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    admin.cookies[FLASH_COOKIE] = "not-base64-json!"
    assert admin.get("users").status == 200  # a mangled flash is ignored


def test_key_secret_is_shown_once_and_never_again(admin: Browser) -> None:
    reply = admin.post(
        "keys/create",
        {"csrf": admin.csrf, "name": "nb", "owner": "carol", "scopes": "chat, embed", "rate": ""},
    )
    assert reply.status == 200 and header(reply, b"cache-control") == "no-store"
    secret = re.search(r'value="(gk_[A-Za-z0-9]{12}_[^"]+)" data-testid="key-secret"', text(reply))
    assert secret is not None
    key_id = secret.group(1)[3:15]
    for page in ("keys", f"keys/edit?id={key_id}", f"keys/revoke?id={key_id}", ""):
        shown = admin.get(page)
        assert shown.status == 200
        assert secret.group(1) not in text(shown)
        assert secret.group(1)[16:] not in text(shown)
    rotated = admin.post("keys/rotate", {"csrf": admin.csrf, "id": key_id, "grace_seconds": "0"})
    new = re.search(r'value="(gk_[A-Za-z0-9]{12}_[^"]+)"', text(rotated))
    assert new is not None and new.group(1) != secret.group(1)
    limits = admin.post("keys/limits", {"csrf": admin.csrf, "id": key_id, "rate": "5/minute"})
    assert header(limits, b"location") == f"{BASE}keys/edit?id={key_id}"
    edit = text(admin.get(f"keys/edit?id={key_id}"))
    assert "Limits saved." in edit and 'value="5/minute"' in edit
    assert "&amp;#" not in edit
    bad = admin.post("keys/limits", {"csrf": admin.csrf, "id": key_id, "rate": "lots"})
    assert bad.status == 303 and 'role="alert"' in text(admin.get(f"keys/edit?id={key_id}"))
    revoked = admin.post("keys/revoke", {"csrf": admin.csrf, "id": key_id})
    assert revoked.status == 303
    page = text(admin.get("keys"))
    assert f"Key {key_id} revoked." in page
    assert re.search(rf'data-key="{key_id}".*?badge bad">revoked<', page, re.S)


def test_sessions_list_marks_this_browser_and_revokes(
    admin: Browser, setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop
) -> None:
    signed_in(setup, loop, "carol")
    page = text(admin.get("sessions"))
    assert "this browser" in page and ">carol<" in page.replace(" ", "")
    carol_only = text(admin.get("sessions?user=carol"))
    ids = re.findall(r'data-session="([0-9a-f]+)"', carol_only)
    assert len(ids) == 1
    done = admin.post("sessions/revoke", {"csrf": admin.csrf, "id": ids[0], "user": "carol"})
    assert header(done, b"location") == BASE + "sessions?user=carol"
    assert "No active sessions for carol." in text(admin.get("sessions?user=carol"))


def test_user_management_forms(
    admin: Browser, setup: tuple[AdminUI, AuthService], loop: asyncio.AbstractEventLoop
) -> None:
    edit = BASE + "users/edit?name=carol"
    roles = admin.post("users/roles", {"csrf": admin.csrf, "name": "carol", "roles": "ops user"})
    assert header(roles, b"location") == edit
    page = text(admin.get("users/edit?name=carol"))
    assert "Roles of carol saved." in page and 'value="ops, user"' in page

    disabled = admin.post("users/disable", {"csrf": admin.csrf, "name": "carol"})
    assert header(disabled, b"location") == edit
    page = text(admin.get("users/edit?name=carol"))
    assert "User carol disabled." in page and "Enable account" in page
    admin.post("users/enable", {"csrf": admin.csrf, "name": "carol"})
    assert "Disable account" in text(admin.get("users/edit?name=carol"))

    new_password = "carol-new-password-0123"
    reset = admin.post(
        "users/password", {"csrf": admin.csrf, "name": "carol", "password": new_password}
    )
    assert header(reset, b"location") == edit
    page = text(admin.get("users/edit?name=carol"))
    assert "Password of carol changed." in page and new_password not in page
    assert loop.run_until_complete(setup[1].login("carol", new_password, time.time()))

    gone = admin.post("sessions/revoke-user", {"csrf": admin.csrf, "user": "carol"})
    assert header(gone, b"location") == BASE + "sessions?user=carol"
    assert "carol is signed out everywhere." in text(admin.get("sessions?user=carol"))
    assert 'data-session="' not in text(admin.get("sessions?user=carol"))

"""Who may not use the admin surface (issue 7, acceptance 2), table-driven, end to end.

A non-admin user (by session, by bearer token, by an API key with scope admin), an admin's API
key without scope admin, a request from an address outside `[admin] allow`, and a cross-site
form post carrying an admin's session are each refused on every admin page and every admin
API call. The calls are enumerated from the endpoint router's own registry (the API's routes
and the UI's pages and forms), so an endpoint added later is covered without editing this
file; each is tried with GET, POST and its own method, with a body that would change
something if it got through. The answer must be 403, the audit log must say why
(`admin_refused` with the expected reason), and nothing may have changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from garrison.admin import install
from garrison.admin.guard import AdminGuard
from garrison.admin.service import AdminService
from garrison.auth.service import AuthService
from garrison.config import validate
from garrison.observe.audit import AuditLog
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.store.db import open_store
from tests.e2e.fixtures_core import client, gateway_config, route_toml, running_gateway
from tests.e2e.fixtures_stream import wait_until
from tests.e2e.test_auth import cli, login
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

ADMIN_PREFIXES = ("/.garrison/api", "/.garrison/admin")
NINA_PASSWORD = "nina-password-for-tests"
WAIT_S = 10.0  # bounds how long a failure takes; notices and audit flushes take < 1 s
EVIL = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
FORM = {
    "name": "mallory",
    "password": "mallory-password",
    "roles": "admin",
    "scopes": "admin",
    "owner": "admin",
    "disabled": "1",
    "p12_password": "mallory-password",
}
# What each API call would need to change something; anything else gets an empty object.
API_BODIES: dict[tuple[str, str], dict[str, object]] = {
    ("POST", "/users"): {"name": "mallory", "password": "mallory-password", "roles": ["admin"]},
    ("PATCH", "/users/{name}"): {"disabled": True},
    ("POST", "/users/{name}/password"): {"password": "mallory-password"},
    ("POST", "/keys"): {"name": "mallory", "owner": "admin", "scopes": ["admin"]},
    ("PUT", "/keys/{key_id}/limits"): {"rate": ["1/day"]},
    ("POST", "/certs"): {"name": "mallory", "p12_password": "mallory-password"},
    ("POST", "/certs/{serial}/renew"): {"p12_password": "mallory-password"},
}


def config(upstream: str, admin: str = "") -> str:
    return gateway_config(upstream, route_toml("/app/"), admin)


def registry_routes(tmp: Path) -> list[tuple[str, str]]:
    """Every admin (method, path template), from the router the gateway itself builds."""
    engine = open_store(f"sqlite:///{tmp / 'registry.db'}")
    try:
        cfg = validate({})
        auth = AuthService(engine, cfg.auth)
        endpoints = GatewayEndpoints()
        install(
            endpoints, AdminService(auth, AuditLog.disabled(), cfg), AdminGuard(cfg.admin, auth)
        )
    finally:
        engine.dispose()
    return [(m, p) for m, p in endpoints.routes() if p.startswith(ADMIN_PREFIXES)]


@dataclass
class Target:
    method: str
    path: str  # placeholders filled with real objects
    template: str  # as registered


def targets(routes: list[tuple[str, str]], fill: dict[str, str]) -> list[Target]:
    found: dict[tuple[str, str], Target] = {}
    for method, template in routes:
        path = re.sub(r"\{(\w+)\}", lambda g: fill[g[1]], template)
        for verb in {"GET", "POST", *([method] if method not in ("*", "HEAD") else [])}:
            found[(verb, path)] = Target(verb, path, template)
    return sorted(found.values(), key=lambda t: (t.path, t.method))


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("admin-access"), config(upstream.url)) as g:
        cli(g.data_dir, "user", "add", "nina", "--role", "staff", "--password-stdin",
            stdin=NINA_PASSWORD + "\n")  # fmt: skip
        yield g


@pytest.fixture(scope="module")
def far_gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """Admins allowed only from a network the test client is not in."""
    text = config(upstream.url, '[admin]\nallow = ["10.9.9.0/24"]')
    with running_gateway(tmp_path_factory.mktemp("admin-far"), text) as g:
        yield g


def key(gw: GatewayProcess, owner: str, *scopes: str) -> str:
    args = ["key", "create", f"{owner}-{'-'.join(scopes)}", "--owner", owner]
    for scope in scopes:
        args += ["--scope", scope]
    return cli(gw.data_dir, *args).strip()


@dataclass
class World:
    gw: GatewayProcess
    far: GatewayProcess
    admin: httpx.Client  # an admin API key from an allowed address: the observer
    fill: dict[str, str]
    routes: list[tuple[str, str]]


@pytest.fixture(scope="module")
def world(
    gw: GatewayProcess, far_gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    admin_key = key(gw, "admin", "admin")
    with closing(client(gw, admin_key)) as admin:
        cert = admin.post("/.garrison/api/certs", json={"name": "nina", "p12_password": "x" * 8})
        assert cert.status_code == 201, cert.text
        with closing(login(gw, "admin", ADMIN_PASSWORD)):
            pass  # an admin session exists to be (not) revoked
        sessions = admin.get("/.garrison/api/sessions", params={"user": "admin"}).json()
        fill = {
            "name": "admin",
            "key_id": admin_key[3:15],
            "serial": cert.json()["cert"]["serial"],
            "session_id": sessions[0]["id"],
        }
        routes = registry_routes(tmp_path_factory.mktemp("registry"))
        yield World(gw, far_gw, admin, fill, routes)


def snapshot(admin: httpx.Client) -> dict[str, Any]:
    """What a refused call could have changed (never last-use times, which tests move)."""
    state: dict[str, Any] = {}
    for what in ("users", "keys", "certs", "sessions"):
        resp = admin.get(f"/.garrison/api/{what}")
        assert resp.status_code == 200, resp.text
        state[what] = [
            {k: v for k, v in item.items() if k not in ("last_used", "last_seen", "last_login")}
            for item in resp.json()
        ]
    return state


def refusals(gw: GatewayProcess) -> list[str]:
    lines = (gw.data_dir / "audit.log").read_text().splitlines()
    return [r["reason"] for r in map(json.loads, lines) if r["event"] == "admin_refused"]


def nina_token(w: World) -> str:
    with closing(client(w.gw)) as c:
        resp = c.post("/.garrison/token", data={"username": "nina", "password": NINA_PASSWORD})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def session_cookie(gw: GatewayProcess, user: str, password: str) -> dict[str, str]:
    with closing(login(gw, user, password)) as browser:
        return {"Cookie": f"__Host-garrison={browser.cookies['__Host-garrison']}"}


# case -> (the gateway, the headers the client sends, whether it posts a form, the reason)
CASES: dict[str, Callable[[World], tuple[GatewayProcess, dict[str, str], bool, str]]] = {
    "non_admin_session": lambda w: (
        w.gw, session_cookie(w.gw, "nina", NINA_PASSWORD), False, "role"
    ),
    "non_admin_bearer_token": lambda w: (
        w.gw, {"Authorization": f"Bearer {nina_token(w)}"}, False, "role"
    ),
    "non_admin_key_with_admin_scope": lambda w: (
        w.gw, {"Authorization": f"Bearer {key(w.gw, 'nina', 'admin')}"}, False, "role"
    ),
    "admin_key_without_admin_scope": lambda w: (
        w.gw, {"X-API-Key": key(w.gw, "admin", "chat")}, False, "scope"
    ),
    "address_not_allowed_key": lambda w: (
        w.far, {"Authorization": f"Bearer {key(w.far, 'admin', 'admin')}"}, False, "address"
    ),
    "address_not_allowed_session": lambda w: (
        w.far, session_cookie(w.far, "admin", ADMIN_PASSWORD), False, "address"
    ),
    "cross_site_form_post": lambda w: (
        w.gw, {**session_cookie(w.gw, "admin", ADMIN_PASSWORD), **EVIL}, True, "cross_site"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_refused_on_every_admin_page_and_call(world: World, case: str) -> None:
    gw, headers, form, reason = CASES[case](world)
    api_routes = [r for r in world.routes if r[1].startswith("/.garrison/api/")]
    assert len(api_routes) >= 20  # the registry is really read
    # A non-admin identity must be known to the workers before its refusal means anything.
    ready = {"X-API-Key": headers["X-API-Key"]} if "X-API-Key" in headers else headers
    with closing(client(gw, headers=ready)) as probe:
        assert wait_until(lambda: probe.get("/app/x").status_code in (200, 403), WAIT_S)
    before, refused_before = snapshot(world.admin), len(refusals(gw))
    tried = targets(world.routes, world.fill)
    fields = {**FORM, **world.fill, "id": world.fill["key_id"], "user": "admin"}
    wrong: list[str] = []
    with closing(client(gw, headers=headers)) as c:
        for t in tried:
            if t.method == "GET":
                resp = c.get(t.path, headers={"Accept": "text/html"} if form else None)
            elif form or t.path.startswith("/.garrison/admin"):
                resp = c.request(t.method, t.path, data=fields)
            else:
                body = API_BODIES.get((t.method, t.template.removeprefix("/.garrison/api")), {})
                resp = c.request(t.method, t.path, json=body)
            if resp.status_code != 403:
                wrong.append(f"{t.method} {t.path}: {resp.status_code} {resp.text[:120]}")
            elif any(word in resp.text for word in ("role", "scope", "address", "cross")):
                wrong.append(f"{t.method} {t.path}: the refusal says why: {resp.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert snapshot(world.admin) == before  # nothing changed
    assert wait_until(lambda: len(refusals(gw)) - refused_before >= len(tried), WAIT_S)
    assert set(refusals(gw)[refused_before:]) == {reason}


def test_the_registry_covers_the_ui_when_it_is_there(world: World) -> None:
    """The UI's pages join the table through the same registry (once the UI is installed)."""
    try:
        import garrison.admin.ui  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("the admin UI is not in this tree")
    ui = [p for _, p in world.routes if p.startswith("/.garrison/admin/")]
    assert ui, world.routes


def test_an_admin_passes_where_the_others_are_refused(world: World) -> None:
    """The control: the same calls with an admin key are not refused (so the 403s above are
    the guard's, not a broken endpoint's)."""
    for method, template in world.routes:
        if method != "GET" or "{" in template or not template.startswith("/.garrison/api/"):
            continue
        resp = world.admin.get(template)
        assert resp.status_code == 200, (template, resp.text[:200])

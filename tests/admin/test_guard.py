"""The admin guard on real credentials: who passes, who is refused, and what the refused
client and the audit log are told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garrison.auth.identity import Identity
from garrison.pipeline.exchange import Exchange, Reply
from tests.admin.conftest import World, make_world, run

HOST = "gw.example.test"


def exchange(
    *headers: tuple[bytes, bytes],
    method: str = "GET",
    ip: str = "127.0.0.1",
    path: str = "/.garrison/api/users",
    accept: bytes = b"application/json",
) -> Exchange:
    ex = Exchange(method, path.encode(), "1.1", [(b"host", HOST.encode()), (b"accept", accept)], ip)
    ex.headers += list(headers)
    ex.path, ex.host, ex.client_ip = path, HOST, ip
    return ex


def bearer(text: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + text.encode())


def session(world: World, user: str) -> tuple[bytes, bytes]:
    cookie, _ = world.auth.sessions.create(user)
    return (b"cookie", b"__Host-garrison=" + cookie.encode())


def key(world: World, owner: str | None, *scopes: str) -> str:
    return world.auth.keys.create("k", scopes, owner=owner)[1]


def refused_reasons(world: World) -> list[str]:
    lines = [json.loads(line) for line in world.audit_text().splitlines()]
    return [str(line["reason"]) for line in lines if line["event"] == "admin_refused"]


def test_admins_pass_by_session_key_and_token(world: World) -> None:
    token, _ = world.auth.issue_token("root", ("admin",), None, None)
    scoped, _ = world.auth.issue_token("root", ("admin",), None, ["admin"])
    for credential in (
        session(world, "root"),
        bearer(key(world, "root", "admin")),
        (b"x-api-key", key(world, "root", "admin", "chat").encode()),
        bearer(token),
        bearer(scoped),
    ):
        ex = exchange(credential)
        result = run(world.guard.check(ex))
        assert isinstance(result, Identity) and result.name == "root", credential
        assert ex.identity is result  # the request's audit line names the admin
    assert refused_reasons(world) == []


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("non_admin_session", "role"),
        ("non_admin_key", "role"),
        ("key_without_admin_scope", "scope"),
        ("token_without_admin_scope", "scope"),
        ("ownerless_key", "role"),
        ("bad_key", "credential"),
        ("bad_token", "credential"),
        ("basic_auth", "credential"),
        ("other_address", "address"),
        ("cross_site_origin", "cross_site"),
        ("cross_site_fetch", "cross_site"),
    ],
)
def test_refusals_are_403_and_audited(world: World, case: str, reason: str) -> None:
    token, _ = world.auth.issue_token("root", ("admin",), None, ["chat"])
    ex = {
        "non_admin_session": lambda: exchange(session(world, "carol")),
        "non_admin_key": lambda: exchange(bearer(key(world, "carol", "admin"))),
        "key_without_admin_scope": lambda: exchange(bearer(key(world, "root", "chat"))),
        "token_without_admin_scope": lambda: exchange(bearer(token)),
        "ownerless_key": lambda: exchange(bearer(key(world, None, "admin"))),
        "bad_key": lambda: exchange(bearer("gk_aaaaaaaaaaaa_" + "A" * 43)),
        "bad_token": lambda: exchange(bearer("e30.e30.sig")),
        "basic_auth": lambda: exchange((b"authorization", b"Basic cm9vdDpwdw==")),
        "other_address": lambda: exchange(session(world, "root"), ip="192.0.2.7"),
        "cross_site_origin": lambda: exchange(
            session(world, "root"), (b"origin", b"https://evil.example"), method="POST"
        ),
        "cross_site_fetch": lambda: exchange(
            session(world, "root"), (b"sec-fetch-site", b"cross-site")
        ),
    }[case]()
    result = run(world.guard.check(ex))
    assert isinstance(result, Reply) and result.status == 403
    body = json.loads(result.body)
    assert body["error"]["code"] == "forbidden"
    assert reason not in body["error"]["message"]  # the client is not told which check failed
    assert refused_reasons(world) == [reason]


def test_no_credential_is_told_to_sign_in(world: World) -> None:
    api = run(world.guard.check(exchange()))
    assert isinstance(api, Reply) and api.status == 401
    page = run(world.guard.check(exchange(path="/.garrison/admin/users", accept=b"text/html")))
    assert isinstance(page, Reply) and page.status == 303
    assert dict(page.headers)[b"location"] == b"/.garrison/login?next=/.garrison/admin/users"
    expired = exchange((b"cookie", b"__Host-garrison=" + b"x" * 43 + b"." + b"y" * 22))
    assert run(world.guard.check(expired)).status == 401  # type: ignore[union-attr]


def test_a_browser_gets_an_html_refusal(world: World) -> None:
    ex = exchange(session(world, "carol"), path="/.garrison/admin/", accept=b"text/html")
    result = run(world.guard.check(ex))
    assert isinstance(result, Reply) and result.status == 403
    assert result.content_type.startswith(b"text/html")


def test_address_rules_and_proxies(tmp_path: Path) -> None:
    w = make_world(tmp_path, admin={"allow": ["10.9.9.0/24"]})
    try:
        root = session(w, "root")
        assert run(w.guard.check(exchange(root, ip="127.0.0.1"))).status == 403  # type: ignore[union-attr]
        assert isinstance(run(w.guard.check(exchange(root, ip="10.9.9.5"))), Identity)
        assert isinstance(run(w.guard.check(exchange(root, ip="::ffff:10.9.9.5"))), Identity)
    finally:
        w.close()


def test_same_origin_helpers() -> None:
    from garrison.admin.guard import AdminGuard

    assert AdminGuard.same_origin(exchange())
    assert AdminGuard.same_origin(exchange((b"origin", f"https://{HOST}".encode())))
    assert not AdminGuard.same_origin(exchange((b"origin", b"https://evil.example")))
    assert not AdminGuard.same_origin(exchange((b"sec-fetch-site", b"same-site")))
    assert not AdminGuard.proven_same_origin(exchange())  # no evidence is not proof
    assert AdminGuard.proven_same_origin(exchange((b"sec-fetch-site", b"same-origin")))


def test_require_client_cert_needs_the_same_user(tmp_path: Path) -> None:
    w = make_world(tmp_path, admin={"require_client_cert": True})
    try:
        without = exchange(session(w, "root"))
        assert run(w.guard.check(without)).status == 403  # type: ignore[union-attr]
        other = exchange(session(w, "root"))
        other.cert_identity = Identity(method="client_cert", name="carol")
        assert run(w.guard.check(other)).status == 403  # type: ignore[union-attr]
        same = exchange(session(w, "root"))
        same.cert_identity = Identity(method="client_cert", name="root")
        assert isinstance(run(w.guard.check(same)), Identity)
        assert refused_reasons(w) == ["client_cert", "client_cert"]
    finally:
        w.close()


def test_disabled_user_and_revoked_key_are_refused_after_the_notice(world: World) -> None:
    secret = key(world, "root", "admin")
    assert isinstance(run(world.guard.check(exchange(bearer(secret)))), Identity)
    world.auth.keys.revoke(secret[3:15])
    world.reload_directory()  # what the poll does on the notice
    assert run(world.guard.check(exchange(bearer(secret)))).status == 403  # type: ignore[union-attr]

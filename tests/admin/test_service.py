"""The admin service on a real store, CA and audit file: every change is made through the
stores' own operations (so the change notices go out), is audited with who made it, and never
puts a secret into the audit file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import select

from garrison.admin.service import AdminError
from garrison.store.db import events
from tests.admin.conftest import World, make_world, run


def notices(world: World) -> list[tuple[str, str]]:
    with world.engine.connect() as conn:
        return [(r.topic, r.subject) for r in conn.execute(select(events)).all()]


def audit_events(world: World) -> list[dict[str, object]]:
    return [json.loads(line) for line in world.audit_text().splitlines()]


def test_users_create_disable_roles_and_password(world: World) -> None:
    svc, actor = world.service, world.actor
    view = run(svc.create_user(actor, "dave", "dave-password-1", ["staff"], "d@example.test"))
    assert (view.name, view.roles, view.email, view.disabled) == (
        "dave",
        ["staff"],
        "d@example.test",
        False,
    )
    assert view.created is not None and view.last_login is None
    assert run(svc.set_user_disabled(actor, "dave", True)).disabled is True
    assert run(svc.set_user_disabled(actor, "dave", False)).disabled is False
    assert run(svc.set_roles(actor, "dave", ["ops", "admin"])).roles == ["ops", "admin"]
    _cookie, _ = world.auth.sessions.create("dave")
    assert len(run(svc.list_sessions("dave"))) == 1
    run(svc.reset_password(actor, "dave", "another-password"))
    assert run(svc.list_sessions("dave")) == []  # a reset ends every session
    assert world.auth.users.authenticate("dave", "another-password", time.time()) is not None
    assert [u.name for u in run(svc.list_users())] == ["carol", "dave", "root"]
    assert ("user", "dave") in notices(world)
    names = [e["event"] for e in audit_events(world)]
    assert names == [
        "user_added",
        "user_disabled",
        "user_enabled",
        "user_roles_changed",
        "user_password_changed",
    ]
    assert all(e["by"] == "admin:root" for e in audit_events(world))
    assert "dave-password-1" not in world.audit_text()
    assert "another-password" not in world.audit_text()


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda s, a: s.create_user(a, "carol", "whatever-password"), 409, "user_exists"),
        (lambda s, a: s.create_user(a, "bad name", "whatever-password"), 422, "invalid"),
        (lambda s, a: s.create_user(a, "eve", "short"), 422, "invalid"),
        (lambda s, a: s.set_user_disabled(a, "nobody", True), 404, "user_not_found"),
        (lambda s, a: s.reset_password(a, "nobody", "long-enough-pw"), 404, "user_not_found"),
        (lambda s, a: s.set_user_disabled(a, "root", True), 409, "self_lockout"),
        (lambda s, a: s.set_roles(a, "root", ["staff"]), 409, "self_lockout"),
        (lambda s, a: s.revoke_user_sessions(a, "nobody"), 404, "user_not_found"),
        (lambda s, a: s.revoke_session(a, "0" * 64), 404, "session_not_found"),
    ],
)
def test_user_refusals(world: World, call: object, status: int, code: str) -> None:
    with pytest.raises(AdminError) as info:
        run(call(world.service, world.actor))  # type: ignore[operator]
    assert (info.value.status, info.value.code) == (status, code)
    assert world.audit_text() == ""  # a refused change is not recorded as made


def test_keys_secret_once_revoke_rotate_limits(world: World) -> None:
    svc, actor = world.service, world.actor
    view, secret = run(svc.create_key(actor, "bot", "carol", ["chat"], expires_days=30))
    assert secret.startswith(view.prefix) and view.prefix == f"gk_{view.id}_"
    assert (view.owner, view.scopes, view.roles, view.status) == (
        "carol",
        ["chat"],
        ["staff"],
        "active",
    )
    assert world.auth.keys.verify(secret) is not None
    listed = run(svc.list_keys())
    assert [k.id for k in listed] == [view.id]
    assert secret not in repr(listed)
    limited = run(svc.set_key_limits(actor, view.id, ["10/minute"], "1000/day"))
    assert (limited.rate, limited.tokens) == (["10/minute"], "1000/day")
    rotated, new_secret = run(svc.rotate_key(actor, view.id, grace_seconds=0))
    assert new_secret != secret and rotated.id == view.id
    assert world.auth.keys.verify(secret) is None and world.auth.keys.verify(new_secret)
    revoked = run(svc.revoke_key(actor, view.id))
    assert revoked.status == "revoked" and world.auth.keys.verify(new_secret) is None
    assert ("key", view.id) in notices(world)  # every worker drops its cached identity
    text = world.audit_text()
    assert secret not in text and new_secret not in text
    assert [e["event"] for e in audit_events(world)] == [
        "key_created",
        "key_limits_changed",
        "key_rotated",
        "key_revoked",
    ]


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"owner": "nobody"}, 422),
        ({"scopes": []}, 422),
        ({"roles": ["admin"]}, 422),
        ({"rate": ["1e999/day"]}, 422),
        ({"rate": ["1/0s"]}, 422),
        ({"tokens": "lots"}, 422),
        ({"expires_days": -1}, 422),
    ],
)
def test_key_refusals(world: World, kwargs: dict[str, object], status: int) -> None:
    args: dict[str, object] = {"scopes": ["chat"], **kwargs}
    with pytest.raises(AdminError) as info:
        run(world.service.create_key(world.actor, "bot", **args))  # type: ignore[arg-type]
    assert info.value.status == status
    assert world.auth.keys.list() == []


def test_key_state_refusals(world: World) -> None:
    svc, actor = world.service, world.actor
    with pytest.raises(AdminError) as info:
        run(svc.revoke_key(actor, "aaaaaaaaaaaa"))
    assert info.value.status == 404
    view, _ = run(svc.create_key(actor, "bot", None, ["chat"]))
    run(svc.revoke_key(actor, view.id))
    with pytest.raises(AdminError) as info:
        run(svc.rotate_key(actor, view.id))
    assert (info.value.status, info.value.code) == (409, "key_not_active")


def test_certs_issue_p12_revoke_renew(world: World) -> None:
    svc, actor = world.service, world.actor
    cert, p12 = run(svc.issue_cert(actor, "carol", ["staff"], 30, "p12-password"))
    key, leaf, cas = pkcs12.load_key_and_certificates(p12, b"p12-password")
    assert key is not None and leaf is not None
    assert format(leaf.serial_number, "x") == cert.serial and len(cas) == 1
    assert cert.status == "active" and cert.roles == ["staff"]
    renewed, p12b = run(svc.renew_cert(actor, cert.serial, "other-password"))
    assert renewed.serial != cert.serial
    assert pkcs12.load_key_and_certificates(p12b, b"other-password")[1] is not None
    old = next(c for c in run(svc.list_certs()) if c.serial == cert.serial)
    assert old.status == "revoked" and old.replaced_by == renewed.serial
    gone = run(svc.revoke_cert(actor, renewed.serial, "keyCompromise"))
    assert (gone.status, gone.revoke_reason) == ("revoked", "keyCompromise")
    assert int(renewed.serial, 16) in world.service._certs().revoked_serials()
    assert run(svc.revoke_cert(actor, renewed.serial)).status == "revoked"  # idempotent
    text = world.audit_text()
    assert "p12-password" not in text and "other-password" not in text
    assert [e["event"] for e in audit_events(world)] == [
        "cert_issued",
        "cert_renewed",
        "cert_revoked",
    ]


def test_cert_refusals(world: World, tmp_path: Path) -> None:
    svc, actor = world.service, world.actor
    with pytest.raises(AdminError) as info:
        run(svc.issue_cert(actor, "carol", p12_password="short"))
    assert info.value.status == 422
    with pytest.raises(AdminError) as info:
        run(svc.revoke_cert(actor, "abcdef"))
    assert info.value.status == 404
    external = make_world(tmp_path / "ext", client_certs={"ca": str(world.ca.cert_path)})
    try:
        with pytest.raises(AdminError) as info:
            run(external.service.issue_cert(actor, "carol", p12_password="p12-password"))
        assert (info.value.status, info.value.code) == (409, "ca_unavailable")
    finally:
        external.close()


def test_sessions_list_and_revoke(world: World) -> None:
    svc, actor = world.service, world.actor
    world.auth.sessions.create("carol")
    world.auth.sessions.create("carol")
    world.auth.sessions.create("root")
    listed = run(svc.list_sessions())
    assert len(listed) == 3 and all(len(s.id) == 64 for s in listed)
    carol = [s for s in listed if s.user == "carol"]
    run(svc.revoke_session(actor, carol[0].id))
    assert len(run(svc.list_sessions("carol"))) == 1
    assert run(svc.revoke_user_sessions(actor, "carol")) == 1
    assert [s.user for s in run(svc.list_sessions())] == ["root"]
    assert ("session", carol[0].id) in notices(world)
    assert run(svc.list_users())[0].last_login is not None  # carol logged in (a session)


def test_search_audit_filters_newest_first(world: World) -> None:
    svc, actor = world.service, world.actor
    run(svc.create_user(actor, "u1", "password-one"))
    run(svc.create_user(actor, "u2", "password-two"))
    run(svc.set_user_disabled(actor, "u1", True))
    found = run(svc.search_audit(event="user_added"))
    assert [r["user"] for r in found] == ["u2", "u1"]
    assert [r["event"] for r in run(svc.search_audit(identity="u1"))] == [
        "user_disabled",
        "user_added",
    ]
    assert len(run(svc.search_audit(limit=1))) == 1
    assert run(svc.search_audit(since=time.time() + 60)) == []
    assert len(run(svc.search_audit(until=time.time() + 60))) == 3


def test_search_refuses_a_sink_that_is_not_a_file(tmp_path: Path) -> None:
    w = make_world(tmp_path, audit={"sink": "stdout"})
    try:
        with pytest.raises(AdminError) as info:
            run(w.service.search_audit())
        assert (info.value.status, info.value.code) == (409, "audit_not_searchable")
    finally:
        w.close()


def test_overview_counts_and_expiries(world: World) -> None:
    svc, actor = world.service, world.actor
    run(svc.issue_cert(actor, "carol", days=10, p12_password="p12-password"))
    run(svc.create_key(actor, "bot", None, ["chat"], expires_days=5))
    view = run(svc.overview())
    assert view.requests >= view.errors + view.refused >= 0
    kinds = [e.kind for e in view.expiries]
    assert "ca" in kinds and "client" in kinds and "key" in kinds
    assert kinds.index("key") < kinds.index("client")  # soonest first
    key = next(e for e in view.expiries if e.kind == "key")
    assert 4.9 < key.days_left <= 5


def test_revoke_by_serial_never_hits_a_name_spelled_like_it(world: World) -> None:
    svc, actor = world.service, world.actor
    cert, _ = run(svc.issue_cert(actor, "carol", p12_password="p12-password"))
    run(svc.issue_cert(actor, cert.serial, p12_password="p12-password"))  # a name = the serial
    with pytest.raises(AdminError) as info:
        run(svc.revoke_cert(actor, cert.serial))
    assert info.value.code == "ambiguous"
    assert {c.status for c in run(svc.list_certs())} == {"active"}

"""Who is calling, end to end (issue 3): a real `garrison up`, the real CLI, a recording upstream.

Every refusal is checked twice: the answer the client gets, and that the upstream never saw
the request (its request log does not grow), so a test cannot pass with the check missing.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select

from garrison.auth.users import Users
from garrison.store.db import default_url, open_store, signing_keys
from tests.e2e.fixtures_core import client_context, running_gateway
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

ALICE_PASSWORD = "alice-password-for-tests"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
EXTERNAL_ISSUER = "https://idp.example.test/"


def cli(data_dir: Path, *args: str, stdin: str | None = None) -> str:
    """Run `garrison ...` against the gateway's data dir, as an operator would."""
    result = subprocess.run(
        [sys.executable, "-m", "garrison", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def new_key(gw: GatewayProcess, name: str, *scopes: str, owner: str | None = None) -> str:
    args = ["key", "create", name]
    for scope in scopes:
        args += ["--scope", scope]
    if owner:
        args += ["--owner", owner]
    return cli(gw.data_dir, *args).strip()


@pytest.fixture(scope="module")
def external_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("idp") / "idp.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, path


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    external_key: tuple[rsa.RSAPrivateKey, Path],
) -> Iterator[GatewayProcess]:
    text = f"""
[server]
listen = "127.0.0.1:0"

[[auth.jwt_issuer]]
issuer = "{EXTERNAL_ISSUER}"
audience = "garrison-tests"
key_file = "{external_key[1]}"
algorithms = ["RS256"]

[[upstream]]
name = "app"
url = "{upstream.url}"

[[route]]
path = "/v1/"
upstream = "app"
auth = ["api_key", "jwt"]
allow = {{ scopes = ["chat"] }}
token_alias = "/v1/token"

[[route]]
path = "/admin/"
upstream = "app"
allow = {{ roles = ["admin"] }}

[[route]]
path = "/bob/"
upstream = "app"
allow = {{ users = ["bob"] }}

[[route]]
path = "/public/"
upstream = "app"
auth = ["none"]

[[route]]
path = "/"
upstream = "app"
"""
    with running_gateway(tmp_path_factory.mktemp("auth"), text) as gateway:
        cli(
            gateway.data_dir,
            "user",
            "add",
            "alice",
            "--role",
            "staff",
            "--email",
            "alice@example.test",
            "--password-stdin",
            stdin=ALICE_PASSWORD + "\n",
        )
        yield gateway


def client(gw: GatewayProcess) -> httpx.Client:
    return httpx.Client(base_url=gw.url, verify=client_context(gw), timeout=30)


def login(gw: GatewayProcess, user: str, password: str) -> httpx.Client:
    """A client holding a session, obtained through the real login form."""
    c = client(gw)
    form = c.get("/.garrison/login", params={"next": "/"})
    assert form.status_code == 200
    match = CSRF_RE.search(form.text)
    assert match
    resp = c.post(
        "/.garrison/login",
        data={"username": user, "password": password, "csrf": match.group(1), "next": "/"},
        headers={"Origin": gw.url},
    )
    assert resp.status_code == 303, resp.text
    return c


def echoed(resp: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.json()["headers"]}


class Counting:
    """Asserts how many requests reached the upstream inside the block."""

    def __init__(self, upstream: FakeUpstream, expected: int) -> None:
        self.upstream = upstream
        self.expected = expected

    def __enter__(self) -> None:
        self.before = len(self.upstream.requests)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert len(self.upstream.requests) - self.before == self.expected


def test_no_credentials_api_401_browser_302(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    with client(gw) as c, Counting(upstream, 0):
        api = c.get("/chat?x=1")
        assert api.status_code == 401
        assert api.json()["error"]["code"] == "authentication_required"
        assert api.headers["www-authenticate"] == 'Bearer realm="garrison"'
        page = c.get("/chat?x=1", headers={"Accept": "text/html,application/xhtml+xml"})
        assert page.status_code == 302
        assert page.headers["location"] == "/.garrison/login?next=%2Fchat%3Fx%3D1"
        posted = c.post("/chat", headers={"Accept": "text/html"})  # not a navigation
        assert posted.status_code == 401
    with client(gw) as c, Counting(upstream, 1):
        assert c.get("/public/x").status_code == 200


def test_api_key_as_bearer_or_x_api_key(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    key = new_key(gw, "bot", "chat", owner="alice")
    with client(gw) as c, Counting(upstream, 2):
        spoof = {"X-Forwarded-User": "admin", "X-Garrison-Roles": "admin"}
        first = c.get("/x", headers={"Authorization": f"Bearer {key}", **spoof})
        second = c.get("/x", headers={"X-API-Key": key, "Cookie": "theme=dark"})
    for resp in (first, second):
        assert resp.status_code == 200, resp.text
        seen = echoed(resp)
        assert seen["x-forwarded-user"] == "alice"
        assert seen["x-forwarded-email"] == "alice@example.test"
        assert seen["x-garrison-roles"] == "staff"
        assert "authorization" not in seen and "x-api-key" not in seen  # never to the app
        assert key not in json.dumps(resp.json())
    assert echoed(second)["cookie"] == "theme=dark"


def test_scopes_are_enforced_per_route(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    chat = new_key(gw, "chat-bot", "chat")
    files = new_key(gw, "file-bot", "files")
    with client(gw) as c:
        with Counting(upstream, 1):
            ok = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {chat}"})
        assert ok.status_code == 200
        assert echoed(ok)["x-forwarded-user"] == "key:chat-bot"
        with Counting(upstream, 0):
            denied = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {files}"})
        assert denied.status_code == 403
        assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]
    session = login(gw, "admin", ADMIN_PASSWORD)
    with closing(session), Counting(upstream, 0):
        # /v1/ accepts keys and tokens only: a browser session is not enough there.
        assert session.post("/v1/chat/completions").status_code == 401


def test_wrong_and_revoked_keys_fail(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    key = new_key(gw, "soon-revoked", "chat")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with client(gw) as c:
        with Counting(upstream, 0):
            for bad in (wrong, "gk_notakey", "sk-openai-style"):
                resp = c.get("/x", headers={"Authorization": f"Bearer {bad}"})
                assert resp.status_code == 401, bad
                assert 'error="invalid_token"' in resp.headers["www-authenticate"]
        assert c.get("/x", headers={"X-API-Key": key}).status_code == 200
        cli(gw.data_dir, "key", "revoke", key[3:15])
        deadline = time.monotonic() + 2.0
        status = 200
        while time.monotonic() < deadline and status == 200:
            status = c.get("/x", headers={"X-API-Key": key}).status_code
            time.sleep(0.05)
        assert status == 401  # within 2 s, without a restart


def test_login_flow_sets_a_safe_cookie(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    with client(gw) as c:
        start = c.get("/notes?id=7", headers={"Accept": "text/html"})
        assert start.status_code == 302
        form = c.get(start.headers["location"])
        assert form.status_code == 200 and "<form" in form.text
        csrf = CSRF_RE.search(form.text)
        assert csrf
        resp = c.post(
            "/.garrison/login",
            data={
                "username": "admin",
                "password": ADMIN_PASSWORD,
                "csrf": csrf.group(1),
                "next": "/notes?id=7",
            },
            headers={"Origin": gw.url},
        )
        assert resp.status_code == 303
        assert resp.headers["location"] == "/notes?id=7"
        cookie = next(v for v in resp.headers.get_list("set-cookie") if "__Host-garrison=" in v)
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"path", "secure", "httponly", "samesite"} <= attrs
        assert "SameSite=Lax" in cookie and "Path=/" in cookie
        c.cookies.set("lang", "en")
        with Counting(upstream, 1):
            page = c.get("/notes?id=7")
        assert page.status_code == 200
        seen = echoed(page)
        assert seen["x-forwarded-user"] == "admin"
        assert seen["x-garrison-roles"] == "admin"
        assert seen["cookie"] == "lang=en"  # the session id stays with us; other cookies pass


def test_login_refuses_cross_site_and_missing_csrf(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    with client(gw) as c:
        form = c.get("/.garrison/login")
        csrf = CSRF_RE.search(form.text)
        assert csrf
        fields = {"username": "admin", "password": ADMIN_PASSWORD, "next": "/"}
        no_token = c.post("/.garrison/login", data=fields, headers={"Origin": gw.url})
        foreign = c.post(
            "/.garrison/login",
            data={**fields, "csrf": csrf.group(1)},
            headers={"Origin": "https://evil.example"},
        )
        for resp in (no_token, foreign):
            assert resp.status_code == 403
            assert "__Host-garrison=" not in " ".join(resp.headers.get_list("set-cookie"))
        logout = c.post("/.garrison/logout", headers={"Origin": "https://evil.example"})
        assert logout.status_code == 403


def test_login_failures_look_the_same(gw: GatewayProcess) -> None:
    answers = []
    for user in ("nobody-here", "alice"):
        with client(gw) as c:
            csrf = CSRF_RE.search(c.get("/.garrison/login").text)
            assert csrf
            resp = c.post(
                "/.garrison/login",
                data={"username": user, "password": "wrong", "csrf": csrf.group(1)},
                headers={"Origin": gw.url},
            )
            body = CSRF_RE.sub("", resp.text).replace(user, "USER")
            answers.append((resp.status_code, body))
        with client(gw) as c:
            token = c.post(
                "/.garrison/token",
                data={"grant_type": "password", "username": user, "password": "wrong"},
            )
            answers.append((token.status_code, token.text))
    assert answers[0] == answers[2]
    assert answers[1] == answers[3]
    assert answers[0][0] == 401 and answers[1][0] == 400
    login(gw, "alice", ALICE_PASSWORD).close()  # resets the per-IP failure count


def test_logout_ends_the_session(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    c = login(gw, "admin", ADMIN_PASSWORD)
    with closing(c):
        assert c.get("/x").status_code == 200
        stolen = c.cookies.get("__Host-garrison")
        assert stolen
        bye = c.post("/.garrison/logout", headers={"Origin": gw.url})
        assert bye.status_code == 303
    with client(gw) as other, Counting(upstream, 0):
        resp = other.get("/x", headers={"Cookie": f"__Host-garrison={stolen}"})
        assert resp.status_code == 401


def test_password_change_and_disable_end_sessions(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    cli(gw.data_dir, "user", "add", "carol", "--password-stdin", stdin="carol-password-1\n")
    session = login(gw, "carol", "carol-password-1")
    with client(gw) as c:
        token = c.post(
            "/.garrison/token",
            data={"grant_type": "password", "username": "carol", "password": "carol-password-1"},
        )
    bearer = {"Authorization": f"Bearer {token.json()['access_token']}"}
    with closing(session), client(gw) as c:
        assert session.get("/x").status_code == 200
        assert c.get("/x", headers=bearer).status_code == 200
        cli(gw.data_dir, "user", "passwd", "carol", "--password-stdin", stdin="carol-pass-2\n")
        assert _refused_within(lambda: session.get("/x").status_code, 2.0)
        assert _refused_within(lambda: c.get("/x", headers=bearer).status_code, 2.0)
        again = login(gw, "carol", "carol-pass-2")
        with closing(again):
            assert again.get("/x").status_code == 200
            cli(gw.data_dir, "user", "disable", "carol")
            assert _refused_within(lambda: again.get("/x").status_code, 2.0)


def _refused_within(call: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if call() == 401:  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_token_endpoint_grants(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    with client(gw) as c:
        form = c.post(
            "/.garrison/token",
            data={"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD},
        )
        assert form.status_code == 200, form.text
        body = form.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] > 0
        assert form.headers["cache-control"] == "no-store"
        seed = c.post("/v1/token", json={"username": "alice", "password": ALICE_PASSWORD})
        assert seed.status_code == 200, seed.text  # the seed's endpoint, as a route alias
        key = new_key(gw, "cc", "chat", "files")
        cc = c.post(
            "/.garrison/token",
            data={"grant_type": "client_credentials", "client_secret": key, "scope": "chat"},
        )
        assert cc.status_code == 200, cc.text
        assert cc.json()["scope"] == "chat"
        for token in (body["access_token"], seed.json()["access_token"], cc.json()["access_token"]):
            with Counting(upstream, 1):
                resp = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token}"})
            assert resp.status_code == 200
        assert echoed(resp)["x-forwarded-user"] == "key:cc"
        bad = c.post("/.garrison/token", data={"grant_type": "implicit"})
        assert bad.status_code == 400 and bad.json()["error"] == "unsupported_grant_type"
        too_much = c.post(
            "/.garrison/token",
            data={"grant_type": "client_credentials", "client_secret": key, "scope": "admin"},
        )
        assert too_much.status_code == 400 and too_much.json()["error"] == "invalid_scope"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_forged_tokens_are_refused(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    with client(gw) as c:
        jwks = c.get("/.garrison/jwks.json").json()
        kid = jwks["keys"][0]["kid"]
        now = int(time.time())
        claims = {
            "iss": "garrison",
            "aud": "garrison",
            "sub": "admin",
            "iat": now,
            "exp": now + 600,
        }
        none_alg = _b64({"alg": "none", "typ": "JWT", "kid": kid}) + "." + _b64(claims) + "."
        other = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid})
        expired = jwt.encode({**claims, "exp": now - 100}, other, algorithm="ES256")
        with Counting(upstream, 0):
            for token in (none_alg, forged, expired, "a.b.c", "x" * 9000):
                resp = c.get("/x", headers={"Authorization": f"Bearer {token}"})
                assert resp.status_code == 401, token[:40]
                assert resp.json()["error"]["code"] == "invalid_token"
                assert resp.headers["www-authenticate"].startswith(
                    'Bearer realm="garrison", error="invalid_token"'
                )


def test_external_issuer_tokens(
    gw: GatewayProcess, upstream: FakeUpstream, external_key: tuple[rsa.RSAPrivateKey, Path]
) -> None:
    now = int(time.time())
    claims = {
        "iss": EXTERNAL_ISSUER,
        "aud": "garrison-tests",
        "sub": "dora",
        "iat": now,
        "exp": now + 300,
        "roles": ["admin"],
        "scope": "chat",
    }
    good = jwt.encode(claims, external_key[0], algorithm="RS256")
    wrong_aud = jwt.encode({**claims, "aud": "other"}, external_key[0], algorithm="RS256")
    with client(gw) as c:
        with Counting(upstream, 1):
            ok = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200, ok.text
        assert echoed(ok)["x-forwarded-user"] == "dora"
        with Counting(upstream, 0):
            resp = c.get("/x", headers={"Authorization": f"Bearer {wrong_aud}"})
        assert resp.status_code == 401


def test_assertion_verifies_against_jwks(gw: GatewayProcess) -> None:
    key = new_key(gw, "asserted", "chat", owner="alice")
    with client(gw) as c:
        resp = c.get("/x", headers={"X-API-Key": key})
        published = c.get("/.garrison/jwks.json").json()
    assert all(not {"d", "p", "q"} & set(k) for k in published["keys"])  # public parts only
    assertion = echoed(resp)["x-garrison-assertion"]
    kid = jwt.get_unverified_header(assertion)["kid"]
    public = next(k for k in jwt.PyJWKSet.from_dict(published).keys if k.key_id == kid)
    claims = jwt.decode(assertion, public, algorithms=["ES256"], audience="app", issuer="garrison")
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.test"
    assert 0 < claims["exp"] - claims["iat"] <= 300


def test_role_and_user_policies(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    admin = login(gw, "admin", ADMIN_PASSWORD)
    alice = login(gw, "alice", ALICE_PASSWORD)
    with closing(admin), closing(alice):
        with Counting(upstream, 1):
            assert admin.get("/admin/panel").status_code == 200
        with Counting(upstream, 0):
            denied = alice.get("/admin/panel", headers={"Accept": "text/html"})
            assert denied.status_code == 403 and "<html" in denied.text
            assert admin.get("/bob/x").status_code == 403


def test_per_ip_backoff_and_account_lockout(tmp_path: Path, upstream: FakeUpstream) -> None:
    text = f"""
[server]
listen = "127.0.0.1:0"
[auth]
ip_free_failures = 2
[[upstream]]
name = "app"
url = "{upstream.url}"
[[route]]
path = "/"
upstream = "app"
"""
    with running_gateway(tmp_path, text) as gateway, client(gateway) as c:
        statuses = []
        for _ in range(4):
            resp = c.post(
                "/.garrison/token",
                data={"grant_type": "password", "username": "admin", "password": "wrong"},
            )
            statuses.append(resp.status_code)
        assert statuses[:2] == [400, 400]
        assert statuses[-1] == 429
        assert int(resp.headers["retry-after"]) >= 1
        # The right password is refused too while the address is backing off.
        right = c.post(
            "/.garrison/token",
            data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        )
        assert right.status_code == 429
        # Each refused password also counted against the account (per-account backoff,
        # shown by `garrison user list` once it locks; see tests/cli/test_user_cli.py).
        engine = open_store(default_url(gateway.data_dir))
        try:
            assert (Users(engine).get("admin") or pytest.fail("no admin")).failed_logins == 2
        finally:
            engine.dispose()


def _own_signing_key(gw: GatewayProcess) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """Garrison's current signing key, read from its store: tokens that are validly signed
    but wrong in one claim test the claim checks, not the signature check."""
    engine = open_store(default_url(gw.data_dir))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(signing_keys).where(signing_keys.c.retired_at.is_(None))
            ).first()
    finally:
        engine.dispose()
    assert row is not None
    key = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return row.kid, key


@pytest.mark.parametrize(
    ("change", "headers"),
    [
        ({"iss": "https://evil.example/"}, {}),
        ({"aud": "someone-else"}, {}),
        ({"exp": -60}, {}),
        ({"nbf": 3600}, {}),
        ({}, {"crit": ["exp"]}),
        ({"exp": None}, {}),
    ],
    ids=["wrong-iss", "wrong-aud", "expired", "not-yet-valid", "unknown-crit", "no-exp"],
)
def test_validly_signed_but_wrong_tokens_are_401(
    gw: GatewayProcess,
    upstream: FakeUpstream,
    change: dict[str, object],
    headers: dict[str, object],
) -> None:
    kid, key = _own_signing_key(gw)
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "garrison",
        "aud": "garrison",
        "sub": "admin",
        "iat": now,
        "exp": now + 600,
    }
    for name, value in change.items():
        if value is None:
            del claims[name]
        elif name in ("exp", "nbf"):
            claims[name] = now + int(value)  # type: ignore[call-overload]
        else:
            claims[name] = value
    good = jwt.encode(
        {**claims, "iss": "garrison", "aud": "garrison", "exp": now + 600, "nbf": now},
        key,
        algorithm="ES256",
        headers={"kid": kid},
    )
    bad = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, **headers})
    with client(gw) as c:
        with Counting(upstream, 1):
            assert c.get("/x", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        with Counting(upstream, 0):
            resp = c.get("/x", headers={"Authorization": f"Bearer {bad}"})
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith(
        'Bearer realm="garrison", error="invalid_token"'
    )

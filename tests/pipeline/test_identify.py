"""The identify and authorise stages on a real store, without sockets: which credential is
read, what is removed before the upstream, and how each kind of refusal answers."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from sqlalchemy import Engine

from garrison.auth.apikeys import ApiKeys
from garrison.auth.identity import Identity
from garrison.auth.service import AuthService
from garrison.config import validate
from garrison.pipeline.authorise import Authorise
from garrison.pipeline.exchange import Exchange, Reply
from garrison.pipeline.identify import Identify
from garrison.pipeline.routes import CompiledRoute, RouteTable
from garrison.store.db import open_store


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'g.db'}")


def route(**options: object) -> CompiledRoute:
    config = validate(
        {
            "upstream": [{"name": "app", "url": "http://127.0.0.1:9"}],
            "route": [{"path": "/", "upstream": "app", **options}],
        }
    )
    return RouteTable(config.route).routes[0]


def run(stages: list[object], ex: Exchange) -> Reply | None:
    loop = asyncio.new_event_loop()
    try:
        for stage in stages:
            result = stage(ex)  # type: ignore[operator]
            if inspect.isawaitable(result):
                result = loop.run_until_complete(result)
            if result is not None:
                return result  # type: ignore[no-any-return]
        return None
    finally:
        loop.close()


def exchange(r: CompiledRoute, *headers: tuple[bytes, bytes], accept: bytes = b"*/*") -> Exchange:
    ex = Exchange("GET", b"/p?q=1", "1.1", [(b"host", b"gw"), (b"accept", accept), *headers], "::1")
    ex.path, ex.query, ex.host, ex.route = "/p", b"q=1", "gw", r
    return ex


def test_key_is_consumed_and_identity_sent_as_one_block(engine: Engine) -> None:
    service = AuthService(engine, validate({}).auth)
    _, key = ApiKeys(engine).create("bot", ["chat"])
    r = route()
    ex = exchange(
        r,
        (b"authorization", b"Bearer " + key.encode()),
        (b"authorization", b"Bearer " + key.encode()),
        (b"cookie", b"a=1"),
    )
    assert run([Identify(service, lambda e: None), Authorise(service)], ex) is None
    assert [n for n, _ in ex.headers] == [b"host", b"accept", b"cookie"]
    assert ex.identity_block.startswith(b"x-forwarded-user: key:bot\r\n")
    assert b"x-garrison-assertion: ey" in ex.identity_block


def test_a_bad_bearer_is_not_rescued_by_a_cookie(engine: Engine) -> None:
    service = AuthService(engine, validate({}).auth)
    ex = exchange(
        route(),
        (b"authorization", b"Bearer gk_aaaaaaaaaaaa_" + b"A" * 43),
        (b"cookie", b"__Host-garrison=whatever"),
    )
    reply = run([Identify(service, lambda e: None), Authorise(service)], ex)
    assert reply is not None and reply.status == 401
    assert (
        b"www-authenticate",
        b'Bearer realm="garrison", error="invalid_token", '
        b'error_description="invalid, revoked or expired API key"',
    ) in reply.headers


@pytest.mark.parametrize(
    ("options", "header", "status"),
    [
        ({"auth": ["jwt"]}, (b"x-api-key", b"gk_x"), 401),
        ({"auth": ["session"]}, (b"authorization", b"Bearer abc.def.ghi"), 401),
        ({}, (b"authorization", b"Basic dXNlcjpwYXNz"), 401),
    ],
    ids=["key-not-accepted", "bearer-not-accepted", "basic"],
)
def test_methods_the_route_does_not_accept(
    engine: Engine, options: dict[str, object], header: tuple[bytes, bytes], status: int
) -> None:
    service = AuthService(engine, validate({}).auth)
    reply = run(
        [Identify(service, lambda e: None), Authorise(service)], exchange(route(**options), header)
    )
    assert reply is not None and reply.status == status
    assert b"invalid_token" in reply.body


def test_browser_without_session_is_redirected_with_its_target(engine: Engine) -> None:
    service = AuthService(engine, validate({}).auth)
    ex = exchange(route(), accept=b"text/html,application/xhtml+xml")
    reply = run([Identify(service, lambda e: None), Authorise(service)], ex)
    assert reply is not None and reply.status == 302
    assert (b"location", b"/.garrison/login?next=%2Fp%3Fq%3D1") in reply.headers
    api_only = exchange(route(auth=["api_key"]), accept=b"text/html")
    reply = run([Identify(service, lambda e: None), Authorise(service)], api_only)
    assert reply is not None and reply.status == 401  # no login page can help there


def test_store_failure_fails_closed_with_503(engine: Engine, tmp_path: Path) -> None:
    service = AuthService(engine, validate({}).auth)
    _, key = ApiKeys(engine).create("bot", ["chat"])
    (tmp_path / "g.db").unlink()
    engine.dispose()  # new connections find an empty file: no tables
    ex = exchange(route(), (b"x-api-key", key.encode()))
    reply = run([Identify(service, lambda e: None), Authorise(service)], ex)
    assert reply is not None and reply.status == 503
    assert (b"retry-after", b"5") in reply.headers


def _cert_identity(name: str, roles: tuple[str, ...] = ()) -> Identity:
    return Identity(method="client_cert", name=name, roles=roles)


@pytest.mark.parametrize(
    ("auth", "session_user", "cert_user", "expected"),
    [
        (["client_cert"], None, "ana", ("client_cert", "ana")),
        (["client_cert"], None, None, 403),
        (["client_cert+session"], "ana", "ana", ("session", "ana")),
        (["client_cert+session"], "bob", "ana", 403),
        (["client_cert+session"], "ana", None, 403),
        (["client_cert+session"], None, "ana", 302),
        (["session", "client_cert"], "bob", None, ("session", "bob")),
        (["session", "client_cert"], None, "ana", ("client_cert", "ana")),
    ],
    ids=[
        "cert-alone",
        "cert-missing",
        "both-same-person",
        "both-different-people",
        "both-no-cert",
        "both-no-login",
        "either-session",
        "either-cert",
    ],
)
def test_certificate_combinations(
    engine: Engine,
    auth: list[str],
    session_user: str | None,
    cert_user: str | None,
    expected: tuple[str, str] | int,
) -> None:
    service = AuthService(engine, validate({}).auth)
    config = validate(
        {
            "client_certs": {"mode": "optional"},
            "upstream": [{"name": "app", "url": "http://127.0.0.1:9"}],
            "route": [{"path": "/", "upstream": "app", "auth": auth}],
        }
    )
    r = RouteTable(config.route).routes[0]
    ex = exchange(r, accept=b"text/html")
    if session_user:
        ex.identity = Identity(method="session", name=session_user)
    if cert_user:
        ex.cert_identity = _cert_identity(cert_user)
    reply = Authorise(service)(ex)
    if isinstance(expected, int):
        assert reply is not None and reply.status == expected
    else:
        assert reply is None
        assert ex.identity is not None
        assert (ex.identity.method, ex.identity.name) == expected

"""The JSON admin API without sockets: routing (404 / 405 with Allow), CSRF for cookie calls,
bounded bodies, 422 with field paths and never the values, errors as JSON, the OpenAPI
document, and the endpoint router's prefixes and registry."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from garrison.admin import install
from garrison.admin.api import OPS, AdminApi
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply
from tests.admin.conftest import World, run
from tests.admin.test_guard import HOST, bearer, exchange, key, session


class Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_body(self, limit: int) -> bytes:
        if len(self.data) > limit:
            raise BodyTooLarge
        return self.data


@pytest.fixture
def api(world: World) -> Iterator[AdminApi]:
    yield AdminApi(world.service, world.guard)


def call(
    api: AdminApi,
    method: str,
    path: str,
    *headers: tuple[bytes, bytes],
    body: object = None,
    raw: bytes | None = None,
    ctype: bytes = b"application/json",
) -> tuple[int, Any, Reply]:
    ex = exchange(*headers, method=method, path=path.partition("?")[0])
    ex.query = path.partition("?")[2].encode()
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    if data:
        ex.headers.append((b"content-type", ctype))
    ex.body_source = Body(data)
    reply = run(api(ex))
    payload = json.loads(reply.body) if reply.content_type == b"application/json" else None
    return reply.status, payload, reply


@pytest.fixture
def admin_key(world: World) -> tuple[bytes, bytes]:
    return bearer(key(world, "root", "admin"))


def test_routing_404_405_and_head(api: AdminApi, admin_key: tuple[bytes, bytes]) -> None:
    assert call(api, "GET", "/.garrison/api/nope", admin_key)[0] == 404
    assert call(api, "GET", "/.garrison/api/keys/NOT-AN-ID", admin_key)[0] == 404
    status, body, reply = call(api, "PUT", "/.garrison/api/users", admin_key)
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert dict(reply.headers)[b"allow"] == b"GET, HEAD, POST"
    assert call(api, "HEAD", "/.garrison/api/users", admin_key)[0] == 200
    assert call(api, "GET", "/.garrison/api/users/", admin_key)[0] == 200


def test_unknown_paths_are_403_for_non_admins(world: World, api: AdminApi) -> None:
    """The guard runs before routing: a non-admin cannot map the API by its 404s."""
    carol = session(world, "carol")
    assert call(api, "GET", "/.garrison/api/nope", carol)[0] == 403
    assert call(api, "GET", "/.garrison/api/users", carol)[0] == 403


def test_validation_names_fields_not_values(api: AdminApi, admin_key: tuple[bytes, bytes]) -> None:
    body = {"name": "x y", "password": "short-secret", "extra": 1}
    status, payload, _ = call(api, "POST", "/.garrison/api/users", admin_key, body=body)
    assert status == 422
    locs = {f["loc"] for f in payload["error"]["fields"]}
    assert locs == {"body.name", "body.extra"}
    assert "short-secret" not in json.dumps(payload)
    status, payload, _ = call(api, "POST", "/.garrison/api/users", admin_key, body={})
    assert status == 422 and {"body.name", "body.password"} <= {
        f["loc"] for f in payload["error"]["fields"]
    }
    assert call(api, "GET", "/.garrison/api/audit?status=abc", admin_key)[0] == 422
    assert call(api, "GET", "/.garrison/api/audit?limit=1&limit=2", admin_key)[0] == 422
    assert call(api, "GET", "/.garrison/api/audit?since=inf", admin_key)[0] == 422
    key_body = {"name": "k", "scopes": ["chat"], "rate": ["1e999/day"]}
    assert call(api, "POST", "/.garrison/api/keys", admin_key, body=key_body)[0] == 422


def test_bodies_bounded_typed_and_parsed(api: AdminApi, admin_key: tuple[bytes, bytes]) -> None:
    big = b'{"name":"' + b"a" * 70_000 + b'"}'
    assert call(api, "POST", "/.garrison/api/users", admin_key, raw=big)[0] == 413
    assert call(api, "POST", "/.garrison/api/users", admin_key, raw=b"{nope")[0] == 400
    deep = b"[" * 100_000 + b"]" * 100_000
    assert call(api, "POST", "/.garrison/api/users", admin_key, raw=deep[:60_000])[0] == 400
    form = b"name=x&password=yyyyyyyyyy"
    status = call(api, "POST", "/.garrison/api/users", admin_key, raw=form, ctype=b"text/plain")
    assert status[0] == 415


def test_created_and_errors_from_the_service(api: AdminApi, admin_key: tuple[bytes, bytes]) -> None:
    user = {"name": "dave", "password": "dave-password"}
    status, payload, _ = call(api, "POST", "/.garrison/api/users", admin_key, body=user)
    assert (status, payload["name"]) == (201, "dave")
    status, payload, _ = call(api, "POST", "/.garrison/api/users", admin_key, body=user)
    assert (status, payload["error"]["code"]) == (409, "user_exists")
    status, payload, _ = call(
        api, "POST", "/.garrison/api/keys", admin_key, body={"name": "k", "scopes": ["chat"]}
    )
    assert status == 201 and payload["secret"].startswith(payload["key"]["prefix"])
    listed = call(api, "GET", "/.garrison/api/keys", admin_key)[1]
    assert payload["secret"] not in json.dumps(listed)
    status, payload, _ = call(api, "PATCH", "/.garrison/api/users/nobody", admin_key, body={})
    assert (status, payload["error"]["code"]) == (404, "user_not_found")


def test_cookie_calls_need_same_origin_and_the_csrf_header(world: World, api: AdminApi) -> None:
    root = session(world, "root")
    body = {"name": "erin", "password": "erin-password"}
    origin = (b"origin", f"https://{HOST}".encode())
    csrf = (b"x-garrison-csrf", b"1")
    assert call(api, "POST", "/.garrison/api/users", root, body=body)[0] == 403
    assert call(api, "POST", "/.garrison/api/users", root, origin, body=body)[0] == 403
    assert call(api, "POST", "/.garrison/api/users", root, csrf, body=body)[0] == 403
    assert call(api, "GET", "/.garrison/api/users", root)[0] == 200  # reads need neither
    assert call(api, "POST", "/.garrison/api/users", root, origin, csrf, body=body)[0] == 201
    fetch = (b"sec-fetch-site", b"same-origin")
    again = {"name": "fred", "password": "fred-password"}
    assert call(api, "POST", "/.garrison/api/users", root, fetch, csrf, body=again)[0] == 201


def test_an_unexpected_failure_is_a_500_with_an_id(
    api: AdminApi, admin_key: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(api.service, "list_users", broken)
    status, payload, _ = call(api, "GET", "/.garrison/api/users", admin_key)
    assert status == 500 and re.fullmatch(r"[0-9a-f]{12}", payload["error"]["id"])
    assert "secret detail" not in json.dumps(payload)


def test_openapi_document_covers_every_operation(
    api: AdminApi, admin_key: tuple[bytes, bytes]
) -> None:
    status, doc, _ = call(api, "GET", "/.garrison/api/openapi.json", admin_key)
    assert status == 200 and doc["openapi"].startswith("3.1")
    for op in OPS:
        operation = doc["paths"]["/.garrison/api" + op.path][op.method.lower()]
        assert str(op.status) in operation["responses"]
        assert ("requestBody" in operation) == (op.body is not None)
    text = json.dumps(doc)
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in doc["components"]["schemas"], ref


def test_router_prefixes_and_registry(world: World) -> None:
    endpoints = GatewayEndpoints()
    install(endpoints, world.service, world.guard)
    routes = endpoints.routes()
    assert ("GET", "/.garrison/api/users") in routes
    assert ("DELETE", "/.garrison/api/keys/{key_id}") in routes
    assert ("*", "/.garrison/healthz") in routes
    with pytest.raises(ValueError):
        endpoints.add_prefix("/.garrison/api", lambda ex: None)
    seen: list[str] = []
    endpoints.add_prefix("/.garrison/api/deep/", lambda ex: seen.append(ex.path))  # type: ignore[func-returns-value]
    for path in ("/.garrison/api/deep/x", "/.garrison/api/deep"):
        endpoints(Exchange("GET", path.encode(), "1.1", [], "127.0.0.1", path=path))
    assert seen == ["/.garrison/api/deep/x", "/.garrison/api/deep"]
    missing = endpoints(Exchange("GET", b"/", "1.1", [], "127.0.0.1", path="/.garrison/zzz"))
    assert isinstance(missing, Reply) and missing.status == 404
    assert endpoints(Exchange("GET", b"/", "1.1", [], "127.0.0.1", path="/app")) is None

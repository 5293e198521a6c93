"""CORS end to end: a real gateway, a real upstream that answers like an app with
`CORSMiddleware(allow_origins=["*"], allow_credentials=True)`, real HTTP clients, and Chromium.

What must hold: an allowed origin can read every answer (200, the gateway's own 401 and 429,
with the rate limit headers and Retry-After exposed); preflights are answered by the gateway
and never reach the upstream; anything not allowed gets no CORS header at all; the app's own
permissive CORS headers never reach the client unless a route passes them through explicitly.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, spki_hash
from tests.e2e.fixtures_core import (
    OPEN,
    client,
    dead_upstream,
    gateway_config,
    route_toml,
    running_gateway,
    toml_table,
)
from tests.e2e.test_auth import Counting
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import BackgroundApp, FakeUpstream

pytestmark = pytest.mark.e2e

APP = "https://app.example.com"
EXPOSED = (
    "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, X-RateLimit-Limit, "
    "X-RateLimit-Remaining, Retry-After, X-Request-Id"
)


class PermissiveApp(FakeUpstream):
    """The FakeUpstream, with the CORS headers a permissive app adds to every response."""

    def build_app(self) -> web.Application:
        app = super().build_app()
        app.on_response_prepare.append(self._cors)
        return app

    @staticmethod
    async def _cors(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "X-Internal"
        response.headers["X-Request-Id"] = "req-1"


PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>cors</title></head>
<body><p>a page on some origin</p></body></html>"""


class PageServer(BackgroundApp):
    """Serves one HTML page over plain HTTP, for Chromium to run fetch() from its origin."""

    port: int = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        return app

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")


@pytest.fixture(scope="module")
def upstream() -> Iterator[PermissiveApp]:
    with PermissiveApp() as up:
        yield up


@pytest.fixture(scope="module")
def pages() -> Iterator[PageServer]:
    with PageServer() as server:
        yield server


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: PermissiveApp, pages: PageServer
) -> Iterator[GatewayProcess]:
    cors = toml_table(
        "[cors]",
        f'allow_origins = ["{APP}", "http://127.0.0.1:{pages.port}"]',
        "allow_credentials = true",
        'expose_headers = ["X-Request-Id"]',
        'max_age = "5m"',
    )
    text = gateway_config(
        upstream.url,
        cors,
        dead_upstream("dead"),
        route_toml("/down/", "dead", OPEN),
        route_toml("/api/"),
        route_toml("/rated/", "app", OPEN, 'rate = ["2/minute"]'),
        route_toml("/browser/", "app", OPEN, 'rate = ["100/minute"]'),
        route_toml("/pub/", "app", OPEN),
        route_toml("/off/", "app", OPEN, "cors = false"),
        route_toml("/legacy/", "app", OPEN, "cors = false", "cors_passthrough = true"),
        route_toml(
            "/own/",
            "app",
            OPEN,
            "[route.cors]",
            'allow_origins = ["https://other.example.com"]',
            'allow_methods = ["GET", "PUT"]',
        ),
        route_toml("/v1/", "app", 'token_alias = "/v1/token"'),
    )
    with running_gateway(tmp_path_factory.mktemp("cors"), text) as gateway:
        yield gateway


@pytest.fixture
def http(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with client(gw) as c:
        yield c


def assert_cors_for(resp: httpx.Response, origin: str = APP) -> None:
    """The full set of CORS headers for an allowed origin, each exactly once."""
    headers = resp.headers
    assert headers.get_list("access-control-allow-origin") == [origin], headers
    assert headers.get_list("access-control-allow-credentials") == ["true"]
    assert headers.get_list("access-control-expose-headers") == [EXPOSED]
    assert "Origin" in headers.get_list("vary")


def assert_no_cors(resp: httpx.Response) -> None:
    assert not [k for k in resp.headers if k.lower().startswith("access-control-")], resp.headers


# -- actual requests --------------------------------------------------------------------------


def test_allowed_origin_reads_200_and_the_apps_star_is_replaced(
    http: httpx.Client, upstream: PermissiveApp
) -> None:
    with Counting(upstream, 1):
        resp = http.get("/pub/x", headers={"Origin": APP})
    assert resp.status_code == 200
    assert_cors_for(resp)
    assert resp.headers["x-request-id"] == "req-1"
    assert "X-Internal" not in resp.headers["access-control-expose-headers"]
    sent = dict((k.lower(), v) for k, v in resp.json()["headers"])
    assert sent["origin"] == APP  # the upstream still learns the origin


def test_401_and_429_carry_cors_so_the_page_can_read_them(
    http: httpx.Client, upstream: PermissiveApp
) -> None:
    with Counting(upstream, 0):
        denied = http.get("/api/x", headers={"Origin": APP})
    assert denied.status_code == 401
    assert_cors_for(denied)
    assert denied.json()["error"]["code"]
    with Counting(upstream, 2):
        ok = [http.get("/rated/x", headers={"Origin": APP}) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    for resp in ok:
        assert_cors_for(resp)
    assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["1", "0"]
    with Counting(upstream, 0):
        limited = http.get("/rated/x", headers={"Origin": APP})
    assert limited.status_code == 429
    assert_cors_for(limited)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit"] == "2"
    assert limited.json()["error"]["code"] == "rate_limited"


def test_upstream_failure_carries_cors(http: httpx.Client) -> None:
    resp = http.get("/down/x", headers={"Origin": APP})
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_unavailable"
    assert_cors_for(resp)


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com.evil.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://APP.EXAMPLE.COM",
        "https://app.example.com/",
        "null",
        "https://other.example.com",
    ],
)
def test_other_origins_get_no_cors_and_not_the_apps_either(http: httpx.Client, origin: str) -> None:
    resp = http.get("/pub/x", headers={"Origin": origin})
    assert resp.status_code == 200
    assert_no_cors(resp)


def test_no_origin_no_cors_and_the_apps_headers_stripped(http: httpx.Client) -> None:
    resp = http.get("/pub/x")
    assert resp.status_code == 200
    assert_no_cors(resp)
    assert "vary" not in resp.headers


def test_route_with_cors_off_strips_the_app_and_passthrough_keeps_it(http: httpx.Client) -> None:
    off = http.get("/off/x", headers={"Origin": APP})
    assert off.status_code == 200
    assert_no_cors(off)
    legacy = http.get("/legacy/x", headers={"Origin": "https://evil.example"})
    assert legacy.headers.get_list("access-control-allow-origin") == ["*"]
    assert legacy.headers["access-control-expose-headers"] == "X-Internal"


def test_route_table_replaces_the_global_one(http: httpx.Client) -> None:
    assert_no_cors(http.get("/own/x", headers={"Origin": APP}))
    own = http.get("/own/x", headers={"Origin": "https://other.example.com"})
    assert own.headers["access-control-allow-origin"] == "https://other.example.com"
    assert "access-control-allow-credentials" not in own.headers


RELOAD_CONFIG = """
[server]
listen = "127.0.0.1:0"

[cors]
{cors}

[[upstream]]
name = "app"
url = "{url}"

[[route]]
path = "/"
upstream = "app"
auth = ["none"]
"""


def test_reload_swaps_the_policy_and_a_bad_one_is_refused(
    tmp_path: Path, upstream: PermissiveApp
) -> None:
    first = RELOAD_CONFIG.format(cors=f'allow_origins = ["{APP}"]', url=upstream.url)
    with running_gateway(tmp_path, first) as gw:
        path = gw.config_path
        with client(gw) as c:
            assert_cors_origin(c.get("/x", headers={"Origin": APP}), APP)
            other = "https://b.example.com"
            path.write_text(
                RELOAD_CONFIG.format(cors=f'allow_origins = ["{other}"]', url=upstream.url)
            )
            gw.signal(signal.SIGHUP)
            gw.wait_for_line("configuration reloaded")
            assert_no_cors(c.get("/x", headers={"Origin": APP}))
            assert_cors_origin(c.get("/x", headers={"Origin": other}), other)
            bad = 'allow_origins = ["*"]\nallow_credentials = true'
            path.write_text(RELOAD_CONFIG.format(cors=bad, url=upstream.url))
            gw.signal(signal.SIGHUP)
            gw.wait_for_line("allow_credentials = true cannot go with")
            assert_cors_origin(c.get("/x", headers={"Origin": other}), other)
            assert_no_cors(c.get("/x", headers={"Origin": "https://evil.example"}))


def assert_cors_origin(resp: httpx.Response, origin: str) -> None:
    assert resp.status_code == 200
    assert resp.headers.get_list("access-control-allow-origin") == [origin]


# -- preflights -------------------------------------------------------------------------------


def preflight(
    http: httpx.Client, path: str, origin: str = APP, method: str = "POST", headers: str = ""
) -> httpx.Response:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        sent["Access-Control-Request-Headers"] = headers
    return http.options(path, headers=sent)


def test_preflight_is_answered_by_the_gateway(http: httpx.Client, upstream: PermissiveApp) -> None:
    with Counting(upstream, 0):
        resp = preflight(http, "/api/chat", headers="authorization, content-type")
    assert resp.status_code == 204, resp.text
    assert resp.content == b"" and "content-length" not in resp.headers
    assert resp.headers.get_list("access-control-allow-origin") == [APP]
    assert resp.headers["access-control-allow-methods"] == "GET, POST"
    assert resp.headers["access-control-allow-headers"] == "Authorization, Content-Type"
    assert resp.headers["access-control-max-age"] == "300"
    assert resp.headers["access-control-allow-credentials"] == "true"
    assert resp.headers["vary"] == (
        "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    )
    own = preflight(http, "/own/x", "https://other.example.com", "PUT")
    assert own.status_code == 204 and own.headers["access-control-allow-methods"] == "GET, PUT"


@pytest.mark.parametrize(
    ("path", "origin", "method", "headers", "code", "named"),
    [
        ("/api/x", "https://evil.example", "POST", "", "cors_origin_not_allowed", "evil.example"),
        ("/api/x", "null", "GET", "", "cors_origin_not_allowed", "'null'"),
        ("/api/x", APP, "DELETE", "", "cors_method_not_allowed", "'DELETE'"),
        ("/api/x", APP, "POST", "content-type, x-admin", "cors_header_not_allowed", "x-admin"),
        ("/own/x", APP, "GET", "", "cors_origin_not_allowed", APP),
    ],
)
def test_refused_preflight_says_why_and_allows_nothing(
    http: httpx.Client,
    upstream: PermissiveApp,
    path: str,
    origin: str,
    method: str,
    headers: str,
    code: str,
    named: str,
) -> None:
    with Counting(upstream, 0):
        resp = preflight(http, path, origin, method, headers)
    assert resp.status_code == 403
    error = resp.json()["error"]
    assert error["code"] == code and named in error["message"]
    assert_no_cors(resp)


def test_preflight_on_a_route_without_cors_is_not_answered_for_it(
    http: httpx.Client, upstream: PermissiveApp
) -> None:
    # /off/ is public: the OPTIONS goes to the app like any request, and what the app says
    # about CORS is stripped on the way back.
    with Counting(upstream, 1):
        resp = preflight(http, "/off/x")
    assert_no_cors(resp)


# -- the token alias --------------------------------------------------------------------------


def test_token_alias_serves_allowed_origins_only(http: httpx.Client) -> None:
    form = {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD}
    cross = {"Origin": APP, "Sec-Fetch-Site": "cross-site"}
    ok = http.post("/v1/token", data=form, headers=cross)
    assert ok.status_code == 200, ok.text
    assert ok.json()["token_type"] == "Bearer"
    assert_cors_for(ok)
    evil = http.post("/v1/token", data=form, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"] == "access_denied"
    assert_no_cors(evil)
    # The gateway's own endpoint stays same-origin: no CORS under /.garrison/.
    own = http.post("/.garrison/token", data=form, headers=cross)
    assert own.status_code == 403
    assert_no_cors(own)


# -- a real browser ---------------------------------------------------------------------------

FETCH = """async ([url, init]) => {
  try {
    const r = await fetch(url, init);
    return {status: r.status, remaining: r.headers.get("X-RateLimit-Remaining"),
            body: await r.text()};
  } catch (e) {
    return {error: String(e)};
  }
}"""


@pytest.fixture(scope="module")
def browser(playwright_driver: Any, gw: GatewayProcess) -> Iterator[Any]:
    browser = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(gw)}"],
    )
    try:
        yield browser
    finally:
        browser.close()


def run_fetch(browser: Any, page_url: str, url: str, init: dict[str, Any]) -> dict[str, Any]:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(page_url, wait_until="load")
        result: dict[str, Any] = page.evaluate(FETCH, [url, init])
        return result
    finally:
        context.close()


@pytest.mark.slow
def test_browser_on_allowed_origin_reads_rate_headers_other_origin_cannot(
    browser: Any, gw: GatewayProcess, pages: PageServer, upstream: PermissiveApp
) -> None:
    target = gw.url + "/browser/x"
    allowed = f"http://127.0.0.1:{pages.port}/"
    other = f"http://localhost:{pages.port}/"
    simple = run_fetch(browser, allowed, target, {})
    assert simple.get("status") == 200, simple
    assert simple["remaining"] is not None and int(simple["remaining"]) >= 0
    assert json.loads(simple["body"])["method"] == "GET"
    # A JSON POST needs a preflight: the gateway answers it, then the POST goes through.
    before = upstream.count("/browser/")
    post = run_fetch(
        browser,
        allowed,
        target,
        {"method": "POST", "headers": {"Content-Type": "application/json"}, "body": "{}"},
    )
    assert post.get("status") == 200, post
    assert [r.method for r in upstream.requests[-1:]] == ["POST"]
    assert upstream.count("/browser/") == before + 1  # the OPTIONS never reached the app
    blocked = run_fetch(browser, other, target, {})
    assert "error" in blocked and "TypeError" in blocked["error"], blocked

"""Headers across the gateway (DESIGN §5.2, §6): the client never sets identity or forwarding
headers, hop-by-hop headers stop at the gateway, and the upstream learns who asked, how, and
through which prefix, from headers Garrison writes itself.

The FakeUpstream echoes every request header it received, so each test reads exactly what
reached the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.fixtures_core import (
    RawResponse,
    client_context,
    config,
    get,
    running_gateway,
    send_raw,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

STRIP_ROUTE = '[[route]]\npath = "/app/"\nauth = ["none"]\nupstream = "app"\nstrip_prefix = true\n'
OURS = ("x-forwarded-for", "x-real-ip", "x-forwarded-proto", "x-forwarded-host")

SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Port", "80"),
    ("X-Forwarded-Server", "evil"),
    ("X-Real-IP", "6.6.6.6"),
    ("x-real-ip", "6.6.6.7"),
    ("Forwarded", "for=6.6.6.6;proto=http;host=evil.example"),
    ("X-SSL-Client-Cert", "-----BEGIN CERTIFICATE-----"),
    ("X-SSL-Client-DN", "CN=admin"),
    ("X-SSL-Client-Verify", "SUCCESS"),
    ("X-Forwarded-User", "admin"),
    ("X-FORWARDED-USER", "root"),
    ("X-Forwarded-Email", "admin@example.com"),
    ("X-Garrison-User", "admin"),
    ("X-Garrison-Roles", "admin"),
    ("x-garrison-identity", "admin"),
]
SPOOFED_NAMES = {name.lower() for name, _ in SPOOFED}


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    text = config(upstream.url, routes=STRIP_ROUTE)
    with running_gateway(tmp_path_factory.mktemp("headers"), text) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def trusting(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """The test client connects from 127.0.0.1, which this gateway trusts as a proxy."""
    text = config(upstream.url, server='trusted_proxies = ["127.0.0.0/8"]\n', routes=STRIP_ROUTE)
    with running_gateway(tmp_path_factory.mktemp("headers-trusting"), text) as gateway:
        yield gateway


def request(
    gw: GatewayProcess, target: str, headers: list[tuple[str, str]], host: str = "app.example.test"
) -> RawResponse:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
    data = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n"
    resp = send_raw(gw, data.encode("latin-1"))
    assert resp.status == 200, resp.raw[:400]
    return resp


def test_spoofed_identity_headers_are_replaced(gw: GatewayProcess) -> None:
    seen = request(gw, "/echo", SPOOFED).echoed()
    leaked = {n: v for n, v in seen.items() if n in SPOOFED_NAMES and n not in OURS}
    assert leaked == {}, f"client-set identity headers reached the upstream: {leaked}"
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-real-ip"] == ["127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["app.example.test"]
    assert "x-forwarded-prefix" not in seen  # nothing was stripped on this route


def test_forwarded_prefix_is_ours_when_a_prefix_is_stripped(gw: GatewayProcess) -> None:
    resp = request(gw, "/app/page?x=1", SPOOFED)
    assert resp.json()["raw_path"] == "/page?x=1"
    seen = resp.echoed()
    ours = (*OURS, "x-forwarded-prefix")
    assert {n for n in seen if n in SPOOFED_NAMES and n not in ours} == set()
    assert seen["x-forwarded-prefix"] == ["/app"]
    assert seen["x-forwarded-host"] == ["app.example.test"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]


def test_untrusted_peer_cannot_choose_its_ip(gw: GatewayProcess) -> None:
    seen = request(gw, "/echo", [("X-Forwarded-For", "1.2.3.4, 5.6.7.8")]).echoed()
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-real-ip"] == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("incoming", "real_ip", "chain"),
    [
        (["1.2.3.4"], "1.2.3.4", "1.2.3.4, 127.0.0.1"),
        # walk right to left: the first untrusted hop is the client, whatever it claims before
        (["9.9.9.9, 1.2.3.4"], "1.2.3.4", "9.9.9.9, 1.2.3.4, 127.0.0.1"),
        (["1.2.3.4, 127.0.0.5"], "1.2.3.4", "1.2.3.4, 127.0.0.5, 127.0.0.1"),
        # several header lines read as one list, in order
        (["9.9.9.9", "1.2.3.4"], "1.2.3.4", "9.9.9.9, 1.2.3.4, 127.0.0.1"),
        # garbage is never taken as the client: the last trusted hop is the best we know
        (["not-an-ip"], "127.0.0.1", "not-an-ip, 127.0.0.1"),
    ],
)
def test_trusted_proxy_chain(
    trusting: GatewayProcess, incoming: list[str], real_ip: str, chain: str
) -> None:
    headers = [("X-Forwarded-For", value) for value in incoming]
    seen = request(trusting, "/echo", [*headers, ("X-Real-IP", "6.6.6.6")]).echoed()
    assert seen["x-real-ip"] == [real_ip]
    assert seen["x-forwarded-for"] == [chain]


def test_trusted_proxy_cannot_set_other_identity_headers(trusting: GatewayProcess) -> None:
    seen = request(trusting, "/app/x", SPOOFED).echoed()
    ours = (*OURS, "x-forwarded-prefix")
    leaked = {n: v for n, v in seen.items() if n in SPOOFED_NAMES and n not in ours}
    assert leaked == {}
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-prefix"] == ["/app"]
    assert seen["x-forwarded-host"] == ["app.example.test"]


def test_hop_by_hop_headers_are_not_forwarded(gw: GatewayProcess) -> None:
    headers = [
        ("Connection", "keep-alive, Foo, X-Listed-Hop"),
        ("Foo", "bar"),
        ("X-Listed-Hop", "1"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"),
        ("X-End-To-End", "kept"),
        ("Authorization", "Bearer end-to-end"),
        ("Cookie", "a=1"),
    ]
    seen = request(gw, "/echo", headers).echoed()
    for gone in ("foo", "x-listed-hop", "keep-alive", "te", "trailer", "proxy-authorization",
                 "proxy-connection", "upgrade", "transfer-encoding"):  # fmt: skip
        assert gone not in seen, f"{gone} reached the upstream: {seen[gone]}"
    assert seen.get("connection", []) in ([], ["keep-alive"], ["close"])
    assert seen["x-end-to-end"] == ["kept"]
    assert seen["authorization"] == ["Bearer end-to-end"]
    assert seen["cookie"] == ["a=1"]


def test_h2c_upgrade_is_not_forwarded(gw: GatewayProcess) -> None:
    headers = [
        ("Connection", "Upgrade, HTTP2-Settings"),
        ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    ]
    resp = request(gw, "/echo", headers)
    seen = resp.echoed()
    assert "upgrade" not in seen and "http2-settings" not in seen
    assert resp.header("upgrade") is None


@pytest.mark.parametrize(
    "host", ["app.example.test:8443", "APP.Example.Test", "127.0.0.1", "[::1]:9"]
)
def test_host_is_forwarded_as_sent(gw: GatewayProcess, host: str) -> None:
    seen = request(gw, "/echo", [], host=host).echoed()
    assert seen["host"] == [host]
    assert seen["x-forwarded-host"] == [host]


def test_response_security_headers_on_proxied_answer(gw: GatewayProcess) -> None:
    resp = get(gw, "/echo")
    assert resp.status == 200
    assert resp.all("strict-transport-security") == ["max-age=31536000"]
    assert resp.all("x-content-type-options") == ["nosniff"]
    assert resp.all("referrer-policy") == ["strict-origin-when-cross-origin"]
    assert resp.header("server") is not None  # the upstream's own headers still pass


def test_no_shared_cookie_jar(gw: GatewayProcess) -> None:
    """Two clients, two connections: each sees only its own cookie, never the other's."""
    trust = client_context(gw)
    with (
        httpx.Client(base_url=gw.url, verify=trust) as first,
        httpx.Client(base_url=gw.url, verify=trust) as second,
    ):
        one = first.get("/cookie", params={"v": "first"})
        assert one.json() == {"had_cookie": None}
        assert one.cookies.get("session") == "first"
        two = second.get("/cookie", params={"v": "second"})
        assert two.json() == {"had_cookie": None}, "the second client got the first's cookie"
        assert two.cookies.get("session") == "second"
        again = first.get("/cookie", params={"v": "third"})
        assert again.json() == {"had_cookie": "session=first"}
        again2 = second.get("/cookie", params={"v": "fourth"})
        assert again2.json() == {"had_cookie": "session=second"}
    # and a brand-new raw connection carries no cookie at all
    fresh = get(gw, "/cookie?v=fifth")
    assert fresh.json() == {"had_cookie": None}
    assert fresh.all("set-cookie")[0].startswith("session=fifth")

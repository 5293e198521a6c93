"""Malformed and hostile requests over real TLS: a clear 4xx, a closed connection, and nothing
reaching the upstream (DESIGN §5.3, §6). Upstream failures: 502 and 504, and the gateway goes on.

Every bad request is sent as raw bytes in one write on a fresh TLS connection, without
`Connection: close`, so that a closed connection is the gateway's own decision. A canary
request afterwards proves that the gateway still serves and that the upstream saw nothing else.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Iterator

import pytest

from tests.e2e.fixtures_core import (
    READ_TIMEOUT_S,
    SECURITY_HEADERS,
    assert_html_error,
    assert_json_error,
    canary,
    closed_port,
    config,
    get,
    read_response,
    running_gateway,
    send_raw,
    tls_socket,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

MAX_BODY = 1000  # "1kB"
MAX_HEADER_BYTES = 8 * 1024  # "8KiB"
TRICKLE_STEPS = 50  # bounded: a slow sender gives up after this many header lines


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    text = config(
        upstream.url,
        server="""
max_body = "1kB"
max_header_bytes = "8KiB"
max_headers = 50

[server.timeouts]
header_read = "1s"
keepalive_idle = "60s"
upstream_idle = "1s"
""",
        upstreams=f"""
[[upstream]]
name = "down"
url = "http://127.0.0.1:{closed_port()}"
""",
        routes="""
[[route]]
path = "/down/"
auth = ["none"]
upstream = "down"
""",
    )
    with running_gateway(tmp_path_factory.mktemp("bad-input"), text) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh_record(upstream: FakeUpstream) -> None:
    upstream.requests.clear()


def _req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


# name -> (raw request, status, error code or None when llhttp's own reason is the code)
BAD: dict[str, tuple[bytes, int, str | None]] = {
    "content-length-and-transfer-encoding": (
        _req("POST /x HTTP/1.1\nHost: h\nContent-Length: 5\nTransfer-Encoding: chunked\n")
        + b"0\r\n\r\n",
        400,
        "malformed_request",
    ),
    "transfer-encoding-then-content-length": (
        _req("POST /x HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nContent-Length: 5\n")
        + b"0\r\n\r\n",
        400,
        "malformed_request",
    ),
    "duplicate-content-length-same": (
        _req("POST /x HTTP/1.1\nHost: h\nContent-Length: 5\nContent-Length: 5\n", b"hello"),
        400,
        "malformed_request",
    ),
    "duplicate-content-length-different": (
        _req("POST /x HTTP/1.1\nHost: h\nContent-Length: 5\nContent-Length: 6\n", b"hello!"),
        400,
        "malformed_request",
    ),
    "content-length-list": (
        _req("POST /x HTTP/1.1\nHost: h\nContent-Length: 5, 5\n", b"hello"),
        400,
        "malformed_request",
    ),
    "content-length-signed": (
        _req("POST /x HTTP/1.1\nHost: h\nContent-Length: +5\n", b"hello"),
        400,
        "malformed_request",
    ),
    "obs-fold": (
        _req("GET /x HTTP/1.1\nHost: h\nX-Folded: first\n  second\n"),
        400,
        "malformed_request",
    ),
    "bare-lf-everywhere": (b"GET /x HTTP/1.1\nHost: h\n\n", 400, "malformed_request"),
    "bare-lf-in-headers": (
        b"GET /x HTTP/1.1\r\nHost: h\nX-A: b\r\n\r\n",
        400,
        "malformed_request",
    ),
    "bare-cr-in-value": (
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
        400,
        "malformed_request",
    ),
    "space-before-colon": (
        _req("POST /x HTTP/1.1\nHost: h\nTransfer-Encoding : chunked\n") + b"0\r\n\r\n",
        400,
        "malformed_request",
    ),
    "chunked-on-http-1.0": (
        _req("POST /x HTTP/1.0\nHost: h\nTransfer-Encoding: chunked\n") + b"0\r\n\r\n",
        400,
        "chunked_on_http10",
    ),
    "transfer-coding-not-chunked": (
        _req("POST /x HTTP/1.1\nHost: h\nTransfer-Encoding: gzip, chunked\n") + b"0\r\n\r\n",
        501,
        "unsupported_transfer_coding",
    ),
    "oversized-header-block": (
        _req(f"GET /x HTTP/1.1\nHost: h\nX-Big: {'a' * (MAX_HEADER_BYTES + 100)}\n"),
        431,
        "headers_too_large",
    ),
    "too-many-headers": (
        _req("GET /x HTTP/1.1\nHost: h\n" + "".join(f"X-H{i}: v\n" for i in range(60))),
        431,
        "headers_too_large",
    ),
    "body-over-max-body": (
        _req(f"POST /x HTTP/1.1\nHost: h\nContent-Length: {MAX_BODY + 1}\n", b"a" * (MAX_BODY + 1)),
        413,
        "body_too_large",
    ),
    "chunked-body-over-max-body": (
        _req("POST /x HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\n")
        + b"%x\r\n%b\r\n0\r\n\r\n" % (MAX_BODY + 1, b"a" * (MAX_BODY + 1)),
        413,
        "body_too_large",
    ),
    "missing-host-http-1.1": (_req("GET /x HTTP/1.1\nAccept: */*\n"), 400, "bad_host"),
    "duplicate-host": (
        _req("GET /x HTTP/1.1\nHost: a.example\nHost: b.example\n"),
        400,
        "bad_host",
    ),
    "empty-host": (_req("GET /x HTTP/1.1\nHost:\n"), 400, "bad_host"),
    "host-with-path": (_req("GET /x HTTP/1.1\nHost: evil.example/x\n"), 400, "bad_host"),
    "host-with-userinfo": (_req("GET /x HTTP/1.1\nHost: user@evil.example\n"), 400, "bad_host"),
    "connect": (
        _req("CONNECT internal.example:443 HTTP/1.1\nHost: internal.example:443\n"),
        501,
        "method_not_implemented",
    ),
    "absolute-form-other-host": (
        _req("GET http://169.254.169.254/latest HTTP/1.1\nHost: h\n"),
        400,
        "foreign_host",
    ),
    "expect-something-else": (
        _req("POST /x HTTP/1.1\nHost: h\nExpect: something-else\nContent-Length: 1\n", b"a"),
        417,
        "expectation_failed",
    ),
    "invalid-method-chars": (_req("G(T /x HTTP/1.1\nHost: h\n"), 400, "malformed_request"),
    "lower-case-method": (_req("get /x HTTP/1.1\nHost: h\n"), 400, "malformed_request"),
    "oversized-url": (_req(f"GET /{'a' * 9000} HTTP/1.1\nHost: h\n"), 414, "uri_too_long"),
    "nul-in-header-value": (
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
        400,
        "malformed_request",
    ),
    "nul-in-header-name": (
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-\x00A: b\r\n\r\n",
        400,
        "malformed_request",
    ),
    "nul-in-target": (b"GET /x\x00y HTTP/1.1\r\nHost: h\r\n\r\n", 400, None),
    "http-version-1.2": (_req("GET /x HTTP/1.2\nHost: h\n"), 400, "malformed_request"),
    "http-0.9": (b"GET /x\r\n\r\n", 505, "version_not_supported"),
    "http2-preface-over-http1": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),
    "asterisk-form-options": (_req("OPTIONS * HTTP/1.1\nHost: h\n"), 400, "bad_target"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_refused_and_never_forwarded(
    gw: GatewayProcess, upstream: FakeUpstream, name: str
) -> None:
    data, status, code = BAD[name]
    resp = send_raw(gw, data)
    assert 400 <= resp.status < 600 and resp.status != 500, resp.raw[:300]
    assert_json_error(resp, status, code)
    assert resp.closed, f"{name}: the connection stayed open after {resp.status}"
    assert resp.header("connection") == "close"
    for header in SECURITY_HEADERS:
        assert resp.header(header), f"{header} missing on a {resp.status}"
    canary(gw, upstream)


def test_bad_request_gets_html_for_browsers(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    parse_error = _req(
        "POST /x HTTP/1.1\nHost: h\nAccept: text/html,*/*\nContent-Length: 1\n"
        "Transfer-Encoding: chunked\n"
    )
    resp = send_raw(gw, parse_error + b"0\r\n\r\n")
    assert_html_error(resp, 400)
    assert resp.closed
    pipeline_error = _req("GET http://other.example/ HTTP/1.1\nHost: h\nAccept: text/html\n")
    resp = send_raw(gw, pipeline_error)
    assert_html_error(resp, 400)
    assert "foreign_host" in resp.body.decode()
    assert resp.closed
    canary(gw, upstream)


def test_expect_continue_over_max_body_gets_413_without_100(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    head = _req(
        f"POST /x HTTP/1.1\nHost: h\nExpect: 100-continue\nContent-Length: {MAX_BODY + 1}\n"
    )
    resp = send_raw(gw, head)  # the body is never sent: the client waits for 100 or a final answer
    assert b"100 Continue" not in resp.raw
    assert_json_error(resp, 413, "body_too_large")
    assert resp.closed
    canary(gw, upstream)


def test_body_at_max_body_is_forwarded(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    """The limit is not off by one: exactly max_body bytes pass."""
    body = b"a" * MAX_BODY
    head = _req(f"POST /upload HTTP/1.1\nHost: h\nConnection: close\nContent-Length: {MAX_BODY}\n")
    resp = send_raw(gw, head + body)
    assert resp.status == 200, resp.raw[:300]
    assert resp.json() == {"bytes": MAX_BODY}


def test_bad_request_after_a_good_one_on_the_same_connection(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    """Keep-alive: the good request is answered, the bad one refused, nothing after it runs."""
    good = _req("GET /first HTTP/1.1\nHost: h\n")
    bad = _req("GET /second HTTP/1.1\nHost: h\nContent-Length: 1\nContent-Length: 2\n", b"ab")
    after = _req("GET /third HTTP/1.1\nHost: h\n")
    with tls_socket(gw) as sock:
        sock.sendall(good)
        first = read_response(sock, close_wait=0)
        assert first.status == 200 and first.json()["raw_path"] == "/first"
        sock.sendall(bad + after)
        second = read_response(sock)
    assert_json_error(second, 400, "malformed_request")
    assert second.closed
    assert [r.raw_path for r in upstream.requests] == ["/first"]


def test_pipelined_good_request_is_answered_before_the_bad_one(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    good = _req("GET /first HTTP/1.1\nHost: h\n")
    bad = _req("GET /second HTTP/1.1\nHost: h\nContent-Length: 1\nContent-Length: 2\n", b"ab")
    with tls_socket(gw) as sock:
        sock.sendall(good + bad)
        data = b""
        sock.settimeout(READ_TIMEOUT_S)
        while chunk := sock.recv(65536):  # both answers, then the close
            data += chunk
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), data[:300]
    second_at = rest.find(b"HTTP/1.1 ")
    assert second_at > 0, data[:600]
    assert rest[second_at:].startswith(b"HTTP/1.1 400 "), data[:600]
    assert b'"code":"malformed_request"' in rest[second_at:]
    assert [r.raw_path for r in upstream.requests] == ["/first"]


def _trickle_headers(sock: ssl.SSLSocket) -> int:
    """Send one header line at a time until the gateway answers; return lines sent."""
    for step in range(TRICKLE_STEPS):
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable or sock.pending():
            return step  # an answer (or the close) arrived
        try:
            sock.sendall(f"X-Slow-{step}: x\r\n".encode())
        except OSError:
            return step
    return TRICKLE_STEPS


def test_slow_header_sender_gets_408(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    with tls_socket(gw) as sock:
        sock.sendall(b"GET /slow-headers HTTP/1.1\r\nHost: h\r\n")
        sent = _trickle_headers(sock)
        assert sent < TRICKLE_STEPS, "header_read (1s) never cut off a trickling client"
        resp = read_response(sock)
    assert_json_error(resp, 408, "request_timeout")
    assert resp.closed
    canary(gw, upstream)


def test_slow_header_sender_on_kept_alive_connection_gets_408(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    """After a first response the idle timer (60s here) runs; header_read (1s) must still win."""
    with tls_socket(gw) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n")
        assert read_response(sock, close_wait=0).status == 200
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: h\r\n")
        sent = _trickle_headers(sock)
        assert sent < TRICKLE_STEPS, "a kept-alive connection escaped header_read"
        resp = read_response(sock)
    assert_json_error(resp, 408, "request_timeout")
    assert resp.closed
    assert [r.raw_path for r in upstream.requests] == ["/first"]


def test_silent_connection_is_closed_without_an_answer(gw: GatewayProcess) -> None:
    """TLS handshake, then nothing: closed after header_read, with no bytes (no 408 to nobody)."""
    with tls_socket(gw) as sock:
        sock.settimeout(10)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""
    assert data == b""


def test_upstream_down_is_502_and_gateway_goes_on(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    resp = get(gw, "/down/x")
    assert_json_error(resp, 502, "upstream_unavailable")
    html = get(gw, "/down/x", headers="Accept: text/html\r\n")
    assert_html_error(html, 502)
    for header in SECURITY_HEADERS:
        assert resp.header(header)
    canary(gw, upstream)
    assert gw.proc.poll() is None


def test_upstream_too_slow_is_504_and_gateway_goes_on(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    resp = get(gw, "/slow?delay=5")
    assert_json_error(resp, 504, "upstream_timeout")
    assert "1s" in resp.json()["error"]["message"]
    assert [r.raw_path for r in upstream.requests] == ["/slow?delay=5"]
    upstream.requests.clear()
    canary(gw, upstream)
    assert gw.proc.poll() is None


def test_gateway_still_healthy_after_all_of_it(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    resp = get(gw, "/.garrison/healthz")
    assert resp.status == 200 and resp.json()["status"] == "ok"
    assert upstream.requests == []
    assert gw.proc.poll() is None
    assert "Traceback" not in gw.output()

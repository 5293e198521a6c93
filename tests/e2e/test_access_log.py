"""A JSON access-log line per request (time, client IP, method, path, status, bytes, duration,
upstream time) with no secrets in it: not the Authorization header, cookies or query tokens."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fixtures_stream import (
    access_lines,
    fetch,
    https,
    read_sse,
    running_gateway,
    tls_socket,
    wait_until,
    write_config,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

SECRETS = {
    "authorization": "Bearer SECRET1-bearer-token",
    "cookie": "s=SECRET2-session-cookie; other=SECRET2b",
    "query": "SECRET3-query-token",
    "x-api-key": "SECRET4-api-key",
}
SECRET_RE = re.compile(r"SECRET\d")
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
FIELDS = {
    "ts",
    "client_ip",
    "method",
    "path",
    "status",
    "bytes",
    "duration_ms",
    "upstream_ms",
}


def _dead_port() -> int:
    """A loopback port with nobody listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    routes = f"""
[[upstream]]
name = "dead"
url = "http://127.0.0.1:{_dead_port()}"

[[route]]
path = "/dead/"
auth = ["none"]
upstream = "dead"
"""
    with running_gateway(tmp_path_factory.mktemp("gw-log"), upstream.url, routes=routes) as gw:
        yield gw


def _secret_headers() -> dict[str, str]:
    return {
        "Authorization": SECRETS["authorization"],
        "Cookie": SECRETS["cookie"],
        "X-Api-Key": SECRETS["x-api-key"],
    }


def _records_for(gw: GatewayProcess, path: str, n: int = 1) -> list[dict[str, object]]:
    assert wait_until(
        lambda: sum(1 for r in access_lines(gw) if r.get("path") == path) >= n, timeout=10
    ), f"no access-log line for {path}:\n{gw.output()}"
    return [r for r in access_lines(gw) if r.get("path") == path]


def _check_common(record: dict[str, object], method: str, path: str, status: int) -> None:
    assert record.keys() >= FIELDS, record
    assert isinstance(record["ts"], str) and TIME_RE.fullmatch(record["ts"]), record
    assert record["client_ip"] == "127.0.0.1"
    assert record["method"] == method
    assert record["path"] == path
    assert record["status"] == status
    assert isinstance(record["duration_ms"], float | int) and record["duration_ms"] >= 0


def test_proxied_requests_are_logged_without_secrets(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    q = SECRETS["query"]
    get = fetch(gateway, f"/log/get?token={q}&x=1", headers=_secret_headers())
    assert get.status == 200
    post = fetch(
        gateway,
        f"/upload?api_key={q}",
        method="POST",
        headers={**_secret_headers(), "Content-Type": "application/octet-stream"},
        body=b"p" * 10_000,
    )
    assert post.status == 200 and post.json() == {"bytes": 10_000}
    cookie = fetch(gateway, "/cookie?v=SECRET5-set-cookie", headers=_secret_headers())
    assert "SECRET5" in (cookie.headers.get("set-cookie") or "")  # the client does get it
    slow = fetch(gateway, f"/slow?delay=0.3&access_token={q}", headers=_secret_headers())
    assert slow.status == 200

    (rec,) = _records_for(gateway, "/log/get")
    _check_common(rec, "GET", "/log/get", 200)
    assert rec["bytes"] == len(get.body)
    assert isinstance(rec["upstream_ms"], float | int) and rec["upstream_ms"] >= 0
    assert rec["duration_ms"] >= rec["upstream_ms"]  # type: ignore[operator]

    (rec,) = _records_for(gateway, "/upload")
    _check_common(rec, "POST", "/upload", 200)
    assert rec["bytes"] == len(post.body)

    (rec,) = _records_for(gateway, "/cookie")
    _check_common(rec, "GET", "/cookie", 200)

    (rec,) = _records_for(gateway, "/slow")
    _check_common(rec, "GET", "/slow", 200)
    # The upstream slept 300 ms before answering: upstream time measures that wait.
    assert rec["upstream_ms"] >= 290  # type: ignore[operator]
    assert rec["duration_ms"] >= rec["upstream_ms"]  # type: ignore[operator]

    # The upstream did get the secrets (the gateway forwards them) ...
    assert any(
        SECRETS["authorization"] == r.headers.get("authorization") for r in upstream.requests
    )
    # ... and none of them is anywhere in the gateway's output.
    leaked = [line for line in gateway.lines if SECRET_RE.search(line)]
    assert not leaked, leaked


def test_streamed_response_bytes_are_counted(gateway: GatewayProcess) -> None:
    conn = https(gateway)
    try:
        conn.request("GET", f"/sse?n=5&interval_ms=5&token={SECRETS['query']}")
        resp = conn.getresponse()
        events = [data for _, data in read_sse(resp)]
        rest = resp.read()
    finally:
        conn.close()
    assert events[-1] == b"[DONE]" and len(events) == 6
    body_len = sum(len(b"data: " + e + b"\n\n") for e in events) + len(rest)
    (rec,) = _records_for(gateway, "/sse")
    _check_common(rec, "GET", "/sse", 200)
    assert rec["bytes"] == body_len
    assert not [line for line in gateway.lines if SECRET_RE.search(line)]


def test_gateway_answers_and_refusals_are_logged_without_secrets(
    gateway: GatewayProcess,
) -> None:
    q = SECRETS["query"]
    health = fetch(gateway, f"/.garrison/healthz?token={q}", headers=_secret_headers())
    assert health.status == 200
    missing = fetch(gateway, f"/.garrison/nothing?token={q}", headers=_secret_headers())
    assert missing.status == 404
    dead = fetch(gateway, f"/dead/x?token={q}", headers=_secret_headers())
    assert dead.status == 502

    (rec,) = _records_for(gateway, "/.garrison/healthz")
    _check_common(rec, "GET", "/.garrison/healthz", 200)
    assert rec["bytes"] == len(health.body)
    assert rec["upstream_ms"] is None
    (rec,) = _records_for(gateway, "/.garrison/nothing")
    _check_common(rec, "GET", "/.garrison/nothing", 404)
    (rec,) = _records_for(gateway, "/dead/x")
    _check_common(rec, "GET", "/dead/x", 502)
    assert rec["bytes"] == len(dead.body)

    # Refused before routing: an encoded separator, and a request llhttp-level checks refuse.
    before = len(access_lines(gateway))
    for raw in (
        f"GET /a%2Fb?token={q} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
        f"{SECRETS['authorization']}\r\n\r\n",
        f"GET /twohosts?token={q} HTTP/1.1\r\nHost: a\r\nHost: b\r\n"
        f"Cookie: {SECRETS['cookie']}\r\n\r\n",
    ):
        sock = tls_socket(gateway)
        try:
            sock.sendall(raw.encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        finally:
            sock.close()
    assert wait_until(lambda: len(access_lines(gateway)) >= before + 2, timeout=10)
    refusals = access_lines(gateway)[before:]
    assert sorted(r["status"] for r in refusals) == [400, 400]  # type: ignore[type-var]
    for rec in refusals:
        assert rec.keys() >= FIELDS
        assert rec["client_ip"] == "127.0.0.1"
    assert not [line for line in gateway.lines if SECRET_RE.search(line)]


def test_one_line_per_request_on_a_keep_alive_connection(gateway: GatewayProcess) -> None:
    conn = https(gateway)
    try:
        for i in range(10):
            conn.request("GET", f"/ka/{i}?token={SECRETS['query']}")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()
    for i in range(10):
        assert len(_records_for(gateway, f"/ka/{i}")) == 1


def test_client_ip_comes_from_xff_only_behind_a_trusted_proxy(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    server = 'trusted_proxies = ["127.0.0.1/32"]'
    with running_gateway(tmp_path / "trusted", upstream.url, server=server) as gw:
        fetch(gw, "/via-proxy", headers={"X-Forwarded-For": "198.51.100.7, 127.0.0.1"})
        (rec,) = _records_for(gw, "/via-proxy")
        assert rec["client_ip"] == "198.51.100.7"
    with running_gateway(tmp_path / "untrusted", upstream.url) as gw:
        fetch(gw, "/spoofed", headers={"X-Forwarded-For": "198.51.100.7"})
        (rec,) = _records_for(gw, "/spoofed")
        assert rec["client_ip"] == "127.0.0.1"


def test_access_log_goes_to_the_configured_file(tmp_path: Path, upstream: FakeUpstream) -> None:
    log_file = tmp_path / "logs" / "access.log"
    server = f'access_log = "{log_file}"'
    with running_gateway(tmp_path, upstream.url, server=server) as gw:
        res = fetch(gw, f"/to-file?token={SECRETS['query']}", headers=_secret_headers())
        assert res.status == 200

        def records() -> list[dict[str, object]]:
            if not log_file.is_file():
                return []
            return [json.loads(line) for line in log_file.read_text().splitlines() if line]

        assert wait_until(lambda: any(r["path"] == "/to-file" for r in records()), timeout=10)
        (rec,) = [r for r in records() if r["path"] == "/to-file"]
        _check_common(rec, "GET", "/to-file", 200)
        assert rec["bytes"] == len(res.body)
        assert not SECRET_RE.search(log_file.read_text())
        assert not access_lines(gw), "access-log lines also went to stderr"

        # Reload with a new file: lines go there from then on (log rotation works the same way).
        rotated = tmp_path / "logs" / "access-2.log"
        write_config(gw, upstream.url, server=f'access_log = "{rotated}"')
        gw.signal(signal.SIGHUP)
        gw.wait_for_line("configuration reloaded")
        assert fetch(gw, "/after-rotate").status == 200
        assert wait_until(
            lambda: rotated.is_file() and "/after-rotate" in rotated.read_text(), timeout=10
        )
        assert "/after-rotate" not in log_file.read_text()
        assert gw.stop() == 0
    assert not [line for line in gw.lines if SECRET_RE.search(line)]

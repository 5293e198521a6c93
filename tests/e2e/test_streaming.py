"""Proxying streams both ways: big uploads in bounded memory, SSE without buffering, client
disconnects that cancel the upstream request, and no cookie sharing between clients."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fixtures_stream import (
    ControlUpstream,
    RssSampler,
    access_lines,
    fetch,
    https,
    read_sse,
    running_gateway,
    tls_socket,
    upstream_connections,
    wait_until,
)
from tests.support.gateway import GatewayProcess
from tests.support.tools import missing
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

BLOCK = 1024 * 1024
UPLOAD_BYTES = 2 * 1024**3  # 2 GiB: more than "2 GB", and more than the default max_body
RSS_LIMIT = 200 * 1000 * 1000  # "200 MB", read strictly
SSE_LIMIT_NS = 50_000_000


@pytest.fixture(scope="module")
def control() -> Iterator[ControlUpstream]:
    with ControlUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, control: ControlUpstream
) -> Iterator[GatewayProcess]:
    routes = f"""
[[upstream]]
name = "control"
url = "{control.url}"

[[route]]
path = "/control/"
auth = ["none"]
upstream = "control"
strip_prefix = true
"""
    with running_gateway(tmp_path_factory.mktemp("gw-stream"), upstream.url, routes=routes) as gw:
        yield gw


def _stream_upload(sock: ssl.SSLSocket, path: str, total: int, chunked: bool) -> None:
    """Send a POST with a `total`-byte body in 1 MiB blocks, never holding more than one."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n\r\n"
    sock.sendall(head.encode())
    block = b"\xa5" * BLOCK
    view = memoryview(block)
    sent = 0
    while sent < total:
        n = min(BLOCK, total - sent)
        if chunked:
            sock.sendall(b"%x\r\n" % n)
            sock.sendall(view[:n])
            sock.sendall(b"\r\n")
        else:
            sock.sendall(view[:n])
        sent += n
    if chunked:
        sock.sendall(b"0\r\n\r\n")


def _response(sock: ssl.SSLSocket) -> tuple[int, dict[str, object]]:
    resp = http.client.HTTPResponse(sock)  # type: ignore[arg-type]  # makefile() is all it uses
    resp.begin()
    body = resp.read()
    return resp.status, json.loads(body)


@pytest.mark.slow
def test_two_gigabyte_upload_streams_in_bounded_memory(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    sock = tls_socket(gateway, timeout=120)
    try:
        with RssSampler(gateway.proc.pid, interval=0.05) as rss:
            _stream_upload(sock, "/upload", UPLOAD_BYTES, chunked=False)
            status, payload = _response(sock)
    finally:
        sock.close()
    print(
        f"\npeak gateway RSS during 2 GiB upload: {rss.peak / 1e6:.1f} MB ({rss.samples} samples)"
    )
    assert status == 200, payload
    assert payload == {"bytes": UPLOAD_BYTES}
    assert rss.samples >= 10, "the upload was too quick to sample; the test proves nothing"
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak / 1e6:.1f} MB"


def _download(gw: GatewayProcess, path: str, stall: float) -> tuple[int, str | None, int]:
    """Read a big response in 1 MiB pieces after `stall` seconds of not reading at all."""
    conn = https(gw, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        time.sleep(stall)  # the upstream keeps writing: only backpressure bounds the gateway
        buf = bytearray(BLOCK)
        total = 0
        for _ in range(1_000_000):
            n = resp.readinto(buf)
            if not n:
                break
            total += n
        return total, resp.headers.get("content-length"), resp.status
    finally:
        conn.close()


@pytest.mark.slow
def test_one_gigabyte_download_to_a_stalled_reader_in_bounded_memory(
    gateway: GatewayProcess, control: ControlUpstream
) -> None:
    size = 1024**3
    with RssSampler(gateway.proc.pid) as rss:
        total, length, _ = _download(gateway, f"/control/download?bytes={size}", stall=1.0)
    print(f"\npeak gateway RSS during 1 GiB download: {rss.peak / 1e6:.1f} MB")
    assert total == size
    assert length == str(size)
    assert size in control.downloads
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak / 1e6:.1f} MB"


def test_chunked_download_is_relayed_whole(
    gateway: GatewayProcess, control: ControlUpstream
) -> None:
    size = 128 * BLOCK + 7
    with RssSampler(gateway.proc.pid) as rss:
        total, length, _ = _download(
            gateway, f"/control/download?bytes={size}&chunked=1", stall=0.3
        )
    assert total == size
    assert length is None  # no length from the upstream: re-chunked, not buffered to count it
    assert rss.peak < RSS_LIMIT


def test_chunked_upload_without_content_length(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    total = 64 * BLOCK + 12345  # not a whole number of blocks: the last chunk is short
    sock = tls_socket(gateway, timeout=60)
    try:
        with RssSampler(gateway.proc.pid) as rss:
            _stream_upload(sock, "/upload", total, chunked=True)
            status, payload = _response(sock)
    finally:
        sock.close()
    assert status == 200, payload
    assert payload == {"bytes": total}
    assert rss.peak < RSS_LIMIT
    seen = upstream.requests[-1]
    assert seen.raw_path == "/upload"
    assert seen.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in seen.headers


def test_curl_streams_a_chunked_upload_from_a_pipe(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    """A real client: curl reads the body from a pipe (no length known: chunked, with
    Expect: 100-continue), fed by another process; neither side ever holds the whole body."""
    curl = shutil.which("curl")
    if curl is None:
        missing("curl not found on PATH")
    total = 256 * BLOCK
    assert gateway.ca_path is not None
    feeder = subprocess.Popen(["head", "-c", str(total), "/dev/zero"], stdout=subprocess.PIPE)
    try:
        out = subprocess.run(
            [
                *(curl, "-sS", "--cacert", str(gateway.ca_path), "-X", "POST", "-T", "-"),
                *("-w", "\\n%{http_code}", f"{gateway.url}/upload"),
            ],
            stdin=feeder.stdout,
            capture_output=True,
            timeout=120,
            check=False,
        )
    finally:
        assert feeder.stdout is not None
        feeder.stdout.close()
        feeder.wait(timeout=10)
    body, _, code = out.stdout.decode().rpartition("\n")
    assert out.returncode == 0, out.stderr
    assert code == "200", (code, body)
    assert json.loads(body) == {"bytes": total}
    seen = upstream.requests[-1]
    assert seen.headers.get("transfer-encoding") == "chunked"
    assert "expect" not in seen.headers  # 100-continue is answered by the gateway, hop by hop


def test_sse_events_arrive_as_sent_without_compression(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    conn = https(gateway, timeout=30)
    try:
        conn.request(
            "GET",
            "/sse?n=50&interval_ms=20",
            headers={"Accept-Encoding": "gzip, deflate, br", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers.get("content-encoding") is None
        delays: list[int] = []
        indices: list[int] = []
        done = False
        for arrived, data in read_sse(resp):
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)  # plain text: a compressed stream would not parse
            indices.append(event["i"])
            delays.append(arrived - event["sent_ns"])
    finally:
        conn.close()
    mean = sum(delays) / len(delays)
    print(f"\nSSE delay: max {max(delays) / 1e6:.2f} ms, mean {mean / 1e6:.2f} ms")
    assert done, "the stream ended without its [DONE] event"
    assert indices == list(range(50))
    late = [(i, d / 1e6) for i, d in zip(indices, delays, strict=True) if d >= SSE_LIMIT_NS]
    assert not late, f"events later than 50 ms (index, ms): {late}"


def test_client_disconnect_cancels_the_upstream_request(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    tag = f"gone-{time.monotonic_ns()}"
    sock = tls_socket(gateway)
    try:
        sock.sendall(f"GET /forever?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        for _ in range(200):
            piece = sock.recv(65536)
            assert piece, "the gateway closed the stream"
            received += piece
            if received.count(b"data: ") >= 3:
                break
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        assert received.count(b"data: ") >= 3
        assert tag not in upstream.disconnects
    finally:
        sock.close()
    assert wait_until(lambda: tag in upstream.disconnects, timeout=10), (
        f"upstream never saw the client go away; disconnects={upstream.disconnects}"
    )
    assert wait_until(
        lambda: any(
            r.get("path") == "/forever" and r.get("error") == "client_closed"
            for r in access_lines(gateway)
        ),
        timeout=5,
    ), "no access-log line with error=client_closed for the cut stream"


def test_abrupt_client_reset_cancels_the_upstream_request(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    """Same, but the client resets the TCP connection without a TLS close_notify."""
    tag = f"reset-{time.monotonic_ns()}"
    sock = tls_socket(gateway)
    sock.sendall(f"GET /forever?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert b"data: " in sock.recv(65536) + sock.recv(65536)
    raw = socket.socket(fileno=sock.detach())
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()  # linger 0: RST
    assert wait_until(lambda: tag in upstream.disconnects, timeout=10), upstream.disconnects


def test_no_upstream_connection_is_left_behind_after_disconnects(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A cut stream's upstream connection is closed, never pooled for the next client."""
    tags = [f"leak-{i}-{time.monotonic_ns()}" for i in range(5)]
    with running_gateway(tmp_path, upstream.url) as gw:  # its own pool, empty at the start
        for tag in tags:
            sock = tls_socket(gw)
            sock.sendall(f"GET /forever?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert b"HTTP/1.1 200" in sock.recv(65536)
            sock.close()
        assert wait_until(lambda: all(t in upstream.disconnects for t in tags), timeout=10)
        assert wait_until(lambda: upstream_connections(gw.proc.pid, upstream.port) == 0)
        # A normal request still works, on one new upstream connection that is then pooled.
        assert fetch(gw, "/after-disconnects").status == 200
        assert upstream_connections(gw.proc.pid, upstream.port) == 1


def test_upstream_cookies_are_never_shared_between_clients(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    alice = fetch(gateway, "/cookie?v=alice-secret", headers={"Cookie": "mine=alice"})
    assert alice.status == 200
    assert alice.json() == {"had_cookie": "mine=alice"}
    assert "session=alice-secret" in (alice.headers.get("set-cookie") or "")

    # Bob comes next on a new connection (the upstream connection is pooled and reused).
    bob = fetch(gateway, "/cookie?v=bob")
    assert bob.status == 200
    assert bob.json() == {"had_cookie": None}, "the gateway sent another client's cookie"
    assert "alice" not in (bob.headers.get("set-cookie") or "")
    assert "session=bob" in (bob.headers.get("set-cookie") or "")

    # Interleaved on two live keep-alive connections: each sees only its own cookies.
    a, b = https(gateway), https(gateway)
    try:
        for i in range(5):
            a.request("GET", f"/cookie?v=a{i}", headers={"Cookie": f"who=a{i}"})
            ra = a.getresponse()
            body_a = json.loads(ra.read())
            b.request("GET", f"/cookie?v=b{i}")
            rb = b.getresponse()
            body_b = json.loads(rb.read())
            assert body_a == {"had_cookie": f"who=a{i}"}
            assert body_b == {"had_cookie": None}
            assert ra.headers["set-cookie"].startswith(f"session=a{i}")
            assert rb.headers["set-cookie"].startswith(f"session=b{i}")
    finally:
        a.close()
        b.close()
    # And the upstream never received a cookie on a request that carried none.
    bob_requests = [r for r in upstream.requests if r.raw_path.startswith("/cookie?v=b")]
    assert len(bob_requests) == 6
    assert all("cookie" not in r.headers for r in bob_requests)


def test_large_response_streams_to_a_slow_reader(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    """Backpressure on the response side: a reader that pauses still gets every event."""
    conn = https(gateway, timeout=30)
    try:
        conn.request("GET", "/sse?n=200&interval_ms=1")
        resp = conn.getresponse()
        assert resp.status == 200
        time.sleep(0.5)  # let the stream pile up behind a reader that does not read
        events = [data for _, data in read_sse(resp)]
    finally:
        conn.close()
    assert events[-1] == b"[DONE]"
    assert [json.loads(e)["i"] for e in events[:-1]] == list(range(200))

"""`kill -HUP` reloads config and certificates without dropping in-flight streams; a broken
config is refused; SIGTERM drains in-flight requests within a bounded grace and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.fixtures_stream import (
    access_lines,
    client_context,
    count_lines,
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

NEW_ROUTE = """
[[route]]
path = "/v2/"
auth = ["none"]
upstream = "app"
strip_prefix = true
"""
ALT_NAME = "alt.garrison.test"


@dataclass
class StreamReader:
    """Reads an SSE stream in a thread: the event indices, whether [DONE] came, any error."""

    gw: GatewayProcess
    path: str
    follow_up: bool = True
    indices: list[int] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    hsts_after: str | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = https(self.gw, timeout=30)
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            for _, data in read_sse(resp):
                if data == b"[DONE]":
                    self.done = True
                    break
                self.indices.append(json.loads(data)["i"])
            resp.read()
            if self.follow_up and not resp.will_close:
                # The same keep-alive connection, after the stream: a request of the new era.
                conn.request("GET", "/.garrison/healthz")
                again = conn.getresponse()
                again.read()
                self.hsts_after = again.headers.get("strict-transport-security")
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()

    def wait_events(self, n: int, timeout: float = 10.0) -> None:
        assert wait_until(lambda: len(self.indices) >= n or self.error, timeout), self.indices
        assert self.error is None, self.error

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream reader is stuck"


def _hsts(gw: GatewayProcess) -> str | None:
    return fetch(gw, "/.garrison/healthz").headers.get("strict-transport-security")


def test_hup_reloads_config_without_dropping_a_stream(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        assert _hsts(gw) == "max-age=31536000"
        assert fetch(gw, "/v2/hello").json()["raw_path"] == "/v2/hello"  # type: ignore[index]

        stream = StreamReader(gw, "/sse?n=40&interval_ms=50")
        stream.wait_events(3)
        write_config(gw, upstream.url, server='hsts_max_age = "1h"', routes=NEW_ROUTE)
        gw.signal(signal.SIGHUP)
        gw.wait_for_line("configuration reloaded")
        in_flight_at_reload = len(stream.indices)
        assert stream.thread.is_alive() and in_flight_at_reload < 40

        # New requests see the new config: the new route and the new HSTS value.
        assert _hsts(gw) == "max-age=3600"
        assert fetch(gw, "/v2/hello").json()["raw_path"] == "/hello"  # type: ignore[index]

        stream.join()
        assert stream.error is None, stream.error
        assert stream.done, "the stream lost its end"
        assert stream.indices == list(range(40))
        assert stream.hsts_after == "max-age=3600"
        assert gw.proc.poll() is None
        assert gw.stop() == 0


def test_hup_keeps_an_open_websocket(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        ctx = client_context(gw)

        async def go() -> list[str]:
            got = []
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"wss://127.0.0.1:{gw.port}/ws", ssl=ctx) as ws,
            ):
                await ws.send_str("before")
                got.append(await ws.receive_str())
                write_config(gw, upstream.url, server='hsts_max_age = "1h"')
                gw.signal(signal.SIGHUP)
                await asyncio.to_thread(gw.wait_for_line, "configuration reloaded")
                await ws.send_str("after")
                got.append(await ws.receive_str())
            return got

        assert asyncio.run(asyncio.wait_for(go(), 30)) == ["echo:before", "echo:after"]
        assert _hsts(gw) == "max-age=3600"
        assert gw.stop() == 0


def test_hup_reloads_the_certificate_for_new_names(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_socket(gw, server_hostname=ALT_NAME).close()
        # A keep-alive connection opened before the reload keeps working after it.
        old = https(gw)
        old.request("GET", "/before")
        assert old.getresponse().read()

        write_config(gw, upstream.url, server=f'hostnames = ["{ALT_NAME}"]')
        gw.signal(signal.SIGHUP)
        gw.wait_for_line("configuration reloaded")
        assert any(ALT_NAME in line and "certificate loaded" in line for line in gw.lines)

        sock = tls_socket(gw, server_hostname=ALT_NAME)  # verifies against the new SAN
        try:
            cert = sock.getpeercert()
            assert cert is not None
            assert ("DNS", ALT_NAME) in cert["subjectAltName"]
        finally:
            sock.close()
        try:
            old.request("GET", "/after")
            resp = old.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["raw_path"] == "/after"
        finally:
            old.close()
        assert gw.stop() == 0


def test_broken_config_on_hup_is_refused_and_serving_goes_on(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        gw.config_path.write_text("[server\nthis is not TOML")
        gw.signal(signal.SIGHUP)
        gw.wait_for_line("reload refused")
        assert gw.proc.poll() is None
        assert _hsts(gw) == "max-age=31536000"
        assert fetch(gw, "/still-here").status == 200

        # Valid TOML, invalid config: a route to an unknown upstream.
        bad = NEW_ROUTE.replace('upstream = "app"', 'upstream = "nope"')
        write_config(gw, upstream.url, server='hsts_max_age = "1h"', routes=bad)
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: count_lines(gw, "reload refused") >= 2, timeout=10), gw.output()
        assert any("nope" in line for line in gw.lines), "the refusal does not say what is wrong"
        assert _hsts(gw) == "max-age=31536000", "a refused config was partly applied"
        assert fetch(gw, "/v2/x").json()["raw_path"] == "/v2/x"  # type: ignore[index]

        # And a good config after the bad ones is taken.
        write_config(gw, upstream.url, server='hsts_max_age = "1h"', routes=NEW_ROUTE)
        gw.signal(signal.SIGHUP)
        gw.wait_for_line("configuration reloaded")
        assert _hsts(gw) == "max-age=3600"
        assert fetch(gw, "/v2/x").json()["raw_path"] == "/x"  # type: ignore[index]
        assert gw.stop() == 0


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_drains_an_in_flight_stream_and_exits_zero(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        idle = https(gw)  # a keep-alive connection with nothing in flight
        idle.request("GET", "/idle")
        first = idle.getresponse()
        assert first.status == 200 and first.read() and not first.will_close

        # About one second; no request after it (a draining gateway closes the connection).
        stream = StreamReader(gw, "/sse?n=20&interval_ms=50", follow_up=False)
        stream.wait_events(2)
        gw.signal(signal.SIGTERM)
        refused = wait_until(lambda: _refused(gw.port), timeout=5)
        still_streaming = stream.thread.is_alive()
        assert refused, "new connections are still accepted after SIGTERM"
        assert still_streaming, "the stream ended before the test could check new connections"

        assert idle.sock is not None
        try:
            assert idle.sock.recv(1) == b"", "an idle keep-alive connection was not closed"
        except (ConnectionResetError, ssl.SSLError):
            pass
        finally:
            idle.close()

        stream.join()
        assert stream.error is None, stream.error
        assert stream.done and stream.indices == list(range(20))
        assert gw.proc.wait(timeout=30) == 0


def test_sigterm_with_an_endless_stream_exits_within_the_grace(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, upstream.url, timeouts='shutdown_grace = "1s"') as gw:
        tag = f"endless-{time.monotonic_ns()}"
        sock = tls_socket(gw, timeout=20)
        try:
            sock.sendall(f"GET /forever?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            gw.signal(signal.SIGTERM)
            try:
                code = gw.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail("the gateway did not exit after its 1s shutdown grace")
            assert code == 0
            # The cut stream ends for the client (EOF or reset), it does not hang.
            ended = False
            try:
                for _ in range(10_000):
                    if not sock.recv(65536):
                        ended = True
                        break
            except (ConnectionResetError, ssl.SSLError):
                ended = True
            assert ended
        finally:
            sock.close()
        assert any("shutdown grace" in line for line in gw.lines), gw.output()
        assert wait_until(lambda: tag in upstream.disconnects, timeout=10)
        # The request cut by the grace still gets its access-log line before the exit.
        cut = [r for r in access_lines(gw) if r.get("path") == "/forever"]
        assert len(cut) == 1, gw.output()
        assert cut[0]["status"] == 200
        assert cut[0]["error"] == "shutdown_grace_expired" and cut[0]["stage"] == "gateway"


def test_sigint_stops_cleanly(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url) as gw:
        assert fetch(gw, "/x").status == 200
        gw.signal(signal.SIGINT)
        assert gw.proc.wait(timeout=30) == 0


def test_client_context_is_strict(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Guard for the other tests: a wrong name fails verification, so passing means something."""
    with running_gateway(tmp_path, upstream.url) as gw:
        ctx = client_context(gw)
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="not-us.example")
        raw.close()


def test_idle_keepalive_connection_is_closed_silently(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """After keepalive_idle the connection ends with no bytes (a 408 is only for a request
    whose head is still arriving)."""
    timeouts = 'keepalive_idle = "1s"\nheader_read = "5s"'
    with running_gateway(tmp_path, upstream.url, timeouts=timeouts) as gw:
        sock = tls_socket(gw, timeout=15)
        try:
            sock.sendall(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while b'"raw_path": "/one"' not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            rest = sock.recv(65536)  # the gateway closes well before this socket's timeout
        finally:
            sock.close()
        assert rest == b"", rest[:200]

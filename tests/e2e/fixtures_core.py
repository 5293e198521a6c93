"""Helpers shared by the end-to-end tests (bad input, TLS, headers, paths, CORS, limits, metrics,
the admin surface).

Each test module builds its own module-scoped fixtures from these: a real `garrison up`
subprocess on 127.0.0.1:0 with a config written from TOML snippets, a recording FakeUpstream
or the demo app, httpx clients that trust only the gateway's CA, and raw requests over a real
TLS socket whose answer is parsed by hand (status line, headers, body, and whether the gateway
closed).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import GatewayProcess
from tests.support.gateway import client_context as client_context
from tests.support.gateway import tls_socket as support_tls_socket
from tests.support.upstream import FakeUpstream

PYTHON = sys.executable
# Bounds for reading an answer; a healthy gateway answers in milliseconds, so these only
# decide how long a failing test takes to fail.
READ_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 5.0
SECURITY_HEADERS = ("strict-transport-security", "x-content-type-options", "referrer-policy")


def ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers without IPv6 cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


OPEN = 'auth = ["none"]'  # a route's line: anyone may call it


def toml_table(header: str, *lines: str) -> str:
    """One TOML table (`[[route]]`, `[metrics]`): its header, then `lines`, then a blank line."""
    return "\n".join((header, *lines)) + "\n\n"


def upstream_toml(name: str, url: str, *lines: str) -> str:
    """An `[[upstream]]` table; `lines` are more of its keys, as TOML."""
    return toml_table("[[upstream]]", f'name = "{name}"', f'url = "{url}"', *lines)


def dead_upstream(name: str) -> str:
    """An `[[upstream]]` at a loopback port nothing listens on."""
    return upstream_toml(name, f"http://127.0.0.1:{closed_port()}")


def route_toml(path: str, upstream: str = "app", *lines: str) -> str:
    """A `[[route]]` table; `lines` are more of its keys (or its sub-tables), as TOML."""
    return toml_table("[[route]]", f'path = "{path}"', f'upstream = "{upstream}"', *lines)


def gateway_config(upstream_url: str, *tables: str, server: str = "") -> str:
    """A config: `[server]` on 127.0.0.1:0 plus `server` lines, upstream "app" at
    `upstream_url`, then `tables` (more upstreams, routes, sections) in their order."""
    head = toml_table("[server]", 'listen = "127.0.0.1:0"', server)
    return head + upstream_toml("app", upstream_url) + "".join(tables)


def config(upstream_url: str, *, server: str = "", routes: str = "", upstreams: str = "") -> str:
    """A config: `[server]` on 127.0.0.1:0 plus `server` lines, upstream "app", route "/" last."""
    return f"""
[server]
listen = "127.0.0.1:0"
{server}

[[upstream]]
name = "app"
url = "{upstream_url}"
{upstreams}
{routes}
[[route]]
path = "/"
auth = ["none"]
upstream = "app"
"""


@contextmanager
def demo_upstream() -> Iterator[str]:
    """The bundled demo app, an OpenAI-compatible API that reports usage; yields its URL."""
    from tests.e2e.conftest import DemoApp

    app = DemoApp()
    try:
        yield app.url
    finally:
        app.stop()


def client(
    gw: GatewayProcess,
    key: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Client:
    """An HTTPS client for `gw` that trusts only the gateway's CA; `key` goes as a bearer
    token, with any other `headers`."""
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        base_url=gw.url,
        verify=client_context(gw),
        headers={**sent, **(headers or {})},
        timeout=timeout,
    )


@contextmanager
def running_gateway(
    directory: Path, config_text: str, args: list[str] | None = None
) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(args or [], directory / "data", config_text=config_text)
    try:
        yield gw
    finally:
        gw.stop()


@contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


def tls_socket(
    gw: GatewayProcess, server_hostname: str = "localhost", host: str = "127.0.0.1"
) -> ssl.SSLSocket:
    return support_tls_socket(gw, server_hostname, host, timeout=READ_TIMEOUT_S)


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # names lower-case, in order
    body: bytes
    closed: bool  # the gateway closed the connection after this answer
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def json(self) -> Any:
        return json.loads(self.body)

    def echoed(self) -> dict[str, list[str]]:
        """The FakeUpstream echo's request headers, names lower-case, every value kept."""
        out: dict[str, list[str]] = {}
        for name, value in self.json()["headers"]:
            out.setdefault(name.lower(), []).append(value)
        return out


def _split_response(data: bytes) -> tuple[int, str, list[tuple[str, str]], bytes] | None:
    """(status, reason, headers, rest) once the head is complete, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return int(status), (reason[0] if reason else ""), headers, data[end + 4 :]


def _body_complete(status: int, headers: list[tuple[str, str]], rest: bytes, head: bool) -> bool:
    if head or status in (204, 304) or 100 <= status < 200:
        return True
    names = dict(headers)
    if "content-length" in names:
        return len(rest) >= int(names["content-length"])
    if names.get("transfer-encoding", "").lower() == "chunked":
        return rest.endswith(b"0\r\n\r\n")
    return False  # delimited by close


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def read_response(
    sock: ssl.SSLSocket, *, head_request: bool = False, close_wait: float = CLOSE_WAIT_S
) -> RawResponse:
    """Read one answer, then wait (bounded) to learn whether the gateway closes the connection.

    Pass close_wait=0 for an answer on a connection that should stay open.
    """
    data = b""
    closed = False
    deadline = time.monotonic() + READ_TIMEOUT_S
    parsed = None
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        parsed = _split_response(data)
        if parsed and _body_complete(parsed[0], parsed[2], parsed[3], head_request):
            break
    parsed = _split_response(data)
    assert parsed is not None, f"no complete response head; got {data[:300]!r}"
    status, reason, headers, rest = parsed
    if not closed and close_wait > 0:
        sock.settimeout(close_wait)
        try:
            extra = sock.recv(65536)
            closed = not extra
            assert not extra, f"bytes after the response: {extra[:200]!r}"
        except TimeoutError:
            closed = False
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
            closed = True
    if dict(headers).get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return RawResponse(status, reason, headers, rest, closed, data)


def send_raw(
    gw: GatewayProcess,
    data: bytes,
    *,
    head_request: bool = False,
    close_wait: float = CLOSE_WAIT_S,
    server_hostname: str = "localhost",
) -> RawResponse:
    """One raw request on a fresh TLS connection (all bytes in one write)."""
    with tls_socket(gw, server_hostname) as sock:
        sock.sendall(data)
        return read_response(sock, head_request=head_request, close_wait=close_wait)


def get(
    gw: GatewayProcess, target: str | bytes, headers: str = "", host: str = "localhost"
) -> RawResponse:
    """A plain GET with Connection: close, for requests that should simply work."""
    raw_target = target.encode() if isinstance(target, str) else target
    head = f"Host: {host}\r\nConnection: close\r\n{headers}\r\n".encode()
    return send_raw(gw, b"GET " + raw_target + b" HTTP/1.1\r\n" + head)


def assert_json_error(resp: RawResponse, status: int, code: str | None = None) -> None:
    """A gateway error in the JSON shape: {"error": {"code": str, "message": str}}."""
    assert resp.status == status, resp.raw[:400]
    assert (resp.header("content-type") or "").startswith("application/json"), resp.headers
    payload = resp.json()
    assert set(payload) == {"error"}, payload
    assert set(payload["error"]) == {"code", "message"}, payload
    assert isinstance(payload["error"]["code"], str) and payload["error"]["code"]
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    if code is not None:
        assert payload["error"]["code"] == code, payload


def assert_html_error(resp: RawResponse, status: int) -> None:
    assert resp.status == status, resp.raw[:400]
    assert (resp.header("content-type") or "").startswith("text/html"), resp.headers
    text = resp.body.decode()
    assert text.lstrip().lower().startswith("<!doctype html>"), text[:200]
    assert f"<title>{status} " in text, text[:400]


def wait_for_requests(up: FakeUpstream, count: int, timeout: float = READ_TIMEOUT_S) -> None:
    """Bounded wait until the upstream has recorded `count` requests."""
    deadline = time.monotonic() + timeout
    while len(up.requests) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def canary(gw: GatewayProcess, up: FakeUpstream) -> None:
    """A normal request still works, and it is the only one the upstream saw since `clear`.

    Its answer comes back after the upstream recorded it, so an earlier request that had been
    (wrongly) forwarded would be in the record by now too.
    """
    resp = get(gw, "/canary")
    assert resp.status == 200, resp.raw[:400]
    assert resp.json()["raw_path"] == "/canary"
    seen = [r.raw_path for r in up.requests]
    assert seen == ["/canary"], f"the upstream saw more than the canary: {seen}"


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A real command with a bound on its run time."""
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, **kwargs
    )


def need_tool(path: str | None, what: str) -> str:
    """A tool the test drives: fails loudly in CI, skips with the reason elsewhere."""
    if path is None:
        if ci():
            pytest.fail(f"{what} not found on PATH")
        pytest.skip(f"{what} not found on PATH")
    assert path is not None
    return path

"""Shared helpers and fixtures for the streaming, WebSocket, lifecycle, worker and log e2e tests.

Import the fixtures you use into a test module (`from tests.e2e.fixtures_stream import upstream`);
pytest then finds them there. Every process or thread started here is stopped here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from aiohttp import WSMsgType, web

from tests.support.gateway import GatewayProcess
from tests.support.gateway import client_context as client_context
from tests.support.gateway import tls_socket as tls_socket
from tests.support.upstream import BackgroundApp

Headers = dict[str, str]


def config_text(
    upstream_url: str,
    *,
    server: str = "",
    timeouts: str = "",
    routes: str = "",
) -> str:
    """A gateway config: one upstream `app` at `/`, plus whatever the test adds."""
    return f"""
[server]
listen = "127.0.0.1:0"
max_body = "3GiB"
{server}

[server.timeouts]
{timeouts}

[[upstream]]
name = "app"
url = "{upstream_url}"

{routes}

[[route]]
path = "/"
auth = ["none"]
upstream = "app"
"""


@contextlib.contextmanager
def running_gateway(
    tmp_path: Path, upstream_url: str, args: tuple[str, ...] = (), **config: str
) -> Iterator[GatewayProcess]:
    """A gateway with a config file (so tests can edit it and send SIGHUP); stopped at the end."""
    gw = GatewayProcess(
        list(args), tmp_path / "data", config_text=config_text(upstream_url, **config)
    )
    try:
        yield gw
    finally:
        gw.stop()


def write_config(gw: GatewayProcess, upstream_url: str, **config: str) -> None:
    gw.config_path.write_text(config_text(upstream_url, **config))


def https(gw: GatewayProcess, timeout: float = 10.0) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "127.0.0.1", gw.port, context=client_context(gw), timeout=timeout
    )


@dataclass
class Result:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def fetch(
    gw: GatewayProcess,
    path: str,
    *,
    method: str = "GET",
    headers: Headers | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Result:
    """One request on a new connection; the whole response."""
    conn = https(gw, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Result(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def read_sse(resp: http.client.HTTPResponse, limit: int = 10_000) -> Iterator[tuple[int, bytes]]:
    """(arrival time_ns, data) for each `data:` line, as soon as it is read off the socket."""
    for _ in range(limit):
        line = resp.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            yield time.time_ns(), line[6:].rstrip(b"\r\n")


def access_lines(gw: GatewayProcess) -> list[dict[str, object]]:
    """The JSON access-log records among the gateway's output lines."""
    records = []
    for line in list(gw.lines):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll `predicate` until it is true or `timeout` passes (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def count_lines(gw: GatewayProcess, text: str) -> int:
    return sum(1 for line in list(gw.lines) if text in line)


def upstream_connections(pid: int, upstream_port: int) -> int:
    """ESTABLISHED TCP connections from process `pid` to the upstream's port."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(
        1
        for c in conns
        if c.raddr and c.raddr.port == upstream_port and c.status == psutil.CONN_ESTABLISHED
    )


class RssSampler:
    """Samples the RSS of a process (and its children) every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class WsClosure:
    tag: str
    close_code: int | None
    messages: int


@dataclass
class ControlUpstream(BackgroundApp):
    """An upstream for what FakeUpstream does not do: WebSockets that close on command, and
    big downloads.

    `/ws?tag=T`: echoes text as `echo:<text>` and binary as is; the text `close:<code>` makes
    the server close with that code. When a socket ends (either side), a WsClosure is recorded.
    `/download?bytes=N[&chunked=1]`: N bytes in 1 MiB writes (each awaits the socket's drain);
    `downloads` gets N when all were written.
    """

    closures: list[WsClosure] = field(default_factory=list)
    downloads: list[int] = field(default_factory=list)
    port: int = 0

    def closed(self, tag: str) -> WsClosure | None:
        return next((c for c in list(self.closures) if c.tag == tag), None)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/download", self._download)
        return app

    async def _download(self, request: web.Request) -> web.StreamResponse:
        total = int(request.query["bytes"])
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = total
        await resp.prepare(request)
        block = b"\x5a" * (1024 * 1024)
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            await resp.write(block[:n] if n < len(block) else block)
            sent += n
        await resp.write_eof()
        self.downloads.append(total)
        return resp

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        tag = request.query.get("tag", "")
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=64 * 1024 * 1024)
        await ws.prepare(request)
        count = 0
        try:
            async for msg in ws:
                count += 1
                if msg.type == WSMsgType.TEXT:
                    if msg.data.startswith("close:"):
                        await ws.close(code=int(msg.data[6:]), message=b"server says bye")
                        break
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self.closures.append(WsClosure(tag, ws.close_code, count))
        return ws

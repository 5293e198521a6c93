"""Listeners: the HTTPS data plane and the plain-HTTP redirect, on sockets we bind ourselves.

Binding is separate from serving so that `--workers N` can share one port through SO_REUSEPORT
(each worker binds its own socket) and port 0 still means one port for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable

import httptools

from garrison.acme.challenges import PREFIX as ACME_PREFIX
from garrison.acme.challenges import ChallengeStore
from garrison.http import wire
from garrison.http.downstream import DownstreamProtocol
from garrison.pipeline.exchange import Reply
from garrison.runtime import Runtime

log = logging.getLogger("garrison")


class ServerState:
    """What every connection of a listener shares: the current runtime and the open connections."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.connections: set[DownstreamProtocol] = set()
        self.draining = False

    def log_internal_error(self, exc: BaseException) -> None:
        log.error("internal error while handling a request", exc_info=exc)

    def in_flight(self) -> int:
        return sum(1 for c in self.connections if c.current is not None or c.parsing is not None)


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket; `reuse_port` lets several worker processes share the port."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_https(
    sock: socket.socket, ssl_context: ssl.SSLContext, state: ServerState
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: DownstreamProtocol(state),
        sock=sock,
        ssl=ssl_context,
        ssl_handshake_timeout=10.0,
        backlog=4096,
    )


class RedirectProtocol(asyncio.Protocol):
    """Plain HTTP: every request gets a 301 to the same host and path on HTTPS, then close.

    Except ACME HTTP-01: /.well-known/acme-challenge/<token> is answered here, before any
    redirect or auth (RFC 8555 §8.3: the CA fetches it over plain HTTP, on port 80).
    """

    def __init__(
        self, https_port: Callable[[], int], challenges: ChallengeStore | None = None
    ) -> None:
        self.https_port = https_port
        self.challenges = challenges
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.host = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.timer = asyncio.get_running_loop().call_later(10.0, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.on_message_complete()
        except httptools.HttpParserError:
            self._send(Reply(400, b"bad request\n", b"text/plain"))

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value

    def on_message_complete(self) -> None:
        if self.challenges is not None and self.url.startswith(ACME_PREFIX.encode()):
            answer = self.challenges.answer(self.url)
            if answer is None:
                self._send(Reply(404, b"unknown ACME challenge\n", b"text/plain"))
            else:
                self._send(Reply(200, answer, b"application/octet-stream"))
            return
        host = _host_without_port(self.host)
        if host is None or not self.url.startswith(b"/"):
            self._send(
                Reply(
                    400,
                    b"a valid Host header and an origin-form target are required\n",
                    b"text/plain",
                )
            )
            return
        port = self.https_port()
        authority = host if port == 443 else host + b":%d" % port
        location = b"https://" + authority + self.url
        self._send(Reply(301, b"", b"text/plain", [(b"location", location)]))

    def _send(self, reply: Reply) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.reply_bytes(reply, [], close=True, head_only=False))
            self.transport.close()


def _host_without_port(host: bytes) -> bytes | None:
    host = host.strip()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else None
    name = host.split(b":", 1)[0]
    if not name or any(c in name for c in b" /\\@?#") or len(name) > 253:
        return None
    return name


async def serve_redirect(
    sock: socket.socket,
    https_port: Callable[[], int],
    challenges: ChallengeStore | None = None,
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: RedirectProtocol(https_port, challenges), sock=sock, backlog=1024
    )


async def drain(state: ServerState, grace: float) -> bool:
    """Graceful stop: close idle connections, let in-flight ones finish within `grace` seconds."""
    state.draining = True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for conn in list(state.connections):
            conn.drain_idle()
        if not state.connections:
            return True
        await asyncio.sleep(0.05)
    for conn in list(state.connections):
        conn.abort("shutdown_grace_expired")
    # Let connection_lost run: the requests cut here still get their access-log line.
    for _ in range(20):
        if not state.connections:
            break
        await asyncio.sleep(0.005)
    return False

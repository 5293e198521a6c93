"""Upstream side of the data plane: keep-alive connection pools and the response parser.

An UpstreamConnection carries one request at a time for a `ResponseSink` (the downstream side),
parses the response with llhttp and hands over head, body pieces and end as they arrive: nothing
is buffered. A connection goes back to the pool only when its response was read to the end and
the request was sent whole.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import httptools

from garrison.http import health
from garrison.pipeline.exchange import Headers

P = TypeVar("P", bound=asyncio.BaseProtocol)

UPSTREAM_WRITE_HIGH = 256 * 1024


class UpstreamError(Exception):
    """Why an upstream request failed.

    `kind`: connect_refused, connect_timeout, closed, idle_timeout or bad_response.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


class ResponseSink(Protocol):
    """What the downstream side offers an upstream connection (see downstream.InFlight)."""

    def on_response_head(
        self, status: int, reason: bytes, headers: Headers, upgrade: bool
    ) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_failed(self, error: UpstreamError, response_started: bool) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def on_upstream_pause(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an upstream server."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.requests = 0
        self.idle_since = 0.0
        self._headers: Headers = []
        self._status = 0
        self._informational = False
        self._head_seen = False
        self._complete = False
        self._framed = False
        self._head_request = False
        self._request_sent = False
        self._tunnel = False
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=UPSTREAM_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self._last_activity = time.monotonic()
        sink = self.sink
        if sink is None:
            self.transport and self.transport.abort()  # unsolicited bytes: never reuse
            return
        if self._tunnel:
            sink.on_tunnel_data(data)
            return
        sink.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._tunnel = True
            rest = data[upgrade.args[0] :]
            if rest:
                sink.on_tunnel_data(rest)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("bad_response", f"invalid response from upstream: {exc}"))
        finally:
            sink.uncork()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None or self._complete:
            return
        if self._tunnel:
            sink.on_response_end()
        elif self._head_seen and not self._framed and not self._informational:
            # Close-delimited body: the end of the connection is the end of the response.
            sink.on_response_end()
        else:
            sink.on_upstream_failed(
                UpstreamError("closed", "upstream closed the connection"), self._head_seen
            )

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause(False)

    # -- llhttp callbacks -----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self._status = status
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100 Continue, 103 Early Hints: not forwarded
            self._headers = []
            self._framed = False
            return
        self._head_seen = True
        headers, self._headers = self._headers, []
        if self.sink is not None:
            self.sink.on_response_head(status, b"", headers, status == 101)
        if self._head_request or status in (204, 304):
            self._framed = True
            if self._head_request and self.transport is not None:
                # llhttp cannot be told the response to HEAD has no body: finish here, never reuse.
                self._finish(reusable=False)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self._complete:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._status == 101 or self._complete:
            return
        self._finish(reusable=self.parser.should_keep_alive() and self._request_sent)

    # -- used by the downstream side ----------------------------------------------------------
    def send(
        self, head: bytes, sink: ResponseSink, head_request: bool, idle_timeout: float
    ) -> None:
        """Start a request: the head now, the body through write()/end_request()."""
        self.sink = sink
        self.requests += 1
        self._headers = []
        self._head_seen = self._complete = self._framed = self._tunnel = False
        self._informational = False
        self._request_sent = False
        self._head_request = head_request
        self._last_activity = time.monotonic()
        self._arm_idle(idle_timeout)
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self._last_activity = time.monotonic()  # a long upload is activity too
            self.transport.write(data)

    def end_request(self) -> None:
        self._request_sent = True

    def pause_reading(self, paused: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection (client went away, or the response cannot be completed)."""
        self.sink = None
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    # -- internals ------------------------------------------------------------------------------
    def _finish(self, reusable: bool) -> None:
        self._complete = True
        if not reusable:
            self._cancel_timer()
        sink, self.sink = self.sink, None
        if reusable:
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.on_response_end()

    def _fail(self, error: UpstreamError) -> None:
        sink = self.sink
        started = self._head_seen
        self.abort()
        if sink is not None:
            sink.on_upstream_failed(error, started)

    def _arm_idle(self, timeout: float) -> None:
        # Lazy: a timer left from the previous request is re-checked against _last_activity
        # when it fires, so keep-alive requests do not pay for a new TimerHandle each.
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self._check_idle, timeout)

    def _check_idle(self, timeout: float) -> None:
        self._timer = None
        if self.sink is None or self._tunnel:
            return
        if self._reading_paused:
            self._last_activity = time.monotonic()  # the client is slow, not the upstream
        quiet = time.monotonic() - self._last_activity
        if quiet >= timeout:
            self._fail(UpstreamError("idle_timeout", f"upstream sent nothing for {timeout:g}s"))
        else:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout - quiet, self._check_idle, timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamPool:
    """Keep-alive connections to one upstream, reused in LIFO order (warm sockets first)."""

    def __init__(
        self, name: str, host: str, port: int, connect_timeout: float, max_idle: int
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self.closed = False
        self.health = health.of(name, host, port)

    def take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        conn = await self._open(lambda: UpstreamConnection(self))
        self._all.add(conn)
        return conn

    async def probe(self) -> None:
        """The idle health probe: one TCP connect, closed at once (http/health.py)."""
        self.health.probing = True
        try:
            await self._open(asyncio.Protocol)
        except UpstreamError:
            pass  # recorded as the upstream's health by _open
        finally:
            self.health.probing = False

    async def _open(self, factory: Callable[[], P]) -> P:
        """A new connection, its outcome recorded as the upstream's health; a probe's (not an
        UpstreamConnection) is closed at once."""
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(factory, self.host, self.port), self.connect_timeout
            )
        except TimeoutError:
            error = UpstreamError(
                "connect_timeout",
                f"no connection to upstream {self.name!r} within {self.connect_timeout:g}s",
            )
        except OSError as exc:
            error = UpstreamError(
                "connect_refused",
                f"cannot connect to upstream {self.name!r}: {exc.strerror or exc}",
            )
        else:
            self.health.ok()
            if not isinstance(conn, UpstreamConnection):
                transport.close()
            return conn
        self.health.failed(str(error))
        raise error

    @property
    def busy(self) -> int:
        """Connections carrying a request now: one per request in flight (HTTP/1.1)."""
        return len(self._all) - len(self._idle)

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= self.max_idle or conn.transport is None:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def sweep(self, max_idle_age: float) -> None:
        """Close connections idle for longer than `max_idle_age` (called periodically)."""
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since > max_idle_age and conn.transport is not None:
                conn.transport.close()
            else:
                keep.append(conn)
        self._idle = keep

    def close(self) -> None:
        """Close idle connections now; busy ones finish their response and are then closed."""
        self.closed = True
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()

"""Client side of the data plane: one asyncio Protocol per client connection.

llhttp (httptools) parses; this module owns the few framing decisions a proxy must make: reject
what llhttp tolerates but a proxy must not, enforce limits and timeouts, run the pipeline, then
relay the request body and the response as they arrive, with backpressure both ways.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from garrison.http import wire
from garrison.http.relay import InFlight
from garrison.observe import metrics, outcome
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pki.peer import PeerCert, peer_cert_of

if TYPE_CHECKING:
    from garrison.http.server import ServerState

DOWNSTREAM_WRITE_HIGH = 256 * 1024
MAX_URL = 8192
_FRAMING_HEADERS = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade"}
)
BODY_BUFFER_HIGH = 1024 * 1024


class Reject(Exception):
    """Raised inside parser callbacks: answer with this error and close the connection."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class DownstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer them in order, relay bodies."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.closed = False
        self.current: InFlight | None = None
        self.parsing: InFlight | None = None
        self.queue: deque[InFlight] = deque()
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._hosts = 0
        self._content_length: int | None = None
        self._chunked = False
        self._expect_continue = False
        self._upgrade: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timer_at = 0.0
        self._tunnel_pending: list[bytes] = []
        self.tunnel_target: InFlight | None = None
        self._corked: list[bytes] | None = None
        self.abort_reason: str | None = None
        self._parse_failed = False
        self._in_head = False
        self._max_header_bytes = 0
        self._max_headers = 0
        self._deferred: tuple[Exchange, Reply] | None = None
        self._start_pending = False
        self.peer_cert: PeerCert | None = None

    # -- connection lifecycle -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=DOWNSTREAM_WRITE_HIGH)
        metrics.count_handshake(transport)
        if self.state.runtime.client_certs:
            self.peer_cert = peer_cert_of(transport)  # parsed once per connection
        self.state.connections.add(self)
        self._arm_timer(self.state.runtime.timeouts.header_read)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.connections.discard(self)
        self._stop_timer()
        for inflight in (self.current, self.parsing, *self.queue):
            if inflight is not None:
                inflight.client_gone(self.abort_reason)
        self.queue.clear()
        self.current = self.parsing = None

    def data_received(self, data: bytes) -> None:
        if self._parse_failed:
            return  # the stream cannot be parsed past an error; an answer is on its way
        if self.tunnel_target is not None:
            self.tunnel_target.tunnel_to_upstream(data)
            return
        if self._upgrade is not None and self.parsing is None and self.current is not None:
            self._tunnel_pending.append(data)  # bytes after an Upgrade request, before the 101
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if rest:
                self._tunnel_pending.append(rest)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status, cause.code, str(cause))
            else:
                self._reject(400, "bad_request", "the request could not be processed")
                self.state.log_internal_error(cause or exc)
        except httptools.HttpParserError as exc:
            self._reject(400, "malformed_request", f"malformed HTTP request: {_parser_reason(exc)}")
        if self._start_pending and self.current is not None:
            # Started after the whole chunk was parsed: a body that came with the head goes
            # upstream in the same write as the head.
            self._start_pending = False
            self.current.start()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.current is not None:
            self.current.client_pause(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.current is not None:
            self.current.client_pause(False)

    def eof_received(self) -> bool:
        # A half-closed client may still be waiting for its answer; keep the socket open.
        return self.current is not None

    # -- llhttp callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        runtime = self.state.runtime
        self._max_header_bytes = runtime.max_header_bytes
        self._max_headers = runtime.max_headers
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._hosts = 0
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._upgrade = None
        if self.current is None:
            self._arm_timer(self.state.runtime.timeouts.header_read)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            raise Reject(414, "uri_too_long", f"request target longer than {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes or len(self._headers) >= self._max_headers:
            raise Reject(431, "headers_too_large", "request header block too large")
        name = name.lower()
        if name in _FRAMING_HEADERS:
            self._framing_header(name, value)
        self._headers.append((name, value))

    def _framing_header(self, name: bytes, value: bytes) -> None:
        """The few headers the data plane itself must understand."""
        if name == b"host":
            self._hosts += 1
        elif name == b"content-length":
            self._content_length = int(value)
        elif name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                # "gzip, chunked" would reach the upstream re-chunked but without its gzip.
                raise Reject(501, "unsupported_transfer_coding", "only chunked is supported")
            self._chunked = True
        elif name == b"expect":
            if value.lower() != b"100-continue":
                raise Reject(417, "expectation_failed", "only Expect: 100-continue is supported")
            self._expect_continue = True
        elif name == b"upgrade":
            self._upgrade = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        runtime = self.state.runtime
        parser = self.parser
        method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Reject(505, "version_not_supported", "only HTTP/1.0 and HTTP/1.1 are supported")
        if self._chunked and version == "1.0":
            raise Reject(
                400, "chunked_on_http10", "chunked transfer coding is not allowed on HTTP/1.0"
            )
        if method == "CONNECT":
            # 501, not 405: a 405 must list allowed methods, and a gateway has no such list
            raise Reject(501, "method_not_implemented", "CONNECT is not supported (not a proxy)")
        if self._hosts != 1 and (version == "1.1" or self._hosts > 1):
            raise Reject(400, "bad_host", "exactly one Host header is required")
        if self._content_length is not None and self._content_length > runtime.max_body:
            raise Reject(
                413, "body_too_large", f"request body larger than {runtime.max_body} bytes"
            )
        upgrade = self._upgrade if parser.should_upgrade() else None
        has_body = self._chunked or bool(self._content_length)
        ex = Exchange(
            method=method,
            target=self._url,
            version=version,
            headers=self._headers,
            peer_ip=self.peer_ip,
            started=time.monotonic(),
            peer_cert=self.peer_cert,
        )
        inflight = InFlight(
            self,
            ex,
            has_body=has_body,
            chunked=self._chunked,
            content_length=self._content_length,
            expect_continue=self._expect_continue,
            upgrade=upgrade,
            keep_alive=parser.should_keep_alive(),
        )
        self.parsing = inflight
        if self.current is None:
            self._cancel_timer()
            self.current = inflight
            self._start_pending = True
        else:
            self.queue.append(inflight)
            self.pause("pipelined")

    def on_body(self, body: bytes) -> None:
        inflight = self.parsing
        if inflight is None:
            return
        if inflight.body_received + len(body) > self.state.runtime.max_body:
            raise Reject(413, "body_too_large", "request body larger than the limit")
        inflight.request_body(body)

    def on_message_complete(self) -> None:
        inflight = self.parsing
        self.parsing = None
        if inflight is not None:
            inflight.request_complete()

    # -- used by InFlight ---------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until uncork(): one TLS record and one syscall instead of several."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        pending, self._corked = self._corked, None
        if pending and self.transport is not None and not self.closed:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def pause(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._pause_reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def send_reply(
        self, reply: Reply, close: bool, head_only: bool = False, extra: bytes = b""
    ) -> None:
        security = self.state.runtime.security_headers
        self.write(wire.reply_bytes(reply, security, close, head_only, extra))
        if close:
            self.close()

    def finished(self, inflight: InFlight, close: bool) -> None:
        """The response of `inflight` was written whole: close, or go on with the next request."""
        if self.current is not inflight:
            return
        self.current = None
        if close or self.state.draining or self.closed:
            self.close()
            return
        if not self.queue and self._deferred is not None:
            self._send_error(*self._deferred)
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.current = nxt
            if not self.queue:
                self.resume("pipelined")
            nxt.start()
            return
        self._arm_timer(self.state.runtime.timeouts.keepalive_idle)

    def start_tunnel(self, inflight: InFlight) -> None:
        """After the upstream's 101: bytes flow both ways untouched."""
        self.tunnel_target = inflight
        self._cancel_timer()
        pending, self._tunnel_pending = self._tunnel_pending, []
        for data in pending:
            inflight.tunnel_to_upstream(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.uncork()
            self.closed = True
            self.transport.close()

    def abort(self, reason: str | None = None) -> None:
        """Drop the connection now; `reason` says why in the access log (default: the client)."""
        self._corked = None
        if reason is not None:
            self.abort_reason = reason
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def drain_idle(self) -> None:
        """Graceful shutdown: close now if no request is in progress."""
        if self.current is None and self.parsing is None:
            self.close()

    # -- internals ------------------------------------------------------------------------------
    def _reject(self, status: int, code: str, message: str) -> None:
        """A request that must not go on: answer it (in order) and close the connection."""
        self._parse_failed = True
        ex = Exchange("-", self._url, "1.1", self._headers, self.peer_ip, started=time.monotonic())
        ex.stage = "parse"
        reply = error_reply(status, code, message, html=ex.wants_html())
        bad = self.parsing
        current = self.current
        if current is not None and bad is not current:
            # Earlier pipelined requests are answered first; the error goes out after them.
            if bad is not None and bad in self.queue:
                self.queue.remove(bad)
                bad.cancel()
            self.parsing = None
            self._deferred = (ex, reply)
            self.pause("rejected")
            return
        if current is not None and current.response_started:
            self.abort()
            current.client_gone()
            return
        for pending in (current, bad, *self.queue):
            if pending is not None:
                pending.cancel()
        self.queue.clear()
        self.current = self.parsing = None
        self._send_error(ex, reply)

    def _send_error(self, ex: Exchange, reply: Reply) -> None:
        outcome.answered(self.state.runtime, ex, reply)
        self.send_reply(reply, close=True)

    # One lazy timer per connection. It never fires later than header_read from when it was
    # set, and re-arms itself for what is left of the deadline, so switching between the
    # keep-alive and header-read deadlines on every request costs no TimerHandle at all.
    def _arm_timer(self, timeout: float) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._deadline = now + timeout
        if self._timer is not None and self._timer_at > self._deadline:
            self._timer.cancel()  # rare: a deadline shorter than the pending tick
            self._timer = None
        if self._timer is None:
            self._schedule(now, min(timeout, self.state.runtime.timeouts.header_read))

    def _schedule(self, now: float, delay: float) -> None:
        assert self._loop is not None
        self._timer_at = now + delay
        self._timer = self._loop.call_at(self._timer_at, self._on_timer)

    def _cancel_timer(self) -> None:
        """Disarm: the pending tick finds no deadline and lapses."""
        self._deadline = 0.0

    def _stop_timer(self) -> None:
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline or self.closed or self._loop is None:
            return
        now = self._loop.time()
        left = self._deadline - now
        if left > 0:
            self._schedule(now, min(left, self.state.runtime.timeouts.header_read))
            return
        if self.current is not None:
            return
        if self._in_head:
            self._reject(408, "request_timeout", "the request headers took too long to arrive")
        else:
            self.close()  # idle keep-alive connection, or nothing sent after the handshake


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text[:120] if text else type(exc).__name__

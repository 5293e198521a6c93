"""One request in flight: run the pipeline, then relay body and response between the two sides.

The pipeline is called synchronously; only a stage that really needs to wait (or a new upstream
connection) costs an asyncio Task. Everything else is driven by protocol callbacks, so a
keep-alive request through a pooled connection does no scheduling at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from garrison.http import wire
from garrison.http.upstream import UpstreamConnection, UpstreamError, UpstreamPool
from garrison.observe import outcome
from garrison.pipeline.exchange import BodyTooLarge, Exchange, Reply, error_reply

if TYPE_CHECKING:
    from garrison.http.downstream import DownstreamProtocol
    from garrison.runtime import Runtime

BODY_BUFFER_HIGH = 1024 * 1024
# Like nginx: after these the client's next bytes are not worth reading on this connection.
CLOSE_AFTER = frozenset({400, 408, 413, 414, 431, 500, 501})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_UPSTREAM_STATUS = {
    "connect_refused": (502, "upstream_unavailable"),
    "connect_timeout": (504, "upstream_timeout"),
    "idle_timeout": (504, "upstream_timeout"),
    "closed": (502, "upstream_closed"),
    "bad_response": (502, "bad_upstream_response"),
}


class InFlight:
    """The state of one request between the client connection and an upstream connection."""

    def __init__(
        self,
        down: DownstreamProtocol,
        ex: Exchange,
        *,
        has_body: bool,
        chunked: bool,
        content_length: int | None,
        expect_continue: bool,
        upgrade: bytes | None,
        keep_alive: bool,
    ) -> None:
        self.down = down
        self.ex = ex
        self.runtime: Runtime = down.state.runtime
        self.has_body = has_body
        self.chunked = chunked
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.keep_alive = keep_alive
        self.body_received = 0
        self.body_done = not has_body
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Future[None] | None = None
        self.response_started = False
        self.done = False
        self.status = 0
        self.bytes_out = 0
        self.upstream_started = 0.0
        self.upstream_headers_at = 0.0
        self._chunk_out = False
        self._close_after = False
        self._reused = False
        self._retried = False
        self._tunnel = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._observer = None
        self.audited = False
        # SHA-256 of the body as it streams (audit bodies = "hash"); None costs one test per chunk.
        self.digest = self.runtime.audit.body_digest() if has_body else None
        ex.body_source = self

    # -- phase 1: the pipeline ----------------------------------------------------------------
    def start(self) -> None:
        """Called when this request becomes the connection's current one."""
        self.runtime = self.down.state.runtime
        try:
            result = self.runtime.pipeline.run(self.ex)
        except Exception as exc:
            self._internal_error(exc)
            return
        if result is None or isinstance(result, Reply):
            self._after_pipeline(result)
        elif isinstance(result, asyncio.Future):
            self.task = result  # cancel() cancels it; no Task wraps it
            result.add_done_callback(self._pipeline_done)
        else:
            self.task = asyncio.ensure_future(self._await_pipeline(result))

    def _pipeline_done(self, future: asyncio.Future[Reply | None]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self._internal_error(exc)
            return
        self._after_pipeline(future.result())

    async def _await_pipeline(self, pending: Awaitable[Reply | None]) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:
            return
        except Exception as exc:
            self._internal_error(exc)
            return
        self._after_pipeline(reply)

    def _after_pipeline(self, reply: Reply | None) -> None:
        if self.done:
            return
        if reply is not None:
            self._reply(reply)
            return
        route = self.ex.route
        assert route is not None
        pool = self.runtime.pools[route.upstream]
        conn = pool.take_idle()
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self.task = asyncio.ensure_future(self._connect(pool))

    async def _connect(self, pool: UpstreamPool) -> None:
        try:
            conn = await pool.connect()
        except asyncio.CancelledError:
            return
        except UpstreamError as exc:
            self.on_upstream_failed(exc, False)
            return
        if self.done:
            pool.release(conn)
            return
        self._attach(conn, reused=False)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, for a gateway endpoint that answers itself (login, token)."""
        if not self.has_body:
            return b""
        if self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge
        if self.expect_continue and self.body_received == 0 and not self.body_done:
            self.expect_continue = False
            self.down.write(wire.CONTINUE)
        while not self.body_done:
            if self._buffered > limit:
                raise BodyTooLarge
            self._body_waiter = asyncio.get_running_loop().create_future()
            await self._body_waiter
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        self.down.resume("body")
        if len(data) > limit:
            raise BodyTooLarge
        return data

    def _run_finish_hooks(self) -> None:
        """Give back what stages hold for this request, exactly once, whatever ended it."""
        self.ex.finished = True
        hooks, self.ex.on_finish = self.ex.on_finish, None
        if not hooks:
            return
        for hook in hooks:
            try:
                hook()
            except Exception as exc:  # one failing hook must not keep the others' slots
                self.down.state.log_internal_error(exc)

    def _wake_body_reader(self) -> None:
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- phase 2: the request goes upstream -----------------------------------------------------
    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        self.conn = conn
        self._reused = reused
        ex = self.ex
        if ex.body_override is not None:
            # The body was read whole by a stage (read_body) and rewritten: send that instead.
            self.chunked = False
            self.content_length = len(ex.body_override)
            self._buffer = [ex.body_override] if ex.body_override else []
            ex.body_override = None
        if self.expect_continue and not self.body_done and self.body_received == 0:
            self.down.write(wire.CONTINUE)
        if self.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif self.content_length is not None:
            framing = b"content-length: %d\r\n" % self.content_length
        elif ex.method in ("POST", "PUT", "PATCH"):
            framing = b"content-length: 0\r\n"
        else:
            framing = b""
        upgrade = self.upgrade if self.upgrade and self.upgrade.lower() == b"websocket" else None
        if self.upgrade is not None and upgrade is None:
            self._close_after = True  # h2c and other upgrades are not relayed
        host = (
            ex.host.encode("latin-1") if ex.host else f"{conn.pool.host}:{conn.pool.port}".encode()
        )
        head = wire.request_head(
            ex.method,
            ex.upstream_target,
            host,
            ex.headers,
            ex.upstream_headers,
            framing,
            upgrade,
            ex.identity_block,
        )
        pieces = [head]
        if self._buffer:
            pieces += [wire.chunk(p) for p in self._buffer] if self.chunked else self._buffer
            self._buffer.clear()
            self._buffered = 0
            self.down.resume("body")
        if self.body_done and self.chunked:
            pieces.append(wire.LAST_CHUNK)
        self.upstream_started = time.monotonic()
        conn.send(
            pieces[0] if len(pieces) == 1 else b"".join(pieces),
            self,
            ex.method == "HEAD",
            self.runtime.timeouts.upstream_idle,
        )
        if self.body_done:
            conn.end_request()
        if self.down.write_paused:
            conn.pause_reading(True)

    def request_body(self, data: bytes) -> None:
        """A piece of the request body from the client."""
        self.body_received += len(data)
        if self.digest is not None:
            self.digest.update(data)
        if self.done:
            return
        if self.conn is not None:
            self._send_body(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_BUFFER_HIGH:
            self.down.pause("body")
        if self._body_waiter is not None:
            self._wake_body_reader()

    def request_complete(self) -> None:
        self.body_done = True
        if self._body_waiter is not None:
            self._wake_body_reader()
        if self.conn is not None and not self.done:
            self._end_body()

    def _send_body(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.write(wire.chunk(data) if self.chunked else data)

    def _end_body(self) -> None:
        assert self.conn is not None
        if self.chunked:
            self.conn.write(wire.LAST_CHUNK)
        self.conn.end_request()

    # -- phase 3: the response comes back (ResponseSink) ----------------------------------------
    def on_response_head(
        self, status: int, reason: bytes, headers: wire.Headers, upgrade: bool
    ) -> None:
        self.response_started = True
        self.status = status
        self.upstream_headers_at = time.monotonic()
        ex = self.ex
        audit = self.runtime.audit
        if audit.always:  # on disk before the client sees the answer (bytes are not known yet)
            self.audited = True
            audit.request(ex, status, refused=False, digest=self.digest)
        security = self.runtime.security_headers
        if upgrade:
            if self.upgrade is None:
                self.on_upstream_failed(UpstreamError("bad_response", "unexpected 101"), False)
                return
            self._tunnel = True
            head = wire.response_head(status, reason, headers, security, b"", False, self.upgrade)
            self.down.write(head)
            self.down.start_tunnel(self)
            return
        if self.upgrade is not None:
            self._close_after = True
        observer = ex.response_observer
        if observer is not None:
            self._observer = observer
            observer.begin(next((v for n, v in headers if n == b"content-type"), None))
            if observer.rewrites:  # the length may change: never pass the upstream's on
                headers = [(n, v) for n, v in headers if n != b"content-length"]
        length = None
        for name, value in headers:
            if name == b"content-length":
                length = value
        no_body = ex.method == "HEAD" or status in (204, 304)
        if length is not None and status != 204:
            framing = b"content-length: " + length + b"\r\n"
        elif no_body:
            framing = b""
        elif ex.version == "1.1":
            framing = b"transfer-encoding: chunked\r\n"
            self._chunk_out = True
        else:
            framing = b""
            self._close_after = True  # HTTP/1.0 client: the end of the connection ends the body
        close = self._closing()
        route = ex.route  # the upstream's Access-Control-* lines go only where the route says
        drop = wire.HOP_BY_HOP if route and route.cors_passthrough else wire.HOP_BY_HOP_AND_CORS
        extra = ex.response_head_extra + framing
        self.down.write(
            wire.response_head(status, reason, headers, security, extra, close, drop=drop)
        )

    def on_response_body(self, data: bytes) -> None:
        if self._observer is not None:
            data = self._observer.feed(data)
            if not data:
                return
        self.bytes_out += len(data)
        self.down.write(wire.chunk(data) if self._chunk_out else data)

    def on_response_end(self) -> None:
        if self.done:
            return
        self.done = True
        self.conn = None
        if self._tunnel:
            self.down.close()
            self._log()
            self._run_finish_hooks()
            return
        if self._observer is not None:
            tail = self._observer.end()
            if tail:
                self.bytes_out += len(tail)
                self.down.write(wire.chunk(tail) if self._chunk_out else tail)
        if self._chunk_out:
            self.down.write(wire.LAST_CHUNK)
        self._log()
        self._run_finish_hooks()
        self.down.finished(self, self._closing())

    def on_upstream_failed(self, error: UpstreamError, response_started: bool) -> None:
        if self.done:
            return
        self.conn = None
        if response_started or self.response_started:
            self.done = True
            self.ex.stage = "upstream"
            self._log(error=error.kind)
            self._run_finish_hooks()
            self.down.abort()
            return
        retriable = (
            error.kind == "closed"
            and self._reused
            and not self._retried
            and not self.has_body
            and self.ex.method in IDEMPOTENT
        )
        if retriable:
            self._retried = True
            self._after_pipeline(None)
            return
        status, code = _UPSTREAM_STATUS.get(error.kind, (502, "bad_gateway"))
        self.ex.stage = "upstream"
        self._reply(error_reply(status, code, str(error), html=self.ex.wants_html()))

    def on_tunnel_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.down.write(data)

    def cork(self) -> None:
        self.down.cork()

    def uncork(self) -> None:
        self.down.uncork()

    def on_upstream_pause(self, paused: bool) -> None:
        if paused:
            self.down.pause("upstream")
        else:
            self.down.resume("upstream")

    # -- events from the client side ------------------------------------------------------------
    def client_pause(self, paused: bool) -> None:
        if self.conn is not None:
            self.conn.pause_reading(paused)

    def tunnel_to_upstream(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.write(data)

    def client_gone(self, reason: str | None = None) -> None:
        """The connection ended (the client left, or `reason`): cancel the upstream request."""
        if not self.done:
            self.done = True
            self.ex.stage = self.ex.stage or ("gateway" if reason else "client")
            if self.response_started or self.conn is not None or self.task is not None:
                self._log(error=reason or "client_closed")
        self.cancel()

    def cancel(self) -> None:
        self.done = True
        self._run_finish_hooks()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    # -- helpers --------------------------------------------------------------------------------
    def _closing(self) -> bool:
        return (
            self._close_after
            or not self.keep_alive
            or not self.body_done
            or self.down.state.draining
        )

    def _reply(self, reply: Reply) -> None:
        self.done = True
        self.status = reply.status
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        close = (
            self._closing()
            or self.upgrade is not None
            or (reply.status >= 500 and not self.body_done)
            or reply.status in CLOSE_AFTER
        )
        outcome.answered(self.runtime, self.ex, reply, self.digest, self.audited)
        self.audited = True
        self._run_finish_hooks()
        self.down.send_reply(
            reply,
            close=close,
            head_only=self.ex.method == "HEAD",
            extra=self.ex.response_head_extra,
        )
        if not close:
            self.down.finished(self, False)

    def _internal_error(self, exc: BaseException) -> None:
        self.down.state.log_internal_error(exc)
        self.ex.stage = self.ex.stage or "internal"
        self._reply(
            error_reply(
                500,
                "internal_error",
                "the gateway failed on this request",
                html=self.ex.wants_html(),
            )
        )

    def _log(self, error: str = "") -> None:
        outcome.proxied(self.runtime, self, error)

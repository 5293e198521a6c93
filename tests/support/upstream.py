"""A fake upstream (aiohttp, in a background thread) that records what reaches it.

Tests assert on `requests` to prove that something did, or did not, reach the upstream.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Self

from aiohttp import WSMsgType, web


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]


class BackgroundApp:
    """An aiohttp app served on 127.0.0.1:0 from a thread with its own event loop."""

    port: int

    def build_app(self) -> web.Application:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]


@dataclass
class FakeUpstream(BackgroundApp):
    """Start with `with FakeUpstream() as up:`; `up.url` is http://127.0.0.1:PORT."""

    requests: list[Seen] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    port: int = 0

    def count(self, path_prefix: str = "") -> int:
        return sum(1 for r in self.requests if r.raw_path.startswith(path_prefix))

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024**4)
        app.middlewares.append(self._record)
        app.router.add_route("*", "/sse", self._sse)
        app.router.add_route("*", "/slow", self._slow)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("GET", "/ws", self._ws)
        app.router.add_route("GET", "/cookie", self._cookie)
        app.router.add_route("GET", "/forever", self._forever)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        self.requests.append(
            Seen(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                [(k.lower(), v) for k, v in request.headers.items()],
            )
        )
        return await handler(request)

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": len(body),
        }
        return web.json_response(payload)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        """`n` events, `interval_ms` apart, each carrying its send time in ns."""
        n = int(request.query.get("n", "10"))
        interval = float(request.query.get("interval_ms", "20")) / 1000
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            event = json.dumps({"i": i, "sent_ns": time.time_ns()})
            await resp.write(f"data: {event}\n\n".encode())
            await asyncio.sleep(interval)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _forever(self, request: web.Request) -> web.StreamResponse:
        """Streams until the client goes away; records the disconnect by its `tag`."""
        tag = request.query.get("tag", "")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(100000):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(tag)
            raise
        return resp

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.json_response({"slow": True})

    async def _upload(self, request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"bytes": total})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def _cookie(self, request: web.Request) -> web.Response:
        resp = web.json_response({"had_cookie": request.headers.get("cookie")})
        resp.set_cookie("session", request.query.get("v", "x"))
        return resp

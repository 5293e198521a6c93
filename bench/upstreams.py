"""The Python upstreams: an SSE streamer and an upload sink (raw asyncio + httptools, uvloop).

Run as ``python -m bench.upstreams sse PORT`` or ``python -m bench.upstreams sink PORT``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from urllib.parse import parse_qs, urlsplit

import httptools
import uvloop

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
# About the size of an LLM token chunk as an OpenAI-style stream sends it.
_PAD = "x" * 96


class SseProtocol(asyncio.Protocol):
    """GET /sse?n=N&ms=M streams N events M ms apart; each carries time.time_ns() at send."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        query = parse_qs(urlsplit(self.url.decode()).query)
        self.url = b""
        count = int(query.get("n", ["100"])[0])
        interval = float(query.get("ms", ["20"])[0]) / 1000
        self.task = asyncio.ensure_future(self._stream(count, interval))

    async def _stream(self, count: int, interval: float) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        transport.write(_SSE_HEAD)
        start = loop.time()
        for seq in range(count):
            event = f"id: {seq}\ndata: {seq} {time.time_ns()} {_PAD}\n\n".encode()
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            delay = start + (seq + 1) * interval - loop.time()
            if seq + 1 < count and delay > 0:
                await asyncio.sleep(delay)
        transport.write(b"0\r\n\r\n")

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()


class SinkProtocol(asyncio.Protocol):
    """Reads and discards each request body (any framing) and answers 200 with the byte count."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.received = 0
        self.expect = False
        self._name = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()

    def on_message_begin(self) -> None:
        self.received = 0
        self.expect = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"expect" and value.lower() == b"100-continue":
            self.expect = True

    def on_headers_complete(self) -> None:
        if self.expect and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.received += len(body)

    def on_message_complete(self) -> None:
        body = str(self.received).encode()
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )


async def serve(kind: str, port: int) -> None:
    """Serve kind ("sse" or "sink") on 127.0.0.1:port until killed."""
    loop = asyncio.get_running_loop()
    factory = {"sse": SseProtocol, "sink": SinkProtocol}[kind]
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024)
    print(f"{kind} upstream on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))

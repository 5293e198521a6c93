"""SSE client: many concurrent streams; records arrival - send (stamped by the upstream) per event.

Run as ``python -m bench.sse_client URL --streams 200 --events 100 --interval-ms 20``; prints one
JSON object with the event count, errors and delay statistics in milliseconds. Connections (and TLS
handshakes) are all made first; then the requests go out staggered over one interval so that the
streams' events are spread in time instead of arriving in bursts of 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import time
from urllib.parse import urlsplit

import httptools
import uvloop


class StreamProtocol(asyncio.Protocol):
    """One SSE response: parses the chunked body and keeps the delay of each event (ns)."""

    def __init__(self, delays: list[int]) -> None:
        self.delays = delays
        self.parser = httptools.HttpResponseParser(self)
        self.buffer = b""
        self.arrival = 0
        self.status = 0
        self.events = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.arrival = time.time_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.buffer += body
        while (end := self.buffer.find(b"\n\n")) >= 0:
            event, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    sent = int(line.split(b" ", 3)[2])
                    self.delays.append(self.arrival - sent)
                    self.events += 1

    def on_message_complete(self) -> None:
        self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("closed before the end of the stream"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


async def run(url: str, streams: int, events: int, interval_ms: float) -> dict[str, float]:
    """Open the streams, read them to the end and summarise the event delays."""
    parts = urlsplit(url)
    tls: ssl.SSLContext | None = None
    if parts.scheme == "https":
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    port = parts.port or (443 if tls else 80)
    target = f"{parts.path or '/'}?n={events}&ms={interval_ms:g}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    delays: list[int] = []
    protocols: list[StreamProtocol] = []
    errors = 0

    async def connect() -> None:
        _, proto = await loop.create_connection(
            lambda: StreamProtocol(delays), parts.hostname, port, ssl=tls
        )
        protocols.append(proto)

    sem = asyncio.Semaphore(32)

    async def bounded() -> None:
        async with sem:
            await connect()

    results = await asyncio.gather(*(bounded() for _ in range(streams)), return_exceptions=True)
    errors += sum(isinstance(r, BaseException) for r in results)
    step = interval_ms / 1000 / max(len(protocols), 1)
    start = loop.time()
    for index, proto in enumerate(protocols):
        delay = start + index * step - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        assert proto.transport is not None
        proto.transport.write(request)
    timeout = events * interval_ms / 1000 + 30
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(p.done for p in protocols), return_exceptions=True), timeout
    )
    errors += sum(isinstance(o, BaseException) for o in outcomes)
    errors += sum(p.status != 200 for p in protocols)
    for proto in protocols:
        if proto.transport is not None:
            proto.transport.close()
    return summarise(delays, streams * events, errors)


def summarise(delays_ns: list[int], expected: int, errors: int) -> dict[str, float]:
    """Mean, p50, p99 and max of the delays in ms, plus counts."""
    ms = sorted(d / 1e6 for d in delays_ns)
    if not ms:
        return {"events": 0, "expected": expected, "errors": errors}

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(p / 100 * len(ms)))]

    return {
        "events": len(ms),
        "expected": expected,
        "errors": errors,
        "mean_ms": statistics.fmean(ms),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": ms[-1],
    }


def main() -> None:
    """Parse arguments, run, print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    uvloop.install()
    summary = asyncio.run(run(args.url, args.streams, args.events, args.interval_ms))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

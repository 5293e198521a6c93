"""Pure-Python CPU cost of one proxied keep-alive request: no sockets, no TLS, no peers.

`python -m bench.micro [N] [--profile] [--auth none|key|jwt]` drives the real DownstreamProtocol and
UpstreamConnection with in-memory transports through the whole pipeline (normalise, route,
forwarding headers, access log to /dev/null) and prints CPU µs per request. It isolates what
our Python costs from what uvloop, OpenSSL and the kernel cost, which `make bench` cannot.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import uvloop

from garrison import config as config_mod
from garrison.auth.identity import Identity
from garrison.auth.service import AuthService
from garrison.http.downstream import DownstreamProtocol
from garrison.http.server import ServerState
from garrison.http.upstream import UpstreamConnection
from garrison.observe.accesslog import AccessLog
from garrison.observe.audit import AuditLog
from garrison.runtime import build_runtime
from garrison.store.db import default_url, open_store

REQUEST = (
    b"GET /chat/x?y=1 HTTP/1.1\r\nHost: localhost:8443\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 03:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
    + b"x"
    * 100
)


class MemoryTransport:
    """Just enough of an asyncio transport: keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


AUTH_METHODS = {"none": "none", "key": "api_key", "jwt": "jwt"}


# `--limits`: what the route limits, as the bench's /lim/ route does (far above what is sent).
LIMITS = {
    "none": {},
    "rate": {"rate": ["100000000/minute"]},
    "concurrency": {"concurrency": 1000},
    "both": {"rate": ["100000000/minute"], "concurrency": 1000},
}


async def measure(
    count: int,
    profile: bool,
    auth: str = "none",
    limits: str = "none",
    audit: bool = False,
    metrics: bool = True,
) -> float:
    """CPU µs per request through a route with `auth = [AUTH_METHODS[auth]]` and LIMITS[limits];
    with "key" or "jwt" every request carries `Authorization: Bearer` (the identity cached
    beforehand, as after the first request of a keep-alive run)."""
    with tempfile.TemporaryDirectory(prefix="garrison-micro-") as data_dir:
        return await _measure(count, profile, Path(data_dir), auth, limits, audit, metrics)


async def _identity(found: Identity | Awaitable[Identity]) -> Identity:
    """The identity, awaited on a cache miss (the lookup fills the cache)."""
    return found if isinstance(found, Identity) else await found


async def _measure(
    count: int, profile: bool, data_dir: Path, auth: str, limits: str, audit: bool, metrics: bool
) -> float:
    route = {"path": "/", "upstream": "default", "auth": [AUTH_METHODS[auth]], **LIMITS[limits]}
    config = config_mod.validate(
        {
            "server": {"listen": "127.0.0.1:0"},
            "upstream": [{"name": "default", "url": "http://127.0.0.1:9"}],
            "route": [route],
            "metrics": {"enabled": metrics},
        }
    )
    engine = open_store(default_url(data_dir))
    service = AuthService(engine, config.auth)
    try:
        request = REQUEST
        if auth != "none":
            _, credential = service.keys.create("bench", ["bench"])
            ident = await _identity(service.identify_key(credential, time.time()))
            if auth == "jwt":  # as the client-credentials grant issues it for that key
                scopes = sorted(ident.scopes or ())
                credential = service.issue_token(ident.name, ident.roles, ident.email, scopes)[0]
                await _identity(service.identify_token(credential, time.time()))
            request = REQUEST.replace(
                b"\r\n\r\n", b"\r\nAuthorization: Bearer " + credential.encode() + b"\r\n\r\n"
            )
        log = AuditLog(config.audit, data_dir) if audit else None  # the default [audit] file
        try:
            return _run(count, profile, config, service, request, log)
        finally:
            if log is not None:
                log.close()
    finally:
        engine.dispose()


def _run(
    count: int,
    profile: bool,
    config: config_mod.Config,
    auth: AuthService,
    request: bytes,
    audit: AuditLog | None = None,
) -> float:
    runtime = build_runtime(config, AccessLog("/dev/null"), auth, audit=audit)
    pool = runtime.pools["default"]
    upstream = UpstreamConnection(pool)
    upstream_transport = MemoryTransport()
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    pool.release(upstream)
    client = DownstreamProtocol(ServerState(runtime))
    client_transport = MemoryTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]

    def one() -> None:
        client.data_received(request)
        upstream.data_received(RESPONSE)

    for _ in range(1000):
        one()
    if not client_transport.written[-1].startswith(b"HTTP/1.1 200 OK"):
        raise RuntimeError(f"unexpected answer: {client_transport.written[-1][:200]!r}")
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.process_time()
    for _ in range(count):
        one()
    elapsed = time.process_time() - started
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=30_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile table too")
    parser.add_argument(
        "--auth", choices=sorted(AUTH_METHODS), default="none", help="the route's auth method"
    )
    parser.add_argument(
        "--limits", choices=sorted(LIMITS), default="none", help="what the route limits"
    )
    parser.add_argument(
        "--audit", action="store_true", help="with the default [audit] log (a file in a temp dir)"
    )
    parser.add_argument(
        "--no-metrics", action="store_true", help="with `[metrics] enabled = false`"
    )
    args = parser.parse_args()
    per_request = uvloop.run(
        measure(args.count, args.profile, args.auth, args.limits, args.audit, not args.no_metrics)
    )
    print(
        f"{per_request:.1f} µs CPU per request (Python side, no I/O, auth {args.auth}, "
        f"limits {args.limits}, audit {'on' if args.audit else 'off'}, "
        f"metrics {'off' if args.no_metrics else 'on'})"
    )


if __name__ == "__main__":
    main()

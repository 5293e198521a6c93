"""HTTP-01 answers for `garrison acme ...` when no gateway is running.

When `garrison up` runs, it owns `http_listen` and answers from the shared ChallengeStore, so
the CLI only writes tokens there. When the port is free, the CLI binds it itself for the length
of the order, in a thread with its own event loop (the ACME client blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
from collections.abc import Iterator

from garrison.acme.challenges import ChallengeStore
from garrison.config import parse_hostport
from garrison.http.server import bind_socket, serve_redirect


@contextlib.contextmanager
def standalone_responder(http_listen: str, store: ChallengeStore) -> Iterator[bool]:
    """Serve HTTP-01 on `http_listen` while inside; yields False when the port is taken
    (by a running gateway, which answers from the same store)."""
    host, port = parse_hostport(http_listen)
    try:
        sock = bind_socket(host, port, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            yield False
            return
        raise
    loop = asyncio.new_event_loop()
    started = threading.Event()
    server: list[asyncio.AbstractServer] = []

    async def _start(listener: socket.socket) -> None:
        server.append(await serve_redirect(listener, lambda: 443, store))
        started.set()

    def _run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_start(sock))
        loop.run_forever()

    thread = threading.Thread(target=_run, name="acme-http01", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield True
    finally:

        async def _stop() -> None:
            for item in server:
                item.close()
                await item.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(_stop(), loop)
        thread.join(10)
        loop.close()
        sock.close()

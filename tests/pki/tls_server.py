"""A tiny real TLS echo server on 127.0.0.1 for handshake tests, plus client helpers."""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

# Only guards against a hung test; no assertion depends on how long anything takes.
WAIT = 30.0


class TLSEchoServer:
    """Accepts connections in a thread, handshakes with `ctx`, then echoes bytes back.

    The outcome of each handshake (a (version, cipher) pair or the server-side exception)
    is put on `outcomes`, so tests can check why the *server* refused a client.
    """

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.outcomes: queue.Queue[tuple[str | None, str | None] | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.outcomes.put(exc)
            conn.close()
            return
        cipher = tls.cipher()
        self.outcomes.put((tls.version(), cipher[0] if cipher else None))
        try:
            while data := tls.recv(4096):
                tls.sendall(data)
        except (ssl.SSLError, OSError):
            pass
        finally:
            tls.close()

    def next_outcome(self) -> tuple[str | None, str | None] | BaseException:
        """The next handshake's result, as seen by the server."""
        return self.outcomes.get(timeout=WAIT)

    def close(self) -> None:
        """Wake the accept() call and stop serving."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(WAIT)


def client_context(ca_file: Path, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client that trusts only `ca_file` (no system roots) and checks host names."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def connect(port: int, ctx: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
    """Open a TCP connection to the server and complete a TLS handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def echo(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send `payload` and read the same number of bytes back."""
    tls.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = tls.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return received


def openssl_bin() -> str | None:
    """Path of the `openssl` CLI, if installed."""
    return shutil.which("openssl")


def s_client(port: int, ca_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `openssl s_client -brief`; stdin is closed so it exits after the handshake."""
    openssl = openssl_bin()
    assert openssl is not None
    cmd = [
        openssl, "s_client", "-brief", "-connect", f"127.0.0.1:{port}",
        "-servername", "localhost", "-CAfile", str(ca_file), "-verify_return_error", *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT, check=False
    )

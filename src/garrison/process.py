"""Running `garrison up`: one process, or a supervisor with N workers sharing the ports.

With `--workers N` the supervisor binds each address once without listening (this fixes the
port, also when 0 was asked for), then forks N workers that each bind and listen on the same
port with SO_REUSEPORT, so the kernel spreads connections over them. The supervisor forwards
SIGHUP and SIGTERM, restarts a worker that dies, and exits 0 after a clean drain.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import uvloop

from garrison.config import Config, parse_hostport
from garrison.gateway import Gateway, UpOptions, bind_listeners
from garrison.http.server import bind_socket
from garrison.observe import multiproc

log = logging.getLogger("garrison")


def say(message: str) -> None:
    """A line for the operator on stdout (tests and scripts read these)."""
    print(f"garrison: {message}", flush=True)


def _format_address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (f"[{host}]" if ":" in host else host), port


def announce(https: socket.socket, redirect: socket.socket | None, config: Config) -> None:
    host, port = _format_address(https)
    say(f"listening on https://{host}:{port}")
    if redirect is not None:
        rhost, rport = _format_address(redirect)
        say(f"redirect listener on http://{rhost}:{rport}")
    suffix = "" if port == 443 else f":{port}"
    if config.tls.source == "acme":  # a publicly trusted certificate: browse by its name
        say(f"open https://{config.tls.acme.names[0]}{suffix}/ (certificate from ACME)")
    elif config.tls.source == "files":
        say(f"open https://<a name on your certificate>{suffix}/ (certificate from [tls.files])")
    else:
        shown = "localhost" if host in ("0.0.0.0", "[::]", "127.0.0.1", "[::1]") else host
        say(f"open https://{shown}:{port}/ in a browser or client that trusts the CA above")
    if config.admin.enabled:
        allowed = ", ".join(config.admin.allow) or "nowhere"
        say(f"admin UI at /.garrison/admin/ for users with role admin (clients in {allowed})")


def run_single(options: UpOptions, config: Config, data_dir: Path) -> int:
    https, redirect = bind_listeners(config, reuse_port=False)
    ready = partial(_announce_single, config)
    return uvloop.run(_serve(options, config, data_dir, https, redirect, ready))


def _announce_single(config: Config, https: socket.socket, redirect: socket.socket | None) -> None:
    announce(https, redirect, config)
    say("ready (1 worker)")


async def _serve(
    options: UpOptions,
    config: Config,
    data_dir: Path,
    https: socket.socket,
    redirect: socket.socket | None,
    on_ready: Callable[[socket.socket, socket.socket | None], None],
) -> int:
    gateway = Gateway(options, config, data_dir)
    await gateway.start(https, redirect)
    tune_gc()
    tune_allocator()
    on_ready(https, redirect)
    await gateway.wait_stopped()
    return 0


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep large body buffers on the heap (glibc only).

    uvloop hands each TLS read (up to 256 KiB) to us as a new bytes object. Above glibc's mmap
    threshold every such buffer is a fresh mmap whose pages all fault in and are unmapped
    again: measured 390,000 page faults and twice the CPU for a 1 GiB upload, depending on
    where glibc's self-adjusting threshold happened to be. A fixed threshold above the read
    size and a generous trim threshold make those buffers reusable heap memory.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc: nothing to tune
    mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)
    mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def tune_gc() -> None:
    """Fewer cyclic-GC passes on the hot path.

    Every request allocates dozens of short-lived objects that reference counting frees at
    once; with the default threshold (700) the collector still runs every few requests and
    walks the whole young generation. Startup objects are frozen out of collection entirely.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _reserve(address: str) -> socket.socket:
    """Bind without listening: fixes the port for the workers, takes no connections itself."""
    host, port = parse_hostport(address)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(addr)
    return sock


class Supervisor:
    """Forks and watches the workers."""

    def __init__(self, options: UpOptions, config: Config, data_dir: Path, workers: int) -> None:
        self.options = options
        self.config = config
        self.data_dir = data_dir
        self.count = workers
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.https_addr = ""
        self.redirect_addr: str | None = None
        self.metrics_dir = data_dir / "metrics"  # emptied by run() before the first fork

    def run(self) -> int:
        https = _reserve(self.config.server.listen)
        redirect = (
            _reserve(self.config.server.http_listen) if self.config.server.http_listen else None
        )
        host, port = _format_address(https)
        self.https_addr = f"{host.strip('[]')}:{port}" if ":" not in host else f"{host}:{port}"
        if redirect is not None:
            rhost, rport = _format_address(redirect)
            self.redirect_addr = f"{rhost}:{rport}"
        self.metrics_dir = multiproc.prepare(self.data_dir)
        read_fd, write_fd = os.pipe()
        signal.signal(signal.SIGHUP, self._reload)
        signal.signal(signal.SIGTERM, self._terminate)
        signal.signal(signal.SIGINT, self._terminate)
        for index in range(self.count):
            self._spawn(index, write_fd)
        ready = 0
        deadline = time.monotonic() + 60
        while ready < self.count and time.monotonic() < deadline and not self.stopping:
            # Never block on the pipe: we hold its write end, so a worker that dies before it
            # is ready would leave us waiting forever (deaf to SIGTERM too).
            if select.select([read_fd], [], [], 0.2)[0]:
                ready += os.read(read_fd, self.count - ready).count(b"R")
            self._replace_dead_starters(write_fd)
        failed = ready < self.count and not self.stopping
        if failed:
            log.error("workers did not start")
            self._terminate(signal.SIGTERM, None)
        elif not self.stopping:
            announce(https, redirect, self.config)
            say(f"ready ({self.count} workers)")
        code = self._watch(write_fd)
        os.close(read_fd)
        https.close()
        if redirect is not None:
            redirect.close()
        return 1 if failed else code

    def _replace_dead_starters(self, ready_fd: int) -> None:
        """During start-up: reap a worker that died before it was ready, and start another."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            multiproc.worker_gone(pid)
            if index is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.error("worker %d exited with %s before it was ready; restarting", index, code)
            self._spawn(index, ready_fd)

    def _spawn(self, index: int, ready_fd: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            # Ignored (not default: that kills) until the worker's loop installs its handler.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            code = 1
            try:
                code = self._worker(ready_fd)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = index
        if self.stopping:  # SIGTERM came while we forked: this one missed the forwarded signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _worker(self, ready_fd: int) -> int:
        multiproc.enable(self.metrics_dir)
        https = bind_socket(*parse_hostport(self.https_addr), reuse_port=True)
        redirect = None
        if self.redirect_addr is not None:
            redirect = bind_socket(*parse_hostport(self.redirect_addr), reuse_port=True)

        def ready(_https: socket.socket, _redirect: socket.socket | None) -> None:
            os.write(ready_fd, b"R")

        return uvloop.run(_serve(self.options, self.config, self.data_dir, https, redirect, ready))

    def _reload(self, signum: int, frame: object) -> None:
        """SIGHUP: workers reload; a worker restarted later starts with the new config too."""
        with contextlib.suppress(Exception):  # the workers log why; keep the last good config
            self.config = self.options.load_config()
        self._forward(signum, frame)

    def _forward(self, signum: int, _frame: object) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _terminate(self, signum: int, _frame: object) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM, None)

    def _watch(self, ready_fd: int) -> int:
        failures = 0
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            index = self.children.pop(pid, None)
            multiproc.worker_gone(pid)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            failures += 1
            log.error("worker %d exited with %s; restarting", index, code)
            time.sleep(min(5.0, 0.2 * failures))
            if self.stopping:  # SIGTERM during the back-off: do not start a worker nobody stops
                continue
            self._spawn(index, ready_fd)
        return 0


def run(options: UpOptions, config: Config, data_dir: Path) -> int:
    if options.workers <= 1:
        return run_single(options, config, data_dir)
    return Supervisor(options, config, data_dir, options.workers).run()


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("GARRISON_LOG_LEVEL", "INFO").upper(),
        format="garrison: %(levelname)s %(message)s",
        stream=sys.stderr,
    )

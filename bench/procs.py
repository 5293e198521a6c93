"""Processes the bench starts: start, wait until ready, measure (CPU, RSS), stop by PID."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """One started process, its output file and its whole process tree."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.ps = psutil.Process(popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants that are alive now."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole tree, in seconds."""
        total = 0.0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident memory of the whole tree, in bytes (shared pages counted once per process)."""
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def output(self) -> str:
        """What the process has written to stdout/stderr so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise with the process output if it has exited."""
        if self.popen.poll() is not None:
            tail = self.output()[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        """Wait until 127.0.0.1:port accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name}: port {port} not open after {timeout:.0f}s\n{self.output()}"
        )

    def wait_output(self, text: str, timeout: float = 60.0) -> None:
        """Wait until the process output contains text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            self.check_alive()
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name}: no {text!r} after {timeout:.0f}s\n{self.output()[-2000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the process by PID, wait, then kill it and its recorded descendants."""
        descendants = self.tree()[1:]
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running():
                    child.kill()


class Procs:
    """Every process this run starts, stopped in reverse order on exit (also on errors)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: list[tuple[Proc, int]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Proc:
        """Start argv with output to <logdir>/<name>.out."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.out"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.started.append((proc, stop_signal))
        return proc

    def stop(self, proc: Proc) -> None:
        """Stop one process now and forget it."""
        for index, (item, sig) in enumerate(self.started):
            if item is proc:
                del self.started[index]
                item.stop(sig)
                return

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        while self.started:
            proc, sig = self.started.pop()
            with contextlib.suppress(Exception):
                proc.stop(sig)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


class RssSampler:
    """Samples a process tree's RSS every ~50 ms in a thread and keeps the peak."""

    def __init__(self, proc: Proc | None, interval: float = 0.05) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.proc is not None:
                self.peak = max(self.peak, self.proc.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.nice + times.system


def _own_seconds() -> float:
    """CPU of this process, its live descendants and its waited-for children."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + finished.ru_utime + finished.ru_stime


class BackgroundMeter:
    """Machine-wide CPU used by processes that are not ours during a run, in cores.

    The machine is shared: a test suite running next to the bench would skew its numbers. Time in
    interrupts and softirqs (where loopback traffic is partly accounted) is left out on both sides.
    """

    def __init__(self) -> None:
        self.cores = 0.0
        self._start = (0.0, 0.0, 0.0)

    def __enter__(self) -> BackgroundMeter:
        self._start = (time.monotonic(), _busy_seconds(), _own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        t0, busy0, own0 = self._start
        elapsed = max(time.monotonic() - t0, 1e-6)
        other = (_busy_seconds() - busy0) - (_own_seconds() - own0)
        self.cores = max(other, 0.0) / elapsed

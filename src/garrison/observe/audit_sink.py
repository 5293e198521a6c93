"""Where audit lines go: a file (size rotation, fsync), stdout, or syslog.

Every sink takes whole lines only, as bytes, and never splits one. The file sink is shared by
several writers (the worker processes, each with its own descriptor, and `garrison` commands):
each batch of whole lines is written with one `write()` on an `O_APPEND` descriptor while the
writer holds an flock on `<path>.lock`. The lock costs two system calls per batch (batches are
200 ms apart, or one per decision with fsync = "always") and buys three things:
- no interleaving, even on file systems where O_APPEND writes are not atomic;
- repair of a line torn by `kill -9`: Linux may stop a `write()` between pages when a fatal
  signal arrives, leaving part of a line. Under the lock nobody is mid-write, so a file that
  does not end in a newline was cut by a dead writer; the next writer truncates the fragment
  (a line not wholly written was never acknowledged) before appending. After a kill, at most
  the last line of a file is partial, and only until the next write;
- rotation by size without losing a line: under the lock, a writer first checks that the path
  is still the file it holds (else another writer rotated: reopen), writes, and when the file
  is past `max_size` renames `path.N-1` to `path.N` ... `path` to `path.1`, creates a new `path`
  and fsyncs the directory. Files shifted past `keep` are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path

from garrison.fsutil import _fsync_dir

log = logging.getLogger("garrison.audit")


class Sink:
    """A destination for whole JSON lines."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make what was written durable (a no-op where the sink cannot)."""

    def reopen(self) -> None:
        """SIGHUP: pick up a file moved away by an external tool."""

    def close(self) -> None:
        """Release the descriptor or socket."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FileSink(Sink):
    """Appends to `path` (0600, in a private directory), rotating at `max_size`."""

    def __init__(self, path: Path, max_size: int, keep: int) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.keep = keep
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one: as is
        lock = self.path.with_name(self.path.name + ".lock")
        self._lock = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = -1
        self._ino = 0
        try:
            self._open()
        except OSError:
            os.close(self._lock)
            raise

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        old, self._fd = self._fd, fd
        self._ino = os.fstat(fd).st_ino
        if old >= 0:
            os.close(old)

    def write(self, data: bytes) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            size = self._current_size()
            if size:
                size = self._cut_torn_tail(size)
            _write_all(self._fd, data)
            if self.max_size and size + len(data) >= self.max_size:
                self._rotate()
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _current_size(self) -> int:
        """The size of the file at `path`, reopened first if another writer rotated it."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return 0
        if st.st_ino != self._ino:
            self._open()
            return os.fstat(self._fd).st_size
        return st.st_size

    def _cut_torn_tail(self, size: int) -> int:
        """Drop a partial last line (its writer died inside write()); the new size."""
        if os.pread(self._fd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(self._fd, end - start, start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        os.ftruncate(self._fd, end)
        log.warning(
            "audit: removed a partial line at the end of %s (a writer was killed)", self.path
        )
        return end

    def _rotate(self) -> None:
        os.fsync(self._fd)
        top = 1  # the first free number (rotated files are numbered without gaps), or keep
        while top < self.keep and self._rotated(top).exists():
            top += 1
        for index in range(top - 1, 0, -1):  # path.keep, if there, is overwritten: dropped
            os.replace(self._rotated(index), self._rotated(index + 1))
        os.replace(self.path, self._rotated(1))
        self._open()
        _fsync_dir(self.path.parent)

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def sync(self) -> None:
        os.fsync(self._fd)

    def reopen(self) -> None:
        self._open()

    def close(self) -> None:
        for fd in (self._fd, self._lock):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock = -1


class StdoutSink(Sink):
    """Standard output, one write per batch (a collector reads the container's stdout)."""

    def write(self, data: bytes) -> None:
        _write_all(1, data)


class SyslogSink(Sink):
    """A local syslog socket (RFC 3164 framing, facility authpriv), one datagram per line."""

    PRIORITY = 10 * 8 + 6  # authpriv.info: readable by root only on most systems

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._prefix = b"<%d>garrison-audit[%d]: " % (self.PRIORITY, os.getpid())
        self._warned = False

    def write(self, data: bytes) -> None:
        for line in data.splitlines():
            try:
                self._sock.sendto(self._prefix + line, self.address)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.error("audit: syslog socket %s refused a line: %s", self.address, exc)

    def close(self) -> None:
        self._sock.close()

"""Safe file-system primitives for secrets: private directories, atomic writes, process locks.

Secrets (CA key, server key, session secrets) must never be observable half-written or with
a loose mode, even for an instant, and several worker processes may start at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path
from types import TracebackType


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and force mode 0700, tightening a pre-existing looser dir.

    Only the leaf is forced: parents may be shared (e.g. /var/lib) and are not ours to change.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (path.stat().st_mode & 0o777) != 0o700:
        os.chmod(path, 0o700)
    return path


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without fsyncing the directory, a crash can lose the new entry."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a mix.

    The temp file is created with `mode` by os.open (O_EXCL), so the secret is never readable
    by others even before the first byte lands; fchmod undoes the umask.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


class FileLock:
    """Exclusive advisory lock (fcntl.flock) on a lock file, blocking until acquired.

    Used for create-once sections (CA, server cert) when several workers start together.
    The lock is released when the file descriptor closes, so a crashed holder never
    leaves a stale lock behind. Not reentrant within a process.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Open (creating 0600) and flock the lock file; blocks while another holder has it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Unlock and close; the lock file stays (deleting it would race with waiters)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def locked(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

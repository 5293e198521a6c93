"""fsutil: private dirs, atomic writes with the right mode from the start, cross-process locks."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import stat
from pathlib import Path

import pytest

from garrison.fsutil import FileLock, atomic_write, ensure_private_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ensure_private_dir_creates_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert ensure_private_dir(target) == target
    assert target.is_dir()
    assert _mode(target) == 0o700


def test_ensure_private_dir_tightens_existing_dir(tmp_path: Path) -> None:
    target = tmp_path / "loose"
    target.mkdir()
    os.chmod(target, 0o755)
    ensure_private_dir(target)
    assert _mode(target) == 0o700


def test_atomic_write_creates_with_mode_despite_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "secret", b"s3cret")
        atomic_write(tmp_path / "public", b"hello", mode=0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "secret").read_bytes() == b"s3cret"
    assert _mode(tmp_path / "secret") == 0o600
    assert _mode(tmp_path / "public") == 0o644


def test_atomic_write_mode_not_weakened_by_restrictive_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "cert", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "cert") == 0o644


def test_atomic_write_replaces_and_tightens_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old contents")
    os.chmod(target, 0o666)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temp file left over


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_atomic_write_large_payload_complete(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def _try_lock(path: Path) -> bool:
    """Try to take the lock through a separate open file description, without blocking."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_file_lock_excludes_others_and_releases(tmp_path: Path) -> None:
    lock_path = tmp_path / "x.lock"
    with FileLock(lock_path) as lock:
        assert lock.locked
        assert _mode(lock_path) == 0o600
        assert not _try_lock(lock_path)
    assert not lock.locked
    assert _try_lock(lock_path)


def test_file_lock_not_reentrant_on_same_object(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "x.lock")
    with lock, pytest.raises(RuntimeError):
        lock.acquire()


def _increment(lock_path: str, counter_path: str, rounds: int) -> None:
    counter = Path(counter_path)
    for _ in range(rounds):
        with FileLock(Path(lock_path)):
            value = int(counter.read_text())
            os.sched_yield()
            counter.write_text(str(value + 1))


def test_file_lock_serialises_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_increment, args=(str(tmp_path / "c.lock"), str(counter), 200))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert counter.read_text() == "800"

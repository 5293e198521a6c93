"""`garrison user ...` end to end: the real CLI as a subprocess on a real SQLite file."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

from garrison.auth.users import Users
from garrison.store.db import default_url, open_store

T0 = 1_800_000_000.0


def garrison(
    data_dir: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison", "user", *args, "--data-dir", str(data_dir)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def authenticate(data_dir: Path, name: str, password: str) -> bool:
    engine = open_store(default_url(data_dir))
    try:
        return Users(engine).authenticate(name, password, T0) is not None
    finally:
        engine.dispose()


def list_rows(data_dir: Path) -> dict[str, list[str]]:
    result = garrison(data_dir, "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLES", "EMAIL", "STATUS"]
    return {line.split()[0]: line.split(None, 3) for line in lines[1:]}


def test_add_with_stdin_list_and_duplicate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = garrison(
        data,
        "add",
        "alice",
        "--role",
        "admin",
        "--role",
        "ops",
        "--email",
        "alice@example.test",
        "--password-stdin",
        stdin="typed secret\n",
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout == ""
    assert "typed secret" not in added.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "garrison.db").stat().st_mode) == 0o600

    assert list_rows(data)["alice"] == ["alice", "admin,ops", "alice@example.test", "active"]
    assert authenticate(data, "alice", "typed secret")
    assert not authenticate(data, "alice", "typed secret\n")

    again = garrison(data, "add", "alice", "--password-stdin", stdin="other\n")
    assert again.returncode == 1
    assert "user 'alice' already exists" in again.stderr
    assert "other" not in again.stdout + again.stderr
    assert authenticate(data, "alice", "typed secret")


def test_generated_password_is_printed_once_and_works(tmp_path: Path) -> None:
    added = garrison(tmp_path, "add", "bob")
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert len(lines) == 1
    password = lines[0]
    assert len(password) == 24
    assert password not in added.stderr
    assert authenticate(tmp_path, "bob", password)
    assert not authenticate(tmp_path, "bob", password[:-1])
    listing = garrison(tmp_path, "list")
    assert password not in listing.stdout + listing.stderr
    assert list_rows(tmp_path)["bob"] == ["bob", "-", "-", "active"]


def test_passwd_generated_and_from_stdin(tmp_path: Path) -> None:
    assert garrison(tmp_path, "add", "carol", "--password-stdin", stdin="first\n").returncode == 0

    changed = garrison(tmp_path, "passwd", "carol")
    assert changed.returncode == 0, changed.stderr
    (generated,) = changed.stdout.splitlines()
    assert not authenticate(tmp_path, "carol", "first")
    assert authenticate(tmp_path, "carol", generated)

    typed = garrison(tmp_path, "passwd", "carol", "--password-stdin", stdin="second\n")
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout == ""
    assert authenticate(tmp_path, "carol", "second")
    assert not authenticate(tmp_path, "carol", generated)

    missing = garrison(tmp_path, "passwd", "ghost")
    assert missing.returncode == 1
    assert "no such user 'ghost'" in missing.stderr
    assert missing.stdout == ""


def test_empty_stdin_password_is_refused(tmp_path: Path) -> None:
    result = garrison(tmp_path, "add", "dave", "--password-stdin", stdin="\n")
    assert result.returncode == 1
    assert "password must not be empty" in result.stderr
    assert "dave" not in list_rows(tmp_path)


def test_bad_name_is_refused(tmp_path: Path) -> None:
    result = garrison(tmp_path, "add", "no spaces", "--password-stdin", stdin="pw\n")
    assert result.returncode == 1
    assert "invalid user name" in result.stderr


def test_roles_set_and_clear(tmp_path: Path) -> None:
    assert garrison(tmp_path, "add", "erin", "--password-stdin", stdin="pw\n").returncode == 0

    result = garrison(tmp_path, "roles", "erin", "--set", "viewer", "--set", "chat")
    assert result.returncode == 0, result.stderr
    assert list_rows(tmp_path)["erin"][1] == "viewer,chat"

    neither = garrison(tmp_path, "roles", "erin")
    assert neither.returncode == 1
    assert "--clear" in neither.stderr
    both = garrison(tmp_path, "roles", "erin", "--set", "x", "--clear")
    assert both.returncode == 1
    empty = garrison(tmp_path, "roles", "erin", "--set", "")
    assert empty.returncode == 1
    assert "invalid role" in empty.stderr
    assert list_rows(tmp_path)["erin"][1] == "viewer,chat"

    cleared = garrison(tmp_path, "roles", "erin", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert list_rows(tmp_path)["erin"][1] == "-"

    ghost = garrison(tmp_path, "roles", "ghost", "--set", "x")
    assert ghost.returncode == 1
    assert "no such user 'ghost'" in ghost.stderr


def test_disable_enable_and_lockout_show_in_list(tmp_path: Path) -> None:
    for name in ("frank", "grace"):
        assert garrison(tmp_path, "add", name, "--password-stdin", stdin="pw\n").returncode == 0

    assert garrison(tmp_path, "disable", "frank").returncode == 0
    assert list_rows(tmp_path)["frank"][3] == "disabled"
    assert not authenticate(tmp_path, "frank", "pw")
    assert garrison(tmp_path, "enable", "frank").returncode == 0
    assert list_rows(tmp_path)["frank"][3] == "active"

    # Fail grace's logins from the real clock on, each attempt once the last lock is over,
    # so the final (capped) lock is still running when `list` looks.
    engine = open_store(default_url(tmp_path))
    try:
        accounts = Users(engine)
        now = time.time()
        for _ in range(15):
            attempt = now
            assert accounts.authenticate("grace", "wrong", attempt) is None
            now = accounts.get("grace").locked_until or now
        state = accounts.get("grace")
    finally:
        engine.dispose()
    assert state.failed_logins == 15
    locked_until = state.locked_until
    assert locked_until is not None
    assert locked_until - attempt == 900
    status = list_rows(tmp_path)["grace"][3]
    assert status.startswith("locked until ")
    assert status.endswith(" UTC")
    assert time.strftime("%H:%M:%S", time.gmtime(locked_until)) in status

    ghost = garrison(tmp_path, "disable", "ghost")
    assert ghost.returncode == 1
    assert "no such user 'ghost'" in ghost.stderr

    for suffix in ("", "-wal", "-shm"):
        path = tmp_path / f"garrison.db{suffix}"
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

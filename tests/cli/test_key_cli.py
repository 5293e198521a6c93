"""`garrison key ...` end to end, as an operator runs it: a real subprocess and a real store.

The contract that scripts rely on: create and rotate print the key alone on stdout, one line;
nothing else ever prints a secret; refusals go to stderr with exit status 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from garrison.auth.apikeys import ApiKeys
from garrison.store.db import default_url, open_store

KEY_LINE = re.compile(r"^gk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}$")


def garrison(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison", "key", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _create(data_dir: Path, *args: str) -> str:
    result = garrison(data_dir, "create", *args)
    assert result.returncode == 0, result.stderr
    assert KEY_LINE.match(result.stdout.rstrip("\n")), result.stdout
    assert result.stdout.count("\n") == 1
    return result.stdout.strip()


def _verify(data_dir: Path, full_key: str) -> bool:
    engine = open_store(default_url(data_dir))
    try:
        return ApiKeys(engine).verify(full_key) is not None
    finally:
        engine.dispose()


def test_create_list_revoke(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # does not exist yet: the command creates it, private
    full = _create(
        data_dir, "ci-bot", "--scope", "chat", "--scope", "models:read", "--expires", "30d"
    )
    key_id, secret = full[3:15], full[16:]
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    assert _verify(data_dir, full)

    listed = garrison(data_dir, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "OWNER", "SCOPES", "EXPIRES", "STATUS", "LAST", "USED"]
    assert row.split()[:4] == [key_id, "ci-bot", "-", "chat,models:read"]
    assert "active" in row.split()
    assert secret not in listed.stdout + listed.stderr

    revoked = garrison(data_dir, "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert not _verify(data_dir, full)
    assert garrison(data_dir, "revoke", key_id).returncode == 0  # idempotent
    assert "revoked" in garrison(data_dir, "list").stdout.splitlines()[1].split()


def test_create_prints_details_on_stderr_only(tmp_path: Path) -> None:
    result = garrison(tmp_path, "create", "svc", "--scope", "chat", "--owner", "alice")
    assert result.returncode == 0, result.stderr
    key_id = result.stdout.strip()[3:15]
    assert key_id in result.stderr
    assert "alice" in result.stderr
    assert result.stdout.strip() not in result.stderr
    assert "alice" in garrison(tmp_path, "list").stdout


def test_rotate_without_and_with_grace(tmp_path: Path) -> None:
    first = _create(tmp_path, "svc", "--scope", "chat")
    key_id = first[3:15]

    rotated = garrison(tmp_path, "rotate", key_id)
    assert rotated.returncode == 0, rotated.stderr
    second = rotated.stdout.strip()
    assert KEY_LINE.match(second) and rotated.stdout.count("\n") == 1
    assert second[3:15] == key_id and second != first
    assert not _verify(tmp_path, first)  # default grace is 0
    assert _verify(tmp_path, second)

    graced = garrison(tmp_path, "rotate", key_id, "--grace", "1h")
    assert graced.returncode == 0, graced.stderr
    third = graced.stdout.strip()
    assert _verify(tmp_path, second)  # still inside its hour of grace
    assert _verify(tmp_path, third)


def test_refusals_exit_1_with_a_message(tmp_path: Path) -> None:
    cases = [
        (("revoke", "nosuchkey0000"), "no API key"),
        (("rotate", "nosuchkey0000"), "no API key"),
        (("create", "x", "--scope", "Not Valid"), "invalid scope"),
        (("create", "x", "--scope", "chat", "--expires", "soon"), "--expires"),
        (("create", "x", "--scope", "chat", "--expires", "0"), "expiry"),
    ]
    for args, message in cases:
        result = garrison(tmp_path, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    listed = garrison(tmp_path, "list")
    assert listed.returncode == 0
    assert listed.stdout == ""  # none of the refused creates stored a key
    assert "no API keys" in listed.stderr


def test_rotate_refuses_a_revoked_key(tmp_path: Path) -> None:
    key_id = _create(tmp_path, "svc", "--scope", "chat")[3:15]
    assert garrison(tmp_path, "revoke", key_id).returncode == 0
    result = garrison(tmp_path, "rotate", key_id)
    assert result.returncode == 1
    assert "revoked" in result.stderr
    assert result.stdout == ""


def test_limits_set_replace_and_clear(tmp_path: Path) -> None:
    key_id = _create(tmp_path, "svc", "--scope", "chat", "--rate", "5/minute")[3:15]

    def stored() -> tuple[tuple[str, ...] | None, str | None]:
        engine = open_store(default_url(tmp_path))
        try:
            record = ApiKeys(engine).get(key_id)
        finally:
            engine.dispose()
        return record.rate, record.tokens

    assert stored() == (("5/minute",), None)
    done = garrison(tmp_path, "limits", key_id, "--rate", "60/minute", "--rate", "1000/day",
                    "--tokens", "100000/day")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "60/minute, 1000/day, tokens 100000/day" in done.stdout
    assert stored() == (("60/minute", "1000/day"), "100000/day")
    cleared = garrison(tmp_path, "limits", key_id, "--clear")
    assert cleared.returncode == 0 and "those of its routes" in cleared.stdout
    assert stored() == (None, None)
    audit = (tmp_path / "audit.log").read_text()
    assert audit.count('"event":"key_limits_changed"') == 2
    for args, message in [
        ((key_id,), "or --clear"),
        ((key_id, "--clear", "--rate", "1/second"), "or --clear"),
        ((key_id, "--rate", "1e999/day"), "whole number"),
        ((key_id, "--tokens", "lots"), "invalid token budget"),
        (("nosuchkey0000", "--rate", "1/second"), "no API key"),
    ]:
        refused = garrison(tmp_path, "limits", *args)
        assert refused.returncode == 1 and message in refused.stderr, (args, refused.stderr)
    assert stored() == (None, None)  # nothing refused was stored

"""`garrison acme issue|renew|status|revoke` as an operator runs them (real subprocesses,
real Pebble): exit codes, what is printed, and what is (not) stored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.pebble import Pebble

NAMES = ["chat.example.com", "api.example.com"]


def _config(tmp_path: Path, pebble: Pebble, source: str = "acme") -> Path:
    path = tmp_path / "garrison.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:{pebble.http_port}"

[tls]
source = "{source}"
[tls.acme]
directory = "{pebble.directory}"
email = "ops@example.com"
names = {NAMES!r}
ca_bundle = "{pebble.listener_ca}"
retry_min = "1s"

[[upstream]]
name = "app"
url = "http://127.0.0.1:9"

[[route]]
path = "/"
upstream = "app"
"""
    )
    return path


def acme(config: Path | None, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "garrison", "acme", *args, "--data-dir", str(data)]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_dry_run_then_issue_status_revoke_renew(tmp_path: Path, pebble: Pebble) -> None:
    config, data = _config(tmp_path, pebble), tmp_path / "data"
    dry = acme(config, data, "issue", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run OK" in dry.stdout and "(not stored)" in dry.stdout
    assert not (data / "acme" / "live" / "fullchain.pem").exists()
    assert not (data / "acme" / "accounts").exists()

    issued = acme(config, data, "issue")
    assert issued.returncode == 0, issued.stderr
    assert "certificate for chat.example.com, api.example.com stored" in issued.stdout
    again = acme(config, data, "issue")
    assert again.returncode == 0 and "the current certificate is valid" in again.stdout

    status = acme(config, data, "status")
    assert status.returncode == 0, status.stderr
    assert "covers:       api.example.com, chat.example.com" in status.stdout
    assert "usable:       yes" in status.stdout and "last error:   -" in status.stdout

    revoked = acme(config, data, "revoke")
    assert revoked.returncode == 0, revoked.stderr
    status = acme(config, data, "status")
    assert "usable:       no (revoked)" in status.stdout
    # A revoked certificate is due at once: a plain renew (no --force) replaces it.
    renewed = acme(config, data, "renew")
    assert renewed.returncode == 0, renewed.stderr
    assert "stored" in renewed.stdout
    assert "usable:       yes" in acme(config, data, "status").stdout


def test_ca_down_is_a_clear_error(tmp_path: Path, pebble: Pebble) -> None:
    config, data = _config(tmp_path, pebble), tmp_path / "data"
    pebble.stop()
    result = acme(config, data, "renew", "--force")
    assert result.returncode == 1
    assert "ACME renewal failed: cannot read the ACME directory" in result.stderr
    assert "connection failed" in result.stderr and "Traceback" not in result.stderr
    status = acme(config, data, "status")
    assert "certificate:  none yet" in status.stdout
    assert "failures:     1 in a row" in status.stdout


def test_bad_invocations_are_refused_clearly(tmp_path: Path, pebble: Pebble) -> None:
    data = tmp_path / "data"
    missing = acme(None, data, "status")
    assert missing.returncode == 2 and "--config FILE is required" in missing.stderr
    internal = acme(_config(tmp_path, pebble, source="internal"), data, "issue")
    assert internal.returncode == 1 and 'source is not "acme"' in internal.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text('[tls]\nsource = "acme"\n[tls.acme]\nnames = ["*.example.com"]\n')
    result = acme(broken, data, "issue")
    assert result.returncode == 1
    assert "wildcards need DNS-01" in result.stderr and "Traceback" not in result.stderr
    nothing = acme(_config(tmp_path, pebble), data, "revoke")
    assert nothing.returncode == 1 and "no ACME certificate to revoke" in nothing.stderr


def test_unusable_data_dir_is_named_not_a_traceback(tmp_path: Path, pebble: Pebble) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = acme(_config(tmp_path, pebble), blocker / "data", "renew", "--force")
    assert result.returncode == 1
    assert f"cannot use {blocker / 'data'}" in result.stderr, result.stderr
    assert "Not a directory" in result.stderr and "Traceback" not in result.stderr

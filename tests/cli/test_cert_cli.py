"""`garrison cert ...` and `garrison ca crl` end to end: real subprocesses, store and openssl."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

PASSWORD = "correct horse battery"


def garrison(
    data_dir: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def _serial(stdout: str) -> str:
    return stdout.split("serial=", 1)[1].split()[0]


def test_issue_writes_private_files_that_openssl_accepts(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["--email", "alice@example.com", "--role", "admin", "--role", "ops", "--days", "30"]
    stdout = ok(garrison(data, "cert", "issue", "alice", *args, "--out", str(out)))
    assert "serial=" in stdout
    crt, key = out / "alice.crt", out / "alice.key"
    assert (key.stat().st_mode & 0o777) == 0o600
    assert not (out / "alice.p12").exists()
    ca_file = data / "ca" / "ca.crt"
    verified = openssl("verify", "-CAfile", str(ca_file), "-purpose", "sslclient", str(crt))
    assert verified.returncode == 0, verified.stderr
    assert openssl("verify", "-CAfile", str(ca_file), "-purpose", "sslserver", str(crt)).returncode
    text = openssl("x509", "-noout", "-text", "-in", str(crt)).stdout
    assert "TLS Web Client Authentication" in text and "Server Authentication" not in text
    assert "email:alice@example.com" in text
    assert "OU = admin" in text and "OU = ops" in text
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    key_obj = serialization.load_pem_private_key(key.read_bytes(), None)
    assert key_obj.public_key() == cert.public_key()

    refused = garrison(data, "cert", "issue", "alice", "--out", str(out))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert ok(garrison(data, "cert", "list")).count("alice") == 1  # the refusal stored nothing
    ok(garrison(data, "cert", "issue", "alice", "--out", str(out), "--force"))
    assert ok(garrison(data, "cert", "list")).count("alice") == 2


def test_default_out_is_cwd_and_p12(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    ok(garrison(data, "cert", "issue", "bob", "--p12-password-file", str(pw), cwd=tmp_path))
    p12 = tmp_path / "bob.p12"
    assert (p12.stat().st_mode & 0o777) == 0o600 and (tmp_path / "bob.key").exists()
    info = openssl("pkcs12", "-info", "-noout", "-in", str(p12), "-passin", f"pass:{PASSWORD}")
    assert info.returncode == 0, info.stderr
    assert "AES-256-CBC" in info.stdout + info.stderr
    key, cert, cas = pkcs12.load_key_and_certificates(p12.read_bytes(), PASSWORD.encode())
    assert key is not None and cert is not None and len(cas) == 1

    only = tmp_path / "only"
    ok(garrison(data, "cert", "issue", "carol", "--out", str(only),
                "--p12-password-file", str(pw), "--p12-only"))  # fmt: skip
    assert sorted(p.name for p in only.iterdir()) == ["carol.crt", "carol.p12"]
    refused = garrison(data, "cert", "issue", "dave", "--out", str(only), "--p12-only")
    assert refused.returncode == 1 and "--p12-password-file" in refused.stderr


def test_refusals(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    for args, message in [
        (("cert", "issue", "bad name", "--out", str(out)), "invalid name"),
        (("cert", "issue", "x", "--days", "5000", "--out", str(out)), "outlive the CA"),
        (("cert", "issue", "x", "--role", "no spaces", "--out", str(out)), "invalid role"),
        (("cert", "revoke", "nobody"), "no client certificate"),
        (("cert", "renew", "nobody", "--out", str(out)), "no client certificate"),
        (("cert", "list", "--expiring", "soon"), "--expiring"),
    ]:
        result = garrison(data, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not list(out.glob("*.crt")) if out.exists() else True
    assert "no client certificates" in garrison(data, "cert", "list").stderr


def test_revoke_renew_list_and_crl(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    alice = _serial(ok(garrison(data, "cert", "issue", "alice", "--out", str(out))))
    bob = _serial(ok(garrison(data, "cert", "issue", "bob", "--out", str(out / "b"))))
    bob2 = _serial(ok(garrison(data, "cert", "issue", "bob", "--out", str(out / "b2"))))
    short = _serial(ok(garrison(data, "cert", "issue", "shorty", "--days", "7", "--out", str(out))))

    expiring = ok(garrison(data, "cert", "list", "--expiring", "30d")).splitlines()
    assert expiring[0].split() == ["NAME", "SERIAL", "EXPIRES", "STATUS", "ROLES"]
    assert [line.split()[1] for line in expiring[1:]] == [short]

    revoked = ok(garrison(data, "cert", "revoke", "bob", "--reason", "keyCompromise"))
    assert bob in revoked and bob2 in revoked
    by_serial = ok(garrison(data, "cert", "revoke", short.upper(), "--reason", "superseded"))
    assert short in by_serial

    renewed = ok(garrison(data, "cert", "renew", "alice", "--grace", "1d", "--out", str(out)))
    alice2 = _serial(renewed)
    assert alice2 != alice and "works until" in renewed
    rows = {
        line.split()[1]: line.split()[5]  # EXPIRES is three words
        for line in ok(garrison(data, "cert", "list")).splitlines()[1:]
    }
    assert rows[alice] == "pending-revocation" and rows[alice2] == "active"
    assert rows[bob] == rows[bob2] == rows[short] == "revoked"
    new_cert = x509.load_pem_x509_certificate((out / "alice.crt").read_bytes())
    assert format(new_cert.serial_number, "x") == alice2

    crl_file = tmp_path / "crl.pem"
    ok(garrison(data, "ca", "crl", "--out", str(crl_file)))
    ca_file = data / "ca" / "ca.crt"
    checked = openssl("crl", "-in", str(crl_file), "-CAfile", str(ca_file), "-noout")
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr
    text = openssl("crl", "-in", str(crl_file), "-noout", "-text").stdout
    for serial in (bob, bob2, short):
        assert serial.upper().rjust(40, "0") in text
    assert alice.upper().rjust(40, "0") not in text  # still inside its grace
    assert "Key Compromise" in text and "Superseded" in text
    assert ok(garrison(data, "ca", "crl")).startswith("-----BEGIN X509 CRL-----")


def test_ca_init_with_passphrase_file_and_show(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = tmp_path / "ca-pass"
    secret.write_text("a long CA passphrase\n")
    ok(garrison(data, "ca", "init", "--passphrase-file", str(secret)))
    assert b"ENCRYPTED" in (data / "ca" / "ca.key").read_bytes()
    locked = garrison(data, "ca", "show")
    assert locked.returncode == 1 and "encrypted" in locked.stderr
    shown = ok(garrison(data, "ca", "show", "--passphrase-file", str(secret)))
    assert "subject:" in shown and "fingerprint: SHA256 " in shown and "expires:" in shown
    env = {**os.environ, "GARRISON_CA_PASSPHRASE_FILE": str(secret)}
    issued = subprocess.run(
        [sys.executable, "-m", "garrison", "cert", "issue", "eve", "--out", str(tmp_path / "o"),
         "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr


def _complete(path: Path) -> None:
    """Each file the CLI left must parse completely."""
    data = path.read_bytes()
    if path.suffix == ".crt":
        x509.load_pem_x509_certificate(data)
    elif path.suffix == ".key":
        serialization.load_pem_private_key(data, None)
    else:
        pkcs12.load_key_and_certificates(data, PASSWORD.encode())


def test_kill_9_never_leaves_half_written_files(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    ok(garrison(data, "ca", "init"))
    rng = random.Random()
    for attempt in range(10):
        process = subprocess.Popen(
            [sys.executable, "-m", "garrison", "cert", "issue", f"u{attempt}", "--out", str(out),
             "--p12-password-file", str(pw), "--data-dir", str(data)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.05, 1.5))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        if out.exists():
            for path in out.iterdir():
                if path.suffix in {".crt", ".key", ".p12"}:
                    _complete(path)
    listed = garrison(data, "cert", "list")
    assert listed.returncode == 0, listed.stderr
    # Every certificate file on disk is one the store knows (rows may outnumber files).
    known = {line.split()[1] for line in listed.stdout.splitlines()[1:]}
    for crt in out.glob("*.crt") if out.exists() else []:
        serial = x509.load_pem_x509_certificate(crt.read_bytes()).serial_number
        assert format(serial, "x") in known

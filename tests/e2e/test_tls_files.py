"""[tls] source = "files": your own chain and key, served, and reloaded when the files change
(an external ACME client or a secrets manager rotates them) without a restart."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.fixtures_core import config, running_gateway
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
NAME = "files.example.test"


def _self_signed(folder: Path, serial: int) -> tuple[Path, Path]:
    """A self-signed pair for NAME, written by rename (as a rotating tool would)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"files test {serial}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    for path, data in (
        (key_path, key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )),
        (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
    ):  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return cert_path, key_path


def _served_serial(port: int, *trusted: Path) -> int:
    ctx = ssl.create_default_context(cadata="".join(p.read_text() for p in trusted))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_files_are_served_and_reloaded_on_change(tmp_path: Path, upstream: FakeUpstream) -> None:
    folder = tmp_path / "certs"
    folder.mkdir()
    cert_path, key_path = _self_signed(folder, 1001)
    first_ca = tmp_path / "first.pem"
    first_ca.write_bytes(cert_path.read_bytes())
    text = config(
        upstream.url,
        upstreams=(
            f'[tls]\nsource = "files"\n[tls.files]\ncert = "{cert_path}"\nkey = "{key_path}"\n'
        ),
    )
    with running_gateway(tmp_path, text) as gw:
        assert _served_serial(gw.port, first_ca) == 1001
        _self_signed(folder, 2002)
        deadline = time.monotonic() + 30
        serial = 1001
        while serial == 1001 and time.monotonic() < deadline:
            time.sleep(0.2)
            serial = _served_serial(gw.port, first_ca, cert_path)
        assert serial == 2002
        (folder / "second.pem").write_bytes(cert_path.read_bytes())
        # A broken replacement is refused (once, not at every look); the last good pair
        # keeps serving, and the next good pair is picked up.
        cert_path.write_text("not a certificate")
        gw.wait_for_line(r"new server certificate refused, the current one keeps serving")
        assert _served_serial(gw.port, folder / "second.pem") == 2002
        _self_signed(folder, 3003)
        deadline = time.monotonic() + 30
        while serial != 3003 and time.monotonic() < deadline:
            time.sleep(0.2)
            serial = _served_serial(gw.port, folder / "second.pem", cert_path)
        assert serial == 3003
        assert gw.output().count("new server certificate refused") == 1
        assert gw.proc.poll() is None


def test_unusable_files_stop_up_with_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[tls]\nsource = "files"\n'
        f'[tls.files]\ncert = "{tmp_path / "missing.crt"}"\nkey = "{tmp_path / "missing.key"}"\n'
        '[[upstream]]\nname = "a"\nurl = "http://127.0.0.1:9"\n[[route]]\nupstream = "a"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "garrison", "up", "--config", str(cfg), "--data-dir",
         str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "GARRISON_ADMIN_PASSWORD": "test-admin-password-0123456789"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "[tls.files]: cannot read TLS certificate" in result.stderr
    assert "Traceback" not in result.stderr

"""The private CA: created once (even under concurrency), stored safely, reloaded identically."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from garrison.pki.ca import CAError, CertificateAuthority
from tests.support.tools import missing


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_then_reloaded(data_dir: Path) -> None:
    first = CertificateAuthority.load_or_create(data_dir)
    key_bytes = first.key_path.read_bytes()
    second = CertificateAuthority.load_or_create(data_dir)
    assert second.fingerprint_sha256() == first.fingerprint_sha256()
    assert second.cert == first.cert
    assert second.key_path.read_bytes() == key_bytes
    assert first.cert_path == data_dir / "ca" / "ca.crt"
    assert second.cert_pem() == first.cert_path.read_bytes()


def test_root_certificate_profile(ca: CertificateAuthority) -> None:
    cert = ca.cert
    assert re.fullmatch(
        r"CN=Garrison Local CA [0-9a-f]{8},O=Garrison", cert.subject.rfc4514_string()
    )
    assert cert.issuer == cert.subject
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp384r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature and not ku.value.key_encipherment
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(key)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=3650, minutes=5)
    cert.verify_directly_issued_by(cert)  # self-signed, signature valid
    assert 0 < cert.serial_number < 2**159


def test_two_data_dirs_get_distinct_cas(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path / "a")
    b = CertificateAuthority.load_or_create(tmp_path / "b")
    assert a.fingerprint_sha256() != b.fingerprint_sha256()
    assert a.cert.subject != b.cert.subject  # random id tells them apart in trust stores


def test_file_modes(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "ca") == 0o700
    assert _mode(ca.key_path) == 0o600
    assert b"PRIVATE KEY" in ca.key_path.read_bytes()


def test_loose_existing_ca_dir_is_tightened(data_dir: Path) -> None:
    (data_dir / "ca").mkdir(parents=True)
    (data_dir / "ca").chmod(0o755)
    CertificateAuthority.load_or_create(data_dir)
    assert _mode(data_dir / "ca") == 0o700


def test_loose_key_mode_is_tightened_on_load(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    ca.key_path.chmod(0o644)
    CertificateAuthority.load_or_create(data_dir)
    assert _mode(ca.key_path) == 0o600


def test_encrypted_key_needs_passphrase(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir, passphrase=b"correct horse")
    assert ca.key_path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(CAError, match="encrypted"):
        CertificateAuthority.load_or_create(data_dir)
    with pytest.raises(CAError, match="wrong passphrase"):
        CertificateAuthority.load_or_create(data_dir, passphrase=b"battery staple")
    again = CertificateAuthority.load_or_create(data_dir, passphrase=b"correct horse")
    assert again.fingerprint_sha256() == ca.fingerprint_sha256()
    # The reloaded CA can still sign (the key really was recovered).
    chain, _ = again.issue_server_cert(["localhost"], 30)
    assert again.issued(x509.load_pem_x509_certificates(chain)[0])


def test_encrypted_key_readable_by_openssl_with_passphrase(data_dir: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl CLI not installed")
    ca = CertificateAuthority.load_or_create(data_dir, passphrase=b"s3cret")
    base = [openssl, "pkey", "-in", str(ca.key_path), "-noout"]
    ok = subprocess.run([*base, "-passin", "pass:s3cret"], capture_output=True, check=False)
    bad = subprocess.run([*base, "-passin", "pass:nope"], capture_output=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0
    parsed = subprocess.run(
        [openssl, "asn1parse", "-in", str(ca.key_path)], capture_output=True, text=True, check=True
    )
    assert "aes-256-cbc" in parsed.stdout  # AES-256, as seed 002 requires for the root key


def test_passphrase_for_unencrypted_key_is_refused(data_dir: Path) -> None:
    CertificateAuthority.load_or_create(data_dir)
    with pytest.raises(CAError, match="not encrypted"):
        CertificateAuthority.load_or_create(data_dir, passphrase=b"x")


def test_missing_key_with_existing_cert_is_an_error_not_a_new_ca(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    ca.key_path.unlink()
    with pytest.raises(CAError, match="missing"):
        CertificateAuthority.load_or_create(data_dir)
    assert ca.cert_path.read_bytes() == ca.cert_pem()  # the cert was not overwritten


def test_key_not_matching_cert_is_refused(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    other = ec.generate_private_key(ec.SECP384R1())
    ca.key_path.write_bytes(other.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(data_dir)


def test_garbage_key_is_a_clear_error(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    ca.key_path.write_bytes(b"this is not a key")
    with pytest.raises(CAError, match="not a readable PEM private key"):
        CertificateAuthority.load_or_create(data_dir)


def test_key_left_by_interrupted_creation_is_reused(data_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(data_dir)
    ca.cert_path.unlink()  # as if the process died between writing the key and the cert
    again = CertificateAuthority.load_or_create(data_dir)
    assert again.cert.public_key() == ca.cert.public_key()


def _create(data_dir: str, start: object, results: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    ca = CertificateAuthority.load_or_create(Path(data_dir))
    results.put(ca.fingerprint_sha256())  # type: ignore[attr-defined]


def test_concurrent_creation_yields_one_ca(data_dir: Path) -> None:
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(data_dir), start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    fingerprints = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(set(fingerprints)) == 1
    assert CertificateAuthority.load_or_create(data_dir).fingerprint_sha256() == fingerprints[0]
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in (data_dir / "ca").iterdir()) == [".ca.lock", "ca.crt", "ca.key"]

"""Client certificates: what gets issued (checked with the system openssl), store lifecycle."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import Engine, select

from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import (
    ROLE_EXTENSION_OID,
    CertError,
    ClientCerts,
    UnknownCert,
    decode_roles,
    encode_roles,
    export_p12,
)
from garrison.store.db import default_url, events, open_store

DAY = 86400.0


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    engine = open_store(default_url(data_dir))
    yield engine
    engine.dispose()


@pytest.fixture
def certs(engine: Engine, ca: CertificateAuthority) -> ClientCerts:
    return ClientCerts(engine, ca)


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def test_issued_certificate_shape(certs: ClientCerts, ca: CertificateAuthority) -> None:
    record, cert_pem, key_pem = certs.issue("alice", email="alice@example.com", roles=["admin"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.serial_number == record.serial and 0 < record.serial < 2**159
    assert record.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["alice"]
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ous] == ["admin"]
    assert not cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.com"]
    role_ext = cert.extensions.get_extension_for_oid(ROLE_EXTENSION_OID)
    assert not role_ext.critical
    assert decode_roles(role_ext.value.value) == ["admin"]  # type: ignore[attr-defined]
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.issued(cert)
    assert b"PRIVATE KEY" in key_pem


def test_without_email_there_is_still_a_san(certs: ClientCerts) -> None:
    _, cert_pem, _ = certs.issue("bob")
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:garrison:user:bob"]


def test_openssl_verifies_for_client_use_only(
    certs: ClientCerts, ca: CertificateAuthority, tmp_path: Path
) -> None:
    _, cert_pem, _ = certs.issue("alice", roles=["ops"])
    (tmp_path / "a.crt").write_bytes(cert_pem)
    ca_file = str(ca.cert_path)
    ok = _openssl("verify", "-CAfile", ca_file, "-purpose", "sslclient", str(tmp_path / "a.crt"))
    assert ok.returncode == 0, ok.stderr
    bad = _openssl("verify", "-CAfile", ca_file, "-purpose", "sslserver", str(tmp_path / "a.crt"))
    assert bad.returncode != 0
    text = _openssl("x509", "-noout", "-text", "-in", str(tmp_path / "a.crt")).stdout
    assert "TLS Web Client Authentication" in text
    assert "TLS Web Server Authentication" not in text
    assert "CA:FALSE" in text
    assert "URI:urn:garrison:user:alice" in text


def test_refusals(certs: ClientCerts) -> None:
    for kwargs in (
        {"name": "bad name"},
        {"name": "x" * 65},
        {"name": "ok", "email": "not-an-email"},
        {"name": "ok", "roles": ["bad role"]},
        {"name": "ok", "roles": [f"r{i}" for i in range(33)]},
        {"name": "ok", "days": 0},
        {"name": "ok", "days": 4000},  # beyond the CA's ten years
    ):
        with pytest.raises(CertError):
            certs.issue(**kwargs)  # type: ignore[arg-type]
    assert certs.list() == []


def test_store_row_and_event(certs: ClientCerts, engine: Engine) -> None:
    record, _, _ = certs.issue("alice", roles=["a", "b"])
    assert certs.get("alice") == record
    assert certs.get(record.serial_hex) == record
    assert certs.known(record.serial) == record
    assert certs.known(12345) is None
    with engine.connect() as conn:
        topics = conn.execute(select(events.c.topic, events.c.subject)).all()
    assert ("cert", record.serial_hex) in [tuple(t) for t in topics]
    with pytest.raises(UnknownCert):
        certs.get("nobody")


def test_revoke_by_name_revokes_every_live_cert(certs: ClientCerts) -> None:
    first, _, _ = certs.issue("alice")
    second, _, _ = certs.issue("alice")
    other, _, _ = certs.issue("bob")
    changed = certs.revoke("alice", "keyCompromise")
    assert {c.serial for c in changed} == {first.serial, second.serial}
    now = time.time()
    assert certs.revoked_serials(now + 1) == {first.serial, second.serial}
    assert all(c.status(now + 1) == "revoked" for c in certs.list() if c.name == "alice")
    assert certs.get("bob").status() == "active"
    assert certs.revoke("alice") == []  # nothing left to revoke; first reason kept
    assert certs.get(first.serial_hex).revoke_reason == "keyCompromise"
    assert other.serial not in certs.revoked_serials(now + 1)


def test_revoke_by_serial_and_errors(certs: ClientCerts) -> None:
    first, _, _ = certs.issue("alice")
    second, _, _ = certs.issue("alice")
    spelled = ":".join(f"{first.serial:040X}"[i : i + 2] for i in range(0, 40, 2))
    (changed,) = certs.revoke(spelled, "cessationOfOperation")
    assert changed.serial == first.serial and changed.revoke_reason == "cessationOfOperation"
    assert certs.revoked_serials(time.time() + 1) == {first.serial}
    assert certs.get(second.serial_hex).status() == "active"
    with pytest.raises(UnknownCert):
        certs.revoke("deadbeef")
    with pytest.raises(CertError):
        certs.revoke("alice", "becauseISaidSo")


def test_renew_with_grace(certs: ClientCerts) -> None:
    now = time.time()
    old, _, _ = certs.issue("alice", email="a@example.com", roles=["ops"], now=now)
    new, _, _ = certs.renew("alice", grace_seconds=3600, now=now + 10)
    assert (new.name, new.email, new.roles) == ("alice", "a@example.com", ("ops",))
    assert new.serial != old.serial
    stored_old = certs.get(old.serial_hex)
    assert stored_old.replaced_by == new.serial_hex
    assert stored_old.revoke_reason == "superseded"
    assert stored_old.status(now + 20) == "pending-revocation"
    assert old.serial not in certs.revoked_serials(now + 20)  # still inside the grace
    assert old.serial in certs.revoked_serials(now + 3611)
    assert stored_old.status(now + 3611) == "revoked"
    assert certs.get("alice").serial == new.serial
    # Renewing again supersedes the pending one too (at once, without grace).
    newer, _, _ = certs.renew("alice", now=now + 30)
    assert certs.revoked_serials(now + 31) >= {old.serial, new.serial}
    assert certs.get(new.serial_hex).replaced_by == newer.serial_hex
    assert certs.get(old.serial_hex).replaced_by == new.serial_hex  # the first link is kept


def test_renew_refusals(certs: ClientCerts) -> None:
    with pytest.raises(UnknownCert):
        certs.renew("nobody")
    certs.issue("alice")
    certs.revoke("alice")
    with pytest.raises(CertError, match="no live certificate"):
        certs.renew("alice")
    with pytest.raises(CertError):
        certs.renew("alice", grace_seconds=-1)


def test_list_expiring(certs: ClientCerts) -> None:
    now = time.time()
    soon, _, _ = certs.issue("soon", days=10, now=now)
    certs.issue("later", days=100, now=now)
    gone, _, _ = certs.issue("revoked-soon", days=10, now=now)
    certs.revoke(gone.serial_hex, at=now)
    assert [c.serial for c in certs.list(expiring_within=30 * DAY, now=now)] == [soon.serial]
    assert len(certs.list(now=now)) == 3
    assert certs.get("soon").status(now + 11 * DAY) == "expired"


def test_role_der_roundtrip_and_malformed() -> None:
    roles = ["admin", "x" * 64, "é"]
    assert decode_roles(encode_roles(roles)) == roles
    assert decode_roles(encode_roles([f"r{i}" * 20 for i in range(20)])) is not None  # long form
    for bad in (b"", b"\x30", b"\x30\x05\x0c\x01a", b"\x31\x00", b"\x30\x03\x04\x01a",
                b"\x30\x00\x00", b"\x30\x81\x01\x00", b"\x30\x03\x0c\x01\xff"):  # fmt: skip
        assert decode_roles(bad) is None, bad


def test_p12_is_aes_and_loads_back(
    certs: ClientCerts, ca: CertificateAuthority, tmp_path: Path
) -> None:
    _, cert_pem, key_pem = certs.issue("alice")
    bundle = export_p12(cert_pem, key_pem, b"s3cret pw", "alice", ca.cert_pem())
    key, cert, extra = pkcs12.load_key_and_certificates(bundle, b"s3cret pw")
    assert cert is not None and cert.public_bytes(serialization.Encoding.PEM) == cert_pem
    assert key is not None and key.public_key() == cert.public_key()
    assert [c.subject for c in extra] == [ca.cert.subject]
    path = tmp_path / "a.p12"
    path.write_bytes(bundle)
    info = _openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:s3cret pw")
    assert info.returncode == 0, info.stderr
    report = info.stdout + info.stderr
    assert "AES-256-CBC" in report and "hmacWithSHA256" in report
    assert "MAC: sha256" in report
    assert "RC2" not in report and "3DES" not in report
    wrong = _openssl("pkcs12", "-info", "-noout", "-in", str(path), "-passin", "pass:nope")
    assert wrong.returncode != 0

"""CRLs: ours (checked with the system openssl) and external ones (refused unless genuine)."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Engine

from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import ClientCerts
from garrison.pki.crl import CRLError, build_crl, load_crl, revoked_serials_from_crl
from garrison.store.db import default_url, open_store


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    engine = open_store(default_url(data_dir))
    yield engine
    engine.dispose()


@pytest.fixture
def certs(engine: Engine, ca: CertificateAuthority) -> ClientCerts:
    return ClientCerts(engine, ca)


def _crl_number(pem: bytes) -> int:
    crl = x509.load_pem_x509_crl(pem)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_crl_lists_revoked_with_reasons_and_openssl_verifies(
    certs: ClientCerts, ca: CertificateAuthority, tmp_path: Path
) -> None:
    now = time.time()
    compromised, _, _ = certs.issue("alice", now=now)
    plain, _, _ = certs.issue("bob", now=now)
    kept, _, _ = certs.issue("carol", now=now)
    pending, _, _ = certs.issue("dave", now=now)
    certs.revoke("alice", "keyCompromise", at=now)
    certs.revoke(plain.serial_hex, at=now)
    certs.renew("dave", grace_seconds=3600, now=now)

    pem = certs.crl(now=now + 1)
    crl = x509.load_pem_x509_crl(pem)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=1)
    assert load_crl(pem) == {compromised.serial, plain.serial}
    assert kept.serial not in load_crl(pem) and pending.serial not in load_crl(pem)
    entry = crl.get_revoked_certificate_by_serial_number(compromised.serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert int(entry.revocation_date_utc.timestamp()) == int(now)
    unspecified = crl.get_revoked_certificate_by_serial_number(plain.serial)
    assert unspecified is not None and len(unspecified.extensions) == 0  # RFC 5280 §5.3.1

    path = tmp_path / "crl.pem"
    path.write_bytes(pem)
    assert (
        load_crl(path)
        == load_crl(str(path))
        == load_crl(crl.public_bytes(serialization.Encoding.DER))
    )
    run = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-CAfile", str(ca.cert_path), "-noout", "-text"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "verify OK" in run.stderr + run.stdout
    assert f"{compromised.serial:040X}" in run.stdout
    assert "Key Compromise" in run.stdout

    # After the grace, the superseded certificate joins the list.
    assert pending.serial in load_crl(certs.crl(now=now + 3601))


def test_crl_number_increases_even_if_the_clock_goes_back(certs: ClientCerts) -> None:
    now = time.time()
    first = _crl_number(certs.crl(now=now))
    second = _crl_number(certs.crl(now=now))
    third = _crl_number(certs.crl(now=now - 86400))
    assert first < second < third


def test_openssl_rejects_revoked_client_cert(
    certs: ClientCerts, ca: CertificateAuthority, tmp_path: Path
) -> None:
    record, cert_pem, _ = certs.issue("alice")
    (tmp_path / "a.crt").write_bytes(cert_pem)
    args = ["openssl", "verify", "-crl_check", "-CAfile", str(ca.cert_path), "-CRLfile"]
    (tmp_path / "before.pem").write_bytes(certs.crl())
    ok = subprocess.run([*args, str(tmp_path / "before.pem"), str(tmp_path / "a.crt")],
                        capture_output=True, text=True, timeout=30)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    certs.revoke(record.serial_hex, "keyCompromise")
    (tmp_path / "after.pem").write_bytes(certs.crl(now=time.time() + 1))
    bad = subprocess.run([*args, str(tmp_path / "after.pem"), str(tmp_path / "a.crt")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode != 0
    assert "revoked" in (bad.stdout + bad.stderr).lower()


def _other_root(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _external_crl(
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    serials: list[int],
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(this_update)
        .next_update(next_update)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_external_crl_verified_against_issuers(ca: CertificateAuthority) -> None:
    root, key = _other_root("External Root")
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    good = _external_crl(root.subject, key, [7, 9], now - day, now + day)
    assert revoked_serials_from_crl(good, [ca.cert, root]) == {7, 9}

    with pytest.raises(CRLError, match="not signed"):
        revoked_serials_from_crl(good, [ca.cert])  # issuer not trusted
    impostor_cert, impostor_key = _other_root("External Root")  # same name, other key
    forged = _external_crl(root.subject, impostor_key, [1], now - day, now + day)
    with pytest.raises(CRLError, match="not signed"):
        revoked_serials_from_crl(forged, [root])
    assert revoked_serials_from_crl(forged, [root, impostor_cert]) == {1}
    stale = _external_crl(root.subject, key, [7], now - 3 * day, now - day)
    with pytest.raises(CRLError, match="out of date"):
        revoked_serials_from_crl(stale, [root])
    future = _external_crl(root.subject, key, [7], now + day, now + 2 * day)
    with pytest.raises(CRLError, match="future"):
        revoked_serials_from_crl(future, [root])
    with pytest.raises(CRLError, match="readable"):
        revoked_serials_from_crl(b"garbage", [root])
    # now is a parameter: the same CRL is stale tomorrow + 1.
    with pytest.raises(CRLError):
        revoked_serials_from_crl(good, [root], now=time.time() + 2 * 86400)


def test_build_crl_without_store(ca: CertificateAuthority) -> None:
    pem = build_crl(ca, [], now=time.time())
    crl = x509.load_pem_x509_crl(pem)
    assert len(crl) == 0
    assert revoked_serials_from_crl(pem, [ca.cert]) == frozenset()

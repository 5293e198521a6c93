"""Server certificates from the CA: profile, names, limits, chains real verifiers accept."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    PolicyBuilder,
    ServerVerifier,
    Store,
    VerificationError,
)

from garrison.pki.ca import CAError, CertificateAuthority
from tests.support.tools import missing

NAMES = ("gw.example", "localhost", "127.0.0.1", "::1")


def _issue(
    ca: CertificateAuthority,
    names: Sequence[str] = NAMES,
    days: int = 90,
    now: dt.datetime | None = None,
) -> tuple[list[x509.Certificate], bytes]:
    chain_pem, key_pem = ca.issue_server_cert(names, days, now=now)
    return x509.load_pem_x509_certificates(chain_pem), key_pem


def _verifier(ca: CertificateAuthority, name: x509.DNSName | x509.IPAddress) -> ServerVerifier:
    return PolicyBuilder().store(Store([ca.cert])).build_server_verifier(name)


def test_sans_are_typed_dns_and_ip(ca: CertificateAuthority) -> None:
    (leaf, _), _ = _issue(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw.example"


def test_leaf_profile(ca: CertificateAuthority) -> None:
    (leaf, root), key_pem = _issue(ca)
    assert root == ca.cert
    assert leaf.issuer == ca.cert.subject
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(pub)
    assert 0 < leaf.serial_number < 2**159
    # The returned key is unencrypted and belongs to the leaf.
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == pub


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {_issue(ca)[0][0].serial_number for _ in range(5)}
    assert len(serials) == 5


def test_validity_window_and_clock_skew(ca: CertificateAuthority) -> None:
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ca_cert_until = ca.cert.not_valid_after_utc
    assert ca_cert_until > now + dt.timedelta(days=90)
    (leaf, _), _ = _issue(ca, days=90, now=now)
    assert leaf.not_valid_before_utc == now - dt.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == now + dt.timedelta(days=90)


def test_validity_capped_at_397_days(ca: CertificateAuthority) -> None:
    (leaf, _), _ = _issue(ca, days=397)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=397, minutes=5)
    with pytest.raises(CAError, match="397"):
        ca.issue_server_cert(NAMES, 398)
    with pytest.raises(CAError):
        ca.issue_server_cert(NAMES, 0)


def test_leaf_never_outlives_the_root(ca: CertificateAuthority) -> None:
    near_root_end = ca.cert.not_valid_after_utc - dt.timedelta(days=10)
    (leaf, _), _ = _issue(ca, days=90, now=near_root_end)
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("bad", ["", "bad name", "a..b", "-x.example", "x" * 64 + ".example"])
def test_invalid_host_names_rejected(ca: CertificateAuthority, bad: str) -> None:
    with pytest.raises(CAError):
        ca.issue_server_cert([bad], 30)


def test_no_host_names_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(CAError):
        ca.issue_server_cert([], 30)


def test_names_normalised(ca: CertificateAuthority) -> None:
    (leaf, _), _ = _issue(ca, names=["GW.Example.", "bücher.example", "[::1]", "*.apps.example"])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "gw.example",
        "xn--bcher-kva.example",
        "*.apps.example",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_long_first_name_gives_empty_subject_and_critical_san(ca: CertificateAuthority) -> None:
    long_name = ".".join(["a" * 60, "b" * 10, "example"])
    (leaf, _), _ = _issue(ca, names=[long_name])
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    _verifier(ca, x509.DNSName(long_name)).verify(leaf, [])


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("gw.example"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_chain_verifies_with_cryptography(
    ca: CertificateAuthority, name: x509.DNSName | x509.IPAddress
) -> None:
    (leaf, root), _ = _issue(ca)
    chain = _verifier(ca, name).verify(leaf, [root])
    assert chain[0] == leaf and chain[-1] == ca.cert


def test_cryptography_verifier_rejects_other_name_and_other_ca(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    (leaf, _), _ = _issue(ca)
    with pytest.raises(VerificationError):
        _verifier(ca, x509.DNSName("other.example")).verify(leaf, [])
    with pytest.raises(VerificationError):
        _verifier(ca, x509.IPAddress(ipaddress.ip_address("10.0.0.1"))).verify(leaf, [])
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    with pytest.raises(VerificationError):
        _verifier(stranger, x509.DNSName("gw.example")).verify(leaf, [])
    assert ca.issued(leaf) and not stranger.issued(leaf)


def test_chain_verifies_with_openssl_cli(ca: CertificateAuthority, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl CLI not installed")
    chain_pem, _ = ca.issue_server_cert(NAMES, 90)
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(chain_pem)  # openssl verify checks the first certificate in the file
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")

    def verify(ca_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [openssl, "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(ca_file)]
        return subprocess.run(
            [*cmd, *extra, str(leaf_file)], capture_output=True, text=True, check=False
        )

    ok = verify(ca.cert_path)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stdout + ok.stderr
    assert verify(ca.cert_path, "-verify_hostname", "gw.example").returncode == 0
    assert verify(ca.cert_path, "-verify_ip", "127.0.0.1").returncode == 0
    assert verify(ca.cert_path, "-verify_hostname", "other.example").returncode != 0
    assert verify(stranger.cert_path).returncode != 0

"""The gateway's own certificate: issued once, kept while good, reissued when it must be."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from garrison.fsutil import atomic_write, ensure_private_dir
from garrison.pki.ca import CAError, CertificateAuthority
from garrison.pki.server_cert import (
    DEFAULT_NAMES,
    ServerCertificate,
    ensure_server_certificate,
    needs_renewal,
    wanted_names,
)

UTC = dt.UTC


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _sans(path: Path) -> set[x509.GeneralName]:
    ext = _leaf(path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(ext.value)


def _plant(
    data_dir: Path, ca: CertificateAuthority, names: list[str], days: int, now: dt.datetime
) -> bytes:
    """Put a cert issued at `now` where ensure_server_certificate looks for it."""
    chain, key = ca.issue_server_cert(names, days, now=now)
    ensure_private_dir(data_dir / "tls")
    atomic_write(data_dir / "tls" / "server.key", key)
    atomic_write(data_dir / "tls" / "server.crt", chain)
    return chain


def test_first_call_issues_with_defaults(data_dir: Path, ca: CertificateAuthority) -> None:
    sc = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert sc.reissued
    assert sc.names == ("gw.example", *DEFAULT_NAMES)
    assert sc.cert_path == data_dir / "tls" / "server.crt"
    assert sc.key_path == data_dir / "tls" / "server.key"
    assert _sans(sc.cert_path) == {
        x509.DNSName("gw.example"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    }
    leaf = _leaf(sc.cert_path)
    assert ca.issued(leaf)
    assert sc.not_after == leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=90, minutes=5)
    assert stat.S_IMODE((data_dir / "tls").stat().st_mode) == 0o700
    assert stat.S_IMODE(sc.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sc.cert_path.stat().st_mode) == 0o600


def test_second_call_keeps_existing(
    data_dir: Path, server_cert: ServerCertificate, ca: CertificateAuthority
) -> None:
    before = (server_cert.cert_path.read_bytes(), server_cert.key_path.read_bytes())
    again = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert not again.reissued
    assert (again.cert_path.read_bytes(), again.key_path.read_bytes()) == before
    assert again.not_after == server_cert.not_after
    # Same set of names spelled differently and in another order is still the same set.
    same = ensure_server_certificate(data_dir, ca, ["::1", "GW.EXAMPLE", "localhost"])
    assert not same.reissued


def test_wanted_names_dedupe_keeps_order() -> None:
    assert wanted_names(["api.example", "LOCALHOST", "0:0::1", "api.example"]) == (
        "api.example",
        "localhost",
        "::1",
        "127.0.0.1",
    )
    assert wanted_names([]) == DEFAULT_NAMES


def test_hostname_change_reissues(
    data_dir: Path, server_cert: ServerCertificate, ca: CertificateAuthority
) -> None:
    old = server_cert.cert_path.read_bytes()
    added = ensure_server_certificate(data_dir, ca, ["gw.example", "new.example"])
    assert added.reissued
    assert x509.DNSName("new.example") in _sans(added.cert_path)
    removed = ensure_server_certificate(data_dir, ca, ["new.example"])
    assert removed.reissued
    assert x509.DNSName("gw.example") not in _sans(removed.cert_path)
    assert removed.cert_path.read_bytes() != old


def test_near_expiry_reissues_but_healthy_is_kept(data_dir: Path, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(UTC)
    names = ["gw.example", *DEFAULT_NAMES]
    healthy = _plant(data_dir, ca, names, 90, now - dt.timedelta(days=50))  # 40 days left
    kept = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert not kept.reissued
    assert kept.cert_path.read_bytes() == healthy

    _plant(data_dir, ca, names, 90, now - dt.timedelta(days=70))  # 20 days left < 30
    renewed = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert renewed.reissued
    assert renewed.not_after - now > dt.timedelta(days=89)


def test_expired_reissues(data_dir: Path, ca: CertificateAuthority) -> None:
    _plant(data_dir, ca, ["localhost"], 30, dt.datetime.now(UTC) - dt.timedelta(days=31))
    assert ensure_server_certificate(data_dir, ca, []).reissued


def test_cert_from_other_ca_reissues(
    data_dir: Path, tmp_path: Path, ca: CertificateAuthority
) -> None:
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    _plant(data_dir, stranger, ["gw.example", *DEFAULT_NAMES], 90, dt.datetime.now(UTC))
    sc = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert sc.reissued
    assert ca.issued(_leaf(sc.cert_path))


@pytest.mark.parametrize("damage", ["garbage_cert", "garbage_key", "missing_key", "other_key"])
def test_unusable_files_reissue(
    data_dir: Path, server_cert: ServerCertificate, ca: CertificateAuthority, damage: str
) -> None:
    if damage == "garbage_cert":
        server_cert.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    elif damage == "garbage_key":
        server_cert.key_path.write_bytes(b"not a key")
    elif damage == "missing_key":
        server_cert.key_path.unlink()
    else:
        _, other_key = ca.issue_server_cert(["x.example"], 30)
        server_cert.key_path.write_bytes(other_key)
    sc = ensure_server_certificate(data_dir, ca, ["gw.example"])
    assert sc.reissued
    assert not ensure_server_certificate(data_dir, ca, ["gw.example"]).reissued


def test_days_over_limit_refused(data_dir: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(CAError):
        ensure_server_certificate(data_dir, ca, ["gw.example"], days=398)


def test_concurrent_callers_issue_once(data_dir: Path, ca: CertificateAuthority) -> None:
    start = threading.Barrier(6)
    results: list[ServerCertificate] = []

    def worker() -> None:
        start.wait()
        results.append(ensure_server_certificate(data_dir, ca, ["gw.example"]))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert sum(r.reissued for r in results) == 1
    assert len({r.not_after for r in results}) == 1


def _cert(ca: CertificateAuthority, days: int, issued_at: dt.datetime) -> x509.Certificate:
    chain, _ = ca.issue_server_cert(["localhost"], days, now=issued_at)
    return x509.load_pem_x509_certificates(chain)[0]


def test_needs_renewal_thresholds(ca: CertificateAuthority) -> None:
    t0 = dt.datetime(2030, 6, 1, tzinfo=UTC)
    cert = _cert(ca, 90, t0)
    assert not needs_renewal(cert, t0)
    assert not needs_renewal(cert, t0 + dt.timedelta(days=59))  # 31 days left > 1/3
    assert needs_renewal(cert, t0 + dt.timedelta(days=61))  # 29 days left < 1/3
    assert needs_renewal(cert, t0 + dt.timedelta(days=91))  # expired
    assert needs_renewal(cert, t0 - dt.timedelta(hours=1))  # not yet valid: wrong clock


def test_needs_renewal_one_day_floor(ca: CertificateAuthority) -> None:
    t0 = dt.datetime(2030, 6, 1, tzinfo=UTC)
    cert = _cert(ca, 2, t0)  # a third of the lifetime is ~16 hours
    assert not needs_renewal(cert, t0 + dt.timedelta(hours=23))  # 25 h left
    assert needs_renewal(cert, t0 + dt.timedelta(hours=25))  # 23 h left: under a day

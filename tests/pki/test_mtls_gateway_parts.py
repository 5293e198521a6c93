"""The gateway side of mutual TLS, without sockets: the per-connection certificate, the
revocation set, the handshake trace and the per-request check (stage)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Engine

from garrison.config import ClientCertsConfig
from garrison.observe import metrics
from garrison.pipeline.client_cert import ClientCertCheck
from garrison.pipeline.exchange import Exchange
from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import ClientCerts
from garrison.pki.handshake_trace import HandshakeTracer, _first_cert
from garrison.pki.peer import PeerCert
from garrison.pki.revocation import Revocation
from garrison.store.db import open_store


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'g.db'}")


@pytest.fixture
def certs(tmp_path: Path, engine: Engine) -> ClientCerts:
    return ClientCerts(engine, CertificateAuthority.load_or_create(tmp_path / "data"))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_peer_cert_reads_identity_and_checks_dates(certs: ClientCerts) -> None:
    record, pem, _ = certs.issue("ana", email="ana@example.test", roles=["ops"], days=30)
    peer = PeerCert.from_der(der_of(pem))
    assert peer is not None and peer.identity is not None
    assert (peer.identity.name, peer.identity.email, peer.identity.roles) == (
        "ana",
        "ana@example.test",
        ("ops",),
    )
    assert peer.serial == record.serial
    assert peer.problem(time.time(), frozenset()) is None
    assert peer.problem(time.time(), frozenset({record.serial})) == "revoked"
    assert peer.problem(peer.not_after + 1, frozenset()) == "expired"
    assert peer.problem(peer.not_before - 1, frozenset()) == "not yet valid"
    assert peer.pem_quoted().startswith(b"-----BEGIN%20CERTIFICATE-----%0A")  # as nginx escapes
    assert PeerCert.from_der(b"not a certificate") is None


def test_revocation_follows_the_store_including_grace(engine: Engine, certs: ClientCerts) -> None:
    old, _, _ = certs.issue("bob")
    revocation = Revocation(engine, ClientCertsConfig(mode="required"))
    revocation.refresh_internal()
    assert revocation.problem(old.serial) is None
    version = revocation.version
    new, _, _ = certs.renew("bob", grace_seconds=60)
    revocation.refresh_internal()
    assert revocation.problem(old.serial) is None  # still in its grace period
    assert revocation.next_due <= time.time() + 61
    revocation.refresh_internal(now=time.time() + 120)
    assert revocation.problem(old.serial) == "revoked"
    assert revocation.problem(new.serial) is None
    assert revocation.version == version + 1


def test_external_ca_without_a_loadable_crl_fails_closed(tmp_path: Path, engine: Engine) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ext")
    config = ClientCertsConfig(
        mode="required", ca=str(ca.cert_path), crl=str(tmp_path / "missing.crl")
    )
    revocation = Revocation(engine, config)
    assert revocation.problem(1) == "revocation status unknown"
    import asyncio

    asyncio.run(revocation.refresh_crl())
    assert revocation.problem(1) == "revocation status unknown"  # still unusable: closed


def _certificate_message(der: bytes, tls13: bool) -> bytes:
    entry = len(der).to_bytes(3, "big") + der + (b"\x00\x00" if tls13 else b"")
    body = (b"\x00" if tls13 else b"") + len(entry).to_bytes(3, "big") + entry
    return b"\x0b" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("tls13", [True, False], ids=["tls1.3", "tls1.2"])
def test_handshake_trace_names_the_refused_certificate(certs: ClientCerts, tls13: bool) -> None:
    record, pem, _ = certs.issue("eve")
    seen: list[tuple[str, dict[str, object]]] = []
    tracer = HandshakeTracer(lambda event, fields: seen.append((event, fields)))
    conn = object()
    before = metrics.client_cert_checks.labels(result="handshake_unknown_ca")._value.get()
    tracer._on_message(conn, "read", None, 22, 11, _certificate_message(der_of(pem), tls13))
    tracer._on_message(conn, "write", None, 23, None, b"app data")  # ignored
    tracer._on_message(conn, "write", None, 21, None, b"\x02\x30")  # fatal unknown_ca
    assert seen == [
        (
            "client_cert_refused",
            {
                "reason": "unknown_ca",
                "stage": "tls_handshake",
                "subject": "CN=eve",
                "serial": record.serial_hex,
                "issuer": seen[0][1]["issuer"],
            },
        )
    ]
    after = metrics.client_cert_checks.labels(result="handshake_unknown_ca")._value.get()
    assert after == before + 1
    assert _first_cert(b"\x0b\x00\x00\x03\x00\x00\x00") == {"certificate": "none"}
    assert _first_cert(b"\x0b\x00\x00\x09" + b"\xff" * 9) == {"certificate": "unparsable"}


def _exchange(peer: PeerCert | None, html: bool = False) -> Exchange:
    accept = b"text/html" if html else b"application/json"
    ex = Exchange("GET", b"/", "1.1", [(b"accept", accept)], "127.0.0.1", peer_cert=peer)
    ex.path = "/"
    return ex


def test_stage_required_mode_answers_and_sets_headers(engine: Engine, certs: ClientCerts) -> None:
    record, pem, _ = certs.issue("ana", roles=["ops"])
    revocation = Revocation(engine, ClientCertsConfig(mode="required"))
    audit: list[tuple[str, dict[str, object]]] = []
    stage = ClientCertCheck(
        ClientCertsConfig(mode="required", forward_cert=True),
        revocation,
        lambda e, f: audit.append((e, f)),
    )
    peer = PeerCert.from_der(der_of(pem))
    ok = _exchange(peer)
    assert stage(ok) is None
    headers = dict(ok.upstream_headers)
    assert headers[b"x-ssl-client-verify"] == b"SUCCESS"
    assert headers[b"x-ssl-client-serial"] == b"%X" % record.serial
    assert headers[b"x-ssl-client-dn"] == b"OU=ops,CN=ana"
    assert b"x-ssl-client-cert" in headers
    assert ok.cert_identity is not None and ok.cert_identity.name == "ana"

    none = stage(_exchange(None, html=True))
    assert none is not None and none.status == 403 and b"client certificate" in none.body
    certs.revoke("ana")
    revocation.refresh_internal()
    revoked = stage(_exchange(peer))
    assert revoked is not None and revoked.status == 403
    assert b"client_cert_invalid" in revoked.body
    assert [f["reason"] for _, f in audit] == ["none", "revoked"]


def test_stage_optional_mode_lets_requests_on(engine: Engine) -> None:
    revocation = Revocation(engine, ClientCertsConfig(mode="optional"))
    stage = ClientCertCheck(ClientCertsConfig(mode="optional"), revocation, lambda e, f: None)
    ex = _exchange(None)
    assert stage(ex) is None
    assert dict(ex.upstream_headers)[b"x-ssl-client-verify"] == b"NONE"
    assert ex.cert_identity is None

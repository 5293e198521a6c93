"""Real TLS handshakes over 127.0.0.1 against contexts from server_context / reload_context."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from garrison.fsutil import atomic_write
from garrison.pki.ca import CertificateAuthority
from garrison.pki.server_cert import ServerCertificate, ensure_server_certificate
from garrison.pki.tls import TLSConfigError, reload_context, server_context
from tests.pki.tls_server import (
    TLSEchoServer,
    client_context,
    connect,
    echo,
    openssl_bin,
    s_client,
)

needs_openssl = pytest.mark.skipif(openssl_bin() is None, reason="openssl CLI not installed")
ALLOWED_TLS12 = {
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def _server_error(server: TLSEchoServer) -> BaseException:
    outcome = server.next_outcome()
    assert isinstance(outcome, BaseException), f"server accepted the handshake: {outcome}"
    return outcome


# ------------------------------------------------------------------ context configuration
def test_context_options(server_cert: ServerCertificate) -> None:
    for profile in ("intermediate", "modern"):
        ctx = server_context(profile, server_cert.cert_path, server_cert.key_path)
        assert ctx.protocol == ssl.PROTOCOL_TLS_SERVER
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert not ctx.options & ssl.OP_NO_TICKET
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert (
        server_context("intermediate", server_cert.cert_path, server_cert.key_path).minimum_version
        == ssl.TLSVersion.TLSv1_2
    )
    assert (
        server_context("modern", server_cert.cert_path, server_cert.key_path).minimum_version
        == ssl.TLSVersion.TLSv1_3
    )


def test_tls12_cipher_list_is_ecdhe_aead_only(server_cert: ServerCertificate) -> None:
    ctx = server_context("intermediate", server_cert.cert_path, server_cert.key_path)
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert {c["name"] for c in tls12} == ALLOWED_TLS12
    for c in tls12:
        assert c["kea"] == "kx-ecdhe" and c["aead"] and c["auth"] != "auth-null"
    others = {c["protocol"] for c in ctx.get_ciphers()} - {"TLSv1.2"}
    assert others == {"TLSv1.3"}


def test_unknown_profile_rejected(server_cert: ServerCertificate) -> None:
    with pytest.raises(TLSConfigError, match="unknown TLS profile"):
        server_context("old", server_cert.cert_path, server_cert.key_path)


# ------------------------------------------------------------------ handshakes that must work
@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1", "gw.example"])
def test_handshake_trusting_only_the_ca(
    tls_server: TLSEchoServer, ca: CertificateAuthority, hostname: str
) -> None:
    ctx = client_context(ca.cert_path)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with connect(tls_server.port, ctx, hostname) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert tls.compression() is None
        assert echo(tls, b"ping") == b"ping"
        cipher = tls.cipher()
    assert cipher is not None and cipher[0].startswith("TLS_")
    assert tls_server.next_outcome() == ("TLSv1.3", cipher[0])


def test_tls12_negotiates_ecdhe_aead(tls_server: TLSEchoServer, ca: CertificateAuthority) -> None:
    ctx = client_context(ca.cert_path, max_version=ssl.TLSVersion.TLSv1_2)
    with connect(tls_server.port, ctx, "localhost") as tls:
        version, cipher = tls.version(), tls.cipher()[0]
        assert echo(tls, b"x") == b"x"
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-") and cipher in ALLOWED_TLS12


def test_tls12_session_resumption(tls_server: TLSEchoServer, ca: CertificateAuthority) -> None:
    ctx = client_context(ca.cert_path, max_version=ssl.TLSVersion.TLSv1_2)
    with connect(tls_server.port, ctx, "localhost") as first:
        session = first.session
        assert not first.session_reused
    assert session is not None and session.has_ticket
    raw = socket.create_connection(("127.0.0.1", tls_server.port))
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as second:
        assert second.session_reused
        assert echo(second, b"resumed") == b"resumed"


def test_client_without_the_ca_or_with_wrong_name_fails(
    tls_server: TLSEchoServer, ca: CertificateAuthority
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(tls_server.port, ssl.create_default_context(), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(tls_server.port, client_context(ca.cert_path), "other.example")


def test_modern_accepts_tls13(modern_server: TLSEchoServer, ca: CertificateAuthority) -> None:
    with connect(modern_server.port, client_context(ca.cert_path), "localhost") as tls:
        assert tls.version() == "TLSv1.3"
        assert echo(tls, b"hi") == b"hi"


# ------------------------------------------------------------------ handshakes that must fail
def test_modern_refuses_tls12_client(
    modern_server: TLSEchoServer, ca: CertificateAuthority
) -> None:
    ctx = client_context(ca.cert_path, max_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        connect(modern_server.port, ctx, "localhost")
    assert "UNSUPPORTED_PROTOCOL" in str(_server_error(modern_server)).upper()


@needs_openssl
def test_openssl_tls12_control_succeeds(
    tls_server: TLSEchoServer, ca: CertificateAuthority
) -> None:
    """Control: the same s_client call works at TLS 1.2, so the refusals below are real."""
    result = s_client(tls_server.port, ca.cert_path, "-tls1_2")
    assert result.returncode == 0, result.stderr
    assert "Protocol version: TLSv1.2" in result.stderr
    assert "Ciphersuite: ECDHE-ECDSA-AES256-GCM-SHA384" in result.stderr
    assert "Verification: OK" in result.stderr


@needs_openssl
def test_openssl_tls11_client_refused(tls_server: TLSEchoServer, ca: CertificateAuthority) -> None:
    # SECLEVEL=0 lets the client really offer TLS 1.1; the refusal must come from the server.
    result = s_client(tls_server.port, ca.cert_path, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert result.returncode != 0
    assert "UNSUPPORTED_PROTOCOL" in str(_server_error(tls_server)).upper()


@needs_openssl
@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"]
)
def test_openssl_cbc_tls12_refused(
    tls_server: TLSEchoServer, ca: CertificateAuthority, cipher: str
) -> None:
    """CBC suites (non-AEAD) are refused even with ECDHE. Non-ECDHE suites cannot even be tried
    against an ECDSA certificate; the cipher-list test covers them."""
    result = s_client(tls_server.port, ca.cert_path, "-tls1_2", "-cipher", cipher)
    assert result.returncode != 0
    assert "NO_SHARED_CIPHER" in str(_server_error(tls_server)).upper()


@needs_openssl
def test_modern_refuses_openssl_tls12(
    modern_server: TLSEchoServer, ca: CertificateAuthority
) -> None:
    result = s_client(modern_server.port, ca.cert_path, "-tls1_2")
    assert result.returncode != 0
    assert "UNSUPPORTED_PROTOCOL" in str(_server_error(modern_server)).upper()


# ------------------------------------------------------------------ reload
def _peer_der(tls: ssl.SSLSocket) -> bytes:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _leaf_der(path: Path) -> bytes:
    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return leaf.public_bytes(serialization.Encoding.DER)


def test_reload_swaps_cert_for_new_handshakes_only(
    tls_server: TLSEchoServer,
    server_cert: ServerCertificate,
    ca: CertificateAuthority,
    data_dir: Path,
) -> None:
    client = client_context(ca.cert_path)
    old = connect(tls_server.port, client, "localhost")
    try:
        old_der = _peer_der(old)
        assert old_der == _leaf_der(server_cert.cert_path)
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(tls_server.port, client, "renamed.example")

        new_cert = ensure_server_certificate(data_dir, ca, ["renamed.example"])
        assert new_cert.reissued
        reload_context(tls_server.ctx, new_cert.cert_path, new_cert.key_path)

        with connect(tls_server.port, client_context(ca.cert_path), "renamed.example") as new:
            assert _peer_der(new) == _leaf_der(new_cert.cert_path) != old_der
            assert echo(new, b"new") == b"new"
        # The connection opened before the reload is untouched.
        assert echo(old, b"still here") == b"still here"
        assert _peer_der(old) == old_der
    finally:
        old.close()


@pytest.mark.parametrize("broken", ["garbage_key", "garbage_cert", "mismatched_key", "missing"])
def test_broken_reload_raises_and_keeps_old_context(
    tls_server: TLSEchoServer,
    server_cert: ServerCertificate,
    ca: CertificateAuthority,
    tmp_path: Path,
    broken: str,
) -> None:
    cert_path, key_path = tmp_path / "new.crt", tmp_path / "new.key"
    chain, key = ca.issue_server_cert(["other.example"], 30)
    _, other_key = ca.issue_server_cert(["third.example"], 30)
    atomic_write(cert_path, b"garbage" if broken == "garbage_cert" else chain)
    if broken == "garbage_key":
        atomic_write(key_path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    elif broken == "mismatched_key":
        atomic_write(key_path, other_key)
    elif broken == "missing":
        pass
    else:
        atomic_write(key_path, key)
    with pytest.raises(TLSConfigError) as err:
        reload_context(tls_server.ctx, cert_path, key_path)
    assert str(cert_path) in str(err.value) or str(key_path) in str(err.value)
    with connect(tls_server.port, client_context(ca.cert_path), "localhost") as tls:
        assert _peer_der(tls) == _leaf_der(server_cert.cert_path)
        assert echo(tls, b"ok") == b"ok"


def test_encrypted_key_rejected_without_prompting(
    server_cert: ServerCertificate, ca: CertificateAuthority, tmp_path: Path
) -> None:
    chain, key_pem = ca.issue_server_cert(["localhost"], 30)
    key = serialization.load_pem_private_key(key_pem, None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    atomic_write(tmp_path / "c.pem", chain)
    atomic_write(tmp_path / "k.pem", encrypted)
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_context("intermediate", tmp_path / "c.pem", tmp_path / "k.pem")


def test_one_session_ticket_per_handshake(tmp_path: Path) -> None:
    """Fewer tickets per handshake is less work per new connection; one is enough to resume."""
    ca = CertificateAuthority.load_or_create(tmp_path)
    cert = ensure_server_certificate(tmp_path, ca, [])
    assert server_context("intermediate", cert.cert_path, cert.key_path).num_tickets == 1

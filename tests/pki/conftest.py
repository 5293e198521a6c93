"""Shared PKI fixtures: a fresh CA per test, a server cert issued by it, a running TLS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.pki.ca import CertificateAuthority
from garrison.pki.server_cert import ServerCertificate, ensure_server_certificate
from garrison.pki.tls import server_context
from tests.pki.tls_server import TLSEchoServer


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def ca(data_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(data_dir)


@pytest.fixture
def server_cert(data_dir: Path, ca: CertificateAuthority) -> ServerCertificate:
    return ensure_server_certificate(data_dir, ca, ["gw.example"])


@pytest.fixture
def tls_server(server_cert: ServerCertificate) -> Iterator[TLSEchoServer]:
    ctx = server_context("intermediate", server_cert.cert_path, server_cert.key_path)
    server = TLSEchoServer(ctx)
    yield server
    server.close()


@pytest.fixture
def modern_server(server_cert: ServerCertificate) -> Iterator[TLSEchoServer]:
    ctx = server_context("modern", server_cert.cert_path, server_cert.key_path)
    server = TLSEchoServer(ctx)
    yield server
    server.close()

"""The client certificate of one TLS connection, read once when the connection is made.

The chain was checked by OpenSSL at the handshake (trusted CA); validity dates and revocation
are checked per request from this parsed form, so an expired certificate gets a readable
answer (not a reset), and a revocation reaches connections that are already open.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from garrison.pki.client_identity import CertIdentity, identity_from_cert

MAX_DN = 1024


def _header_text(text: str, limit: int = MAX_DN) -> bytes:
    """Printable ASCII only (a DN may hold anything), escaped the way RFC 4514 escapes."""
    out = []
    for char in text[:limit]:
        code = ord(char)
        out.append(char if 32 <= code < 127 else f"\\{code:02X}" if code < 256 else "?")
    return "".join(out).encode("ascii")


@dataclass(frozen=True, slots=True)
class PeerCert:
    """A presented certificate: identity (None when the subject names nobody we accept)."""

    serial: int
    not_before: float
    not_after: float
    fingerprint: str
    dn: bytes
    identity: CertIdentity | None
    der: bytes

    @classmethod
    def from_der(cls, der: bytes) -> PeerCert | None:
        """Parse what OpenSSL already verified; None only if it cannot be parsed at all."""
        try:
            cert = x509.load_der_x509_certificate(der)
            dn = cert.subject.rfc4514_string()
            serial = cert.serial_number
            not_before = cert.not_valid_before_utc.timestamp()
            not_after = cert.not_valid_after_utc.timestamp()
        except (ValueError, TypeError):
            return None
        try:
            identity = identity_from_cert(cert)
        except Exception:  # never trust a subject to be well-formed; no identity, no crash
            identity = None
        return cls(
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            fingerprint=hashlib.sha256(der).hexdigest(),
            dn=_header_text(dn),
            identity=identity,
            der=der,
        )

    def problem(self, now: float, revoked: frozenset[int]) -> str | None:
        """Why the certificate cannot be used at `now`, or None."""
        if self.serial in revoked:
            return "revoked"
        if now >= self.not_after:
            return "expired"
        if now < self.not_before:
            return "not yet valid"
        return None

    def pem_quoted(self) -> bytes:
        """The certificate as nginx's $ssl_client_escaped_cert: URL-encoded PEM."""
        pem = x509.load_der_x509_certificate(self.der).public_bytes(serialization.Encoding.PEM)
        return quote(pem.decode("ascii"), safe="").encode("ascii")


def peer_cert_of(transport: Any) -> PeerCert | None:
    """The verified client certificate of a TLS transport, or None."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return PeerCert.from_der(der) if der else None


def utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

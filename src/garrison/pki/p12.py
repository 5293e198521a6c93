"""PKCS#12 bundles for client certificates: what browsers and OS key stores import.

The bundle is encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) and MAC'd with
HMAC-SHA256, not the legacy RC2/3DES + SHA-1 that older tools default to: OpenSSL 3, macOS,
Windows 10+ and current browsers all read it.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

# PBKDF2 rounds for both the encryption and the MAC key. The bundle travels by mail and
# USB sticks, so it meets offline guessing; OWASP's 2023 figure for PBKDF2-HMAC-SHA256.
KDF_ROUNDS = 600_000


class P12Error(Exception):
    """The certificate, key or password cannot make a PKCS#12 bundle."""


def export_p12(
    cert_pem: bytes,
    key_pem: bytes,
    password: bytes,
    name: str,
    ca_pem: bytes | None = None,
) -> bytes:
    """Bundle a leaf, its key and the CA certificate(s) into an encrypted PKCS#12 file.

    `cert_pem` may already hold the chain (leaf first); certificates in `ca_pem` are added
    after it, so the importer also learns which root to trust for the gateway.
    """
    if not password:
        raise P12Error("a PKCS#12 password must not be empty")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
        cas = certs[1:] + (x509.load_pem_x509_certificates(ca_pem) if ca_pem else [])
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as exc:
        raise P12Error(f"cannot read certificate or key: {exc}") from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise P12Error(f"unsupported key type {type(key).__name__}")
    if key.public_key() != certs[0].public_key():
        raise P12Error("the key does not belong to the certificate")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"), key, certs[0], cas or None, encryption
    )

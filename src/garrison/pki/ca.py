"""The private certificate authority: one root key on disk, created once, that signs server certs.

The root signs leaves directly (no intermediate yet): one key to protect and one file for clients
to trust, which is what a self-hosted gateway needs (see docs/decisions.md, "PKI").
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from garrison.fsutil import FileLock, atomic_write, ensure_private_dir
from garrison.observe import metrics

CA_VALIDITY = dt.timedelta(days=3650)
MAX_SERVER_CERT_DAYS = 397  # CA/Browser Forum limit is 398; stay a day under it
CLOCK_SKEW = dt.timedelta(minutes=5)

_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")

SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class CAError(Exception):
    """The CA cannot be created, loaded or asked to issue what it was asked to issue."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serial() -> int:
    """Random positive serial of at most 159 bits (RFC 5280: ≤ 20 octets, positive)."""
    while True:
        serial = secrets.randbits(159)
        if serial:
            return serial


def _hash_for(key: SigningKey) -> hashes.HashAlgorithm | None:
    """Pick the digest matching the key's strength (Ed25519/Ed448 take none)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384() if key.curve.key_size <= 384 else hashes.SHA512()
    return hashes.SHA256()


def general_name(name: str) -> x509.GeneralName:
    """Turn a host name or IP literal into the SAN entry clients match against.

    IP literals become IPAddress entries (a DNSName "127.0.0.1" would not match an IP);
    DNS names are lower-cased and IDNA-encoded; an optional leading "*." wildcard is kept.
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    text = text.rstrip(".").lower()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise CAError(f"invalid host name {name!r}: {exc}") from None
    labels = ascii_name.split(".")
    if not ascii_name or len(ascii_name) > 253 or not all(_DNS_LABEL.match(x) for x in labels):
        raise CAError(f"invalid host name {name!r}")
    return x509.DNSName(("*." if wildcard else "") + ascii_name)


class CertificateAuthority:
    """A loaded root CA: its certificate (public) and its signing key (kept private)."""

    def __init__(
        self, cert: x509.Certificate, key: SigningKey, cert_path: Path, key_path: Path
    ) -> None:
        self.cert = cert
        self._key = key
        self.cert_path = cert_path
        self.key_path = key_path
        metrics.set_certificate_expiry("ca", cert.not_valid_after_utc)

    # ------------------------------------------------------------------ create / load
    @classmethod
    def load_or_create(
        cls, data_dir: Path, passphrase: bytes | None = None
    ) -> CertificateAuthority:
        """Load the CA under `data_dir/ca`, creating it exactly once across processes.

        The whole check-then-create runs under a FileLock, so workers starting together
        end up sharing one CA rather than overwriting each other's.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_dir = ensure_private_dir(data_dir / "ca")
        cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
        with FileLock(ca_dir / ".ca.lock"):
            if cert_path.exists():
                if not key_path.exists():
                    raise CAError(
                        f"CA certificate {cert_path} exists but its key {key_path} is missing; "
                        "restore the key (creating a new CA would invalidate every issued cert)"
                    )
                return cls._load(cert_path, key_path, passphrase)
            if key_path.exists():
                # Crash between the two writes: the key survived, so finish the job with it.
                key = _load_key(key_path, passphrase)
            else:
                key = ec.generate_private_key(ec.SECP384R1())
                atomic_write(key_path, _key_pem(key, passphrase), 0o600)
            cert = _self_signed_root(key)
            atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            return cls(cert, key, cert_path, key_path)

    @classmethod
    def _load(
        cls, cert_path: Path, key_path: Path, passphrase: bytes | None
    ) -> CertificateAuthority:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(f"cannot read CA certificate {cert_path}: {exc}") from None
        if key_path.stat().st_mode & 0o077:
            key_path.chmod(0o600)  # restored from a backup with a loose mode: tighten it
        key = _load_key(key_path, passphrase)
        if key.public_key() != cert.public_key():
            raise CAError(f"CA key {key_path} does not match certificate {cert_path}")
        return cls(cert, key, cert_path, key_path)

    # ------------------------------------------------------------------ queries
    def cert_pem(self) -> bytes:
        """The root certificate in PEM: what clients add to their trust store."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def fingerprint_sha256(self) -> str:
        """Hex SHA-256 of the root certificate, for users to compare out of band."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether `cert` carries a valid signature by this CA (not just a matching issuer name)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True

    # ------------------------------------------------------------------ issuing
    def issue_server_cert(
        self, hostnames: Sequence[str], days: int, *, now: dt.datetime | None = None
    ) -> tuple[bytes, bytes]:
        """Issue a TLS server certificate; return (leaf + CA chain PEM, unencrypted key PEM).

        P-256 leaf keys keep handshakes cheap. `days` is capped at 397 (browsers refuse more
        than 398); `now` lets tests mint certificates that are already old.
        """
        if not hostnames:
            raise CAError("a server certificate needs at least one host name")
        if not 1 <= days <= MAX_SERVER_CERT_DAYS:
            raise CAError(
                f"server certificate validity must be 1..{MAX_SERVER_CERT_DAYS} days, got {days}"
            )
        sans: list[x509.GeneralName] = []
        for name in hostnames:
            entry = general_name(name)
            if entry not in sans:
                sans.append(entry)
        now = now or _utcnow()
        not_before = now - CLOCK_SKEW
        # A leaf must not outlive its issuer: clients would reject it after the root expires.
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        if not_after <= now:
            raise CAError("the CA certificate has expired; create a new CA")

        key = ec.generate_private_key(ec.SECP256R1())
        first = sans[0]
        cn = str(first.value) if isinstance(first, x509.IPAddress) else first.value
        subject = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            if len(cn) <= 64
            else x509.Name([])
        )
        try:
            ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:  # an imported root without SKI
            ca_public = self._key.public_key()
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # SAN is critical only when the subject is empty (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(sans), critical=not len(subject))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(aki, False)
        )
        leaf = builder.sign(self._key, _hash_for(self._key))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem

    # ------------------------------------------------------------------ client certs, CRLs
    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI that leaves and CRLs carry, so verifiers find this root even after a rekey."""
        try:
            ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:  # an imported root without SKI
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())

    def issue_client_cert(
        self,
        public_key: ec.EllipticCurvePublicKey,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        days: int,
        *,
        extra: Sequence[x509.ExtensionType] = (),
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a TLS client certificate: EKU clientAuth only, so it can never serve a site.

        Refuses (rather than silently shortens) a validity that would outlive the root, so
        the operator learns the CA needs replacing before issuing certificates that cannot last.
        `extra` extensions are added non-critical (the role extension).
        """
        if not sans:
            raise CAError("a client certificate needs at least one subject alternative name")
        if days < 1:
            raise CAError(f"client certificate validity must be at least 1 day, got {days}")
        now = now or _utcnow()
        not_after = now + dt.timedelta(days=days)
        ca_end = self.cert.not_valid_after_utc
        if not_after > ca_end:
            left = max((ca_end - now).days, 0)
            raise CAError(
                f"{days} days would outlive the CA certificate (it expires "
                f"{ca_end:%Y-%m-%d}, {left} days from now)"
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=not len(subject))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(self.authority_key_identifier(), False)
        )
        for extension in extra:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(self._key, _hash_for(self._key))

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        """Sign a CRL whose issuer is this root (the root carries cRLSign)."""
        builder = builder.issuer_name(self.cert.subject).add_extension(
            self.authority_key_identifier(), False
        )
        return builder.sign(self._key, _hash_for(self._key))


# ---------------------------------------------------------------------- helpers
def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: SigningKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _load_key(key_path: Path, passphrase: bytes | None) -> SigningKey:
    """Read the CA key, turning every way it can fail into a CAError that says what to do."""
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read CA key {key_path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data, passphrase or None)
    except TypeError:
        # cryptography raises TypeError exactly for "password missing" / "password superfluous".
        if not passphrase:
            raise CAError(
                f"CA key {key_path} is encrypted: set GARRISON_CA_PASSPHRASE to its passphrase"
            ) from None
        raise CAError(
            f"a CA passphrase was given but CA key {key_path} is not encrypted; "
            "unset the passphrase or re-encrypt the key"
        ) from None
    except ValueError:
        if passphrase:
            raise CAError(
                f"wrong passphrase for CA key {key_path} (or the key is corrupt)"
            ) from None
        raise CAError(f"CA key {key_path} is not a readable PEM private key") from None
    except UnsupportedAlgorithm as exc:
        raise CAError(f"cannot load CA key {key_path}: {exc}") from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CAError(f"CA key {key_path} has an unsupported type {type(key).__name__}")
    return key


def _self_signed_root(key: SigningKey) -> x509.Certificate:
    """Build the 10-year root: CA with path_length=0 since it signs leaves directly."""
    now = _utcnow()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Garrison"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Garrison Local CA {secrets.token_hex(4)}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return builder.sign(key, _hash_for(key))


def read_passphrase_file(path: Path) -> bytes:
    """Read a CA passphrase from a file (first line, trailing newline dropped).

    A file keeps the passphrase out of the environment and shell history; an empty one is
    refused because it would silently leave the key unencrypted.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read passphrase file {path}: {exc}") from None
    passphrase = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not passphrase:
        raise CAError(f"passphrase file {path} is empty")
    return passphrase

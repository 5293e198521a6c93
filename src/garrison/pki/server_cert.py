"""Keep the gateway's own TLS certificate valid: issue it, check it, reissue it when needed.

Called at start and periodically; it is cheap when nothing changed and safe when several
workers call it at once (the decision and the writes happen under one FileLock).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from garrison.fsutil import FileLock, atomic_write, ensure_private_dir
from garrison.pki.ca import CertificateAuthority, general_name

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_REMAINING = dt.timedelta(days=1)


@dataclass(frozen=True)
class ServerCertificate:
    """Where the current server cert and key live, and what they cover."""

    cert_path: Path
    key_path: Path
    not_after: dt.datetime
    names: tuple[str, ...]
    reissued: bool


def wanted_names(hostnames: Sequence[str]) -> tuple[str, ...]:
    """Given names first (the first becomes the CN), then the loopback defaults, no duplicates.

    Names come back in their SAN form, so "LOCALHOST" and "localhost", or "::1" and
    "0:0::1", count once and read the way they appear in the certificate.
    """
    names: list[str] = []
    for name in (*hostnames, *DEFAULT_NAMES):
        entry = general_name(name)
        text = str(entry.value)
        if text not in names:
            names.append(text)
    return tuple(names)


def needs_renewal(cert: x509.Certificate, now: dt.datetime) -> bool:
    """True when less than a third of the lifetime (or less than a day) is left.

    A certificate not yet valid at `now` also needs renewal: it was minted under a wrong
    clock and clients would reject it.
    """
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < not_before:
        return True
    remaining = not_after - now
    return remaining < (not_after - not_before) / 3 or remaining < MIN_REMAINING


def _san_set(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(ext.value)


def _current(cert_path: Path, key_path: Path, ca: CertificateAuthority) -> x509.Certificate | None:
    """The existing leaf if it is readable, signed by `ca` and matches its key; else None."""
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    leaf = certs[0]
    if not ca.issued(leaf) or key.public_key() != leaf.public_key():
        return None
    return leaf


def ensure_server_certificate(
    data_dir: Path, ca: CertificateAuthority, hostnames: Sequence[str], days: int = 90
) -> ServerCertificate:
    """Return a usable server certificate under `data_dir/tls`, issuing a new one if needed.

    Reissues when the files are missing or unreadable, not signed by this CA, cover a
    different set of names, or are close to expiry (see `needs_renewal`).
    """
    names = wanted_names(hostnames)
    wanted = {general_name(n) for n in names}
    tls_dir = ensure_private_dir(Path(data_dir) / "tls")
    cert_path, key_path = tls_dir / "server.crt", tls_dir / "server.key"
    with FileLock(tls_dir / ".server.lock"):
        now = dt.datetime.now(dt.UTC)
        leaf = _current(cert_path, key_path, ca)
        if leaf is not None and _san_set(leaf) == wanted and not needs_renewal(leaf, now):
            return ServerCertificate(cert_path, key_path, leaf.not_valid_after_utc, names, False)
        chain_pem, key_pem = ca.issue_server_cert(names, days, now=now)
        # Key first: a reader that sees the new cert then finds its key already in place.
        atomic_write(key_path, key_pem, 0o600)
        atomic_write(cert_path, chain_pem, 0o600)
        leaf = x509.load_pem_x509_certificate(chain_pem)
        return ServerCertificate(cert_path, key_path, leaf.not_valid_after_utc, names, True)

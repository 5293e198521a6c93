"""The certificate the HTTPS listener serves right now, and swapping it without a restart.

`SSLContext.load_cert_chain` on the live context changes what new handshakes get; connections
already established keep their session, so a renewal drops nothing. The files are watched by
their stat signature (inode, size, mtime), which an atomic rename always changes, so
`[tls.files]` and a certificate renewed by another process (`garrison acme renew`, another
worker) are picked up within one watch interval.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from cryptography import x509

from garrison.observe import metrics
from garrison.pki.tls import reload_context

log = logging.getLogger("garrison")

Signature = tuple[int, int, int, int, int, int]


def signature(cert_path: Path, key_path: Path) -> Signature | None:
    try:
        a, b = os.stat(cert_path), os.stat(key_path)
    except OSError:
        return None
    return (a.st_ino, a.st_size, a.st_mtime_ns, b.st_ino, b.st_size, b.st_mtime_ns)


class LiveCertificate:
    """Which pair is loaded into `ctx`, and reloading it when asked or when it changed."""

    def __init__(self, ctx: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
        self.ctx = ctx
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.loaded = signature(self.cert_path, self.key_path)
        _expiry_metric(self.cert_path)
        self.refused: tuple[Path, Path, Signature | None] | None = None
        self.suspect: tuple[Path, Path, Signature | None] | None = None

    def use(self, cert_path: Path, key_path: Path) -> None:
        """Serve this pair from now on; raises TLSConfigError and keeps the old one if bad."""
        sig = signature(cert_path, key_path)
        reload_context(self.ctx, cert_path, key_path)
        self.cert_path, self.key_path, self.loaded = Path(cert_path), Path(key_path), sig
        self.refused = None
        log.info("server certificate loaded from %s (%s)", cert_path, describe(cert_path))
        _expiry_metric(cert_path)

    def want(self, cert_path: Path, key_path: Path) -> bool:
        """Serve this pair if it is not the loaded one or its files changed; True if reloaded.

        A pair that fails is retried once at the next call before it is reported: tools that
        rotate a key and then its certificate leave a mismatched pair for an instant. A pair
        that fails twice unchanged is reported once and not retried until the files change.
        """
        cert_path, key_path = Path(cert_path), Path(key_path)
        sig = signature(cert_path, key_path)
        same_pair = (cert_path, key_path) == (self.cert_path, self.key_path)
        if sig is None or (same_pair and sig == self.loaded):
            return False
        version = (cert_path, key_path, sig)
        if self.refused == version:
            return False
        try:
            self.use(cert_path, key_path)
        except Exception:
            if self.suspect != version:
                self.suspect = version  # maybe half-rotated: look again next time
                return False
            self.refused = version
            raise
        return True


def _expiry_metric(cert_path: Path) -> None:
    """garrison_certificate_expiry_timestamp_seconds{kind="server"}: what is served now."""
    try:
        leaf = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    except (OSError, ValueError):
        return
    metrics.set_certificate_expiry("server", leaf.not_valid_after_utc)


def describe(cert_path: Path) -> str:
    try:
        leaf = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    except (OSError, ValueError):
        return "unreadable"
    return f"serial {leaf.serial_number:x}, valid until {leaf.not_valid_after_utc.isoformat()}"

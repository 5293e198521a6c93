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

    def use(self, cert_path: Path, key_path: Path) -> None:
        """Serve this pair from now on; raises TLSConfigError and keeps the old one if bad."""
        sig = signature(cert_path, key_path)
        reload_context(self.ctx, cert_path, key_path)
        self.cert_path, self.key_path, self.loaded = Path(cert_path), Path(key_path), sig
        log.info("server certificate loaded from %s (%s)", cert_path, describe(cert_path))

    def reload_if_changed(self) -> bool:
        """Reload when the files changed since the last load; False when nothing changed."""
        sig = signature(self.cert_path, self.key_path)
        if sig is None or sig == self.loaded:
            return False
        self.use(self.cert_path, self.key_path)
        return True


def describe(cert_path: Path) -> str:
    try:
        leaf = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    except (OSError, ValueError):
        return "unreadable"
    return f"serial {leaf.serial_number:x}, valid until {leaf.not_valid_after_utc.isoformat()}"

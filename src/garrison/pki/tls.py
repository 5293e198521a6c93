"""Server-side TLS contexts: the two profiles, and hot certificate reload that cannot break them.

Profiles follow Mozilla's "intermediate" (TLS 1.2 + 1.3) and "modern" (TLS 1.3 only) guidance,
narrowed to forward-secret AEAD suites (DESIGN.md invariant 6).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

# TLS 1.2 only: ECDHE key exchange (forward secrecy) with AEAD ciphers. TLS 1.3 suites are all
# AEAD + (EC)DHE already and are left at OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
PROFILES: dict[str, tuple[ssl.TLSVersion, ssl.TLSVersion]] = {
    "intermediate": (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    "modern": (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
}
ALPN = ["http/1.1"]


class TLSConfigError(Exception):
    """A TLS profile, certificate or key cannot be used; the message says which file and why."""


# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake checks a client certificate's chain but
# not its dates; the HTTP layer checks those, so an expired certificate gets a readable answer
# and a log line instead of a silent reset.
NO_CHECK_TIME = 0x200000


def server_context(
    profile: str, cert_path: Path, key_path: Path, client_ca: Path | None = None
) -> ssl.SSLContext:
    """Build a server context for `profile` ("intermediate" or "modern") with the given pair.

    With `client_ca`, clients are asked for a certificate (optional at this layer: whether one
    is required is decided per request, where the refusal can be explained and logged).
    """
    try:
        minimum, maximum = PROFILES[profile]
    except KeyError:
        raise TLSConfigError(
            f"unknown TLS profile {profile!r}; expected one of {', '.join(PROFILES)}"
        ) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_NO_TICKET  # session tickets: cheap resumption for returning clients
    # TLS 1.3 sends 2 tickets per handshake by default; clients resume with one, and each
    # ticket is crypto work on every new connection (measured: 20-70 µs per handshake).
    ctx.num_tickets = 1
    ctx.set_alpn_protocols(ALPN)
    reload_context(ctx, cert_path, key_path)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"cannot load client CA bundle {client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.verify_flags |= NO_CHECK_TIME  # type: ignore[assignment]
    return ctx


def reload_context(ctx: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
    """Load a new cert/key pair into a live context; on any problem, leave it untouched.

    The files are read once and the same bytes are validated (in a throwaway context) and
    then loaded, so a file replaced in between cannot slip past validation. New handshakes
    get the new certificate; established connections keep theirs.
    """
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    _check_pair(cert_pem, key_pem, cert_path, key_path)
    with _as_file(cert_pem, cert_path) as cert_file, _as_file(key_pem, key_path) as key_file:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            probe.load_cert_chain(cert_file, key_file, password=_refuse_password)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(
                f"OpenSSL rejects certificate {cert_path} with key {key_path}: {exc}"
            ) from None
        ctx.load_cert_chain(cert_file, key_file, password=_refuse_password)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None


def _check_pair(cert_pem: bytes, key_pem: bytes, cert_path: Path, key_path: Path) -> None:
    """Give precise errors (OpenSSL's are terse): parseable chain, usable key, matching pair."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSConfigError(f"{cert_path} contains no valid PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except TypeError:
        raise TLSConfigError(
            f"private key {key_path} is encrypted; the server key must be stored unencrypted "
            "(0600 in a 0700 directory)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(f"{key_path} contains no valid PEM private key") from None
    if key.public_key() != certs[0].public_key():
        raise TLSConfigError(
            f"private key {key_path} does not match the certificate in {cert_path}"
        )


def _refuse_password() -> bytes:
    """Stop OpenSSL from prompting on a terminal for an encrypted key (it would hang a server)."""
    raise TLSConfigError("the TLS private key is encrypted; no passphrase is configured")


@contextlib.contextmanager
def _as_file(data: bytes, original: Path) -> Iterator[str]:
    """Expose `data` as a path OpenSSL can open, without writing key material to disk.

    Uses an anonymous memory file (Linux memfd via /proc/self/fd); elsewhere falls back to
    the original path, accepting the small window between validation and loading.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None or not os.path.isdir("/proc/self/fd"):
        yield str(original)
        return
    fd = memfd_create("garrison-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

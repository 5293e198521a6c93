"""Certificate revocation lists: the internal CA's own, and external ones to trust.

The internal CA's CRL is for other software (nginx, a second gateway, `openssl verify
-crl_check`); Garrison itself checks its in-memory set of revoked serials. A CRL from an
external CA (`ca = "/path/bundle.pem"` mode) is only believed after its signature verifies
against one of the configured issuers and while it is current: a stale or forged CRL would
silently un-revoke certificates.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import REVOCATION_REASONS, IssuedCert

CRL_VALIDITY = dt.timedelta(days=1)
CLOCK_SKEW = dt.timedelta(minutes=5)


class CRLError(Exception):
    """A CRL cannot be read, is not signed by a trusted issuer, or is out of date."""


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def build_crl(
    ca: CertificateAuthority,
    revoked: list[IssuedCert],
    now: float | None = None,
    number: int | None = None,
) -> bytes:
    """Sign a CRL (PEM) listing `revoked` as of `now`; entries revoked later are left out.

    thisUpdate is now and nextUpdate a day later, so consumers notice a publisher that
    stopped. `number` must increase from one CRL to the next (RFC 5280 §5.2.3); without one
    the time in seconds is used, which is enough for one CRL per second from one clock.
    `ClientCerts.crl()` keeps a counter in the store instead.
    """
    now = time.time() if now is None else now
    when = _utc(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .last_update(when)
        .next_update(when + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(int(now) if number is None else number), False)
    )
    for cert in revoked:
        if cert.revoked_at is None or cert.revoked_at > now:
            continue
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial)
            .revocation_date(_utc(cert.revoked_at))
        )
        reason = REVOCATION_REASONS.get(cert.revoke_reason or "unspecified")
        # RFC 5280 §5.3.1: leave reasonCode out rather than say "unspecified".
        if reason is not None and reason is not x509.ReasonFlags.unspecified:
            entry = entry.add_extension(x509.CRLReason(reason), False)
        builder = builder.add_revoked_certificate(entry.build())
    return ca.sign_crl(builder).public_bytes(serialization.Encoding.PEM)


def _parse(data: bytes) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CRLError(f"not a readable CRL (PEM or DER): {exc}") from None


def load_crl(path_or_bytes: Path | str | bytes) -> frozenset[int]:
    """Serials listed in a CRL (PEM or DER), *without* checking who signed it.

    Only for the internal CA's own CRL read back from our data dir; a CRL from anywhere
    else goes through `revoked_serials_from_crl`.
    """
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        try:
            data = Path(path_or_bytes).read_bytes()
        except OSError as exc:
            raise CRLError(f"cannot read CRL {path_or_bytes}: {exc}") from None
    return frozenset(entry.serial_number for entry in _parse(data))


def revoked_serials_from_crl(
    crl_pem_or_der: bytes, issuers: list[x509.Certificate], now: float | None = None
) -> frozenset[int]:
    """Serials revoked by an external CRL, once it is proven genuine and current.

    Refuses (CRLError) a CRL whose issuer name and signature match none of `issuers`, whose
    issuer may not sign CRLs (keyUsage without cRLSign), that has no nextUpdate or is past it,
    or whose thisUpdate lies in the future. Serials are per issuer: pass only the issuers of
    the client certificates this set will be checked against.
    """
    crl = _parse(crl_pem_or_der)
    signer = None
    for issuer in issuers:
        if issuer.subject != crl.issuer:
            continue
        try:
            if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                continue
        except (TypeError, ValueError, InvalidSignature, UnsupportedAlgorithm):
            continue
        signer = issuer
        break
    if signer is None:
        raise CRLError(
            f"CRL issued by {crl.issuer.rfc4514_string()!r} is not signed by any trusted CA"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            raise CRLError(f"CA {signer.subject.rfc4514_string()!r} may not sign CRLs (keyUsage)")
    except x509.ExtensionNotFound:
        pass
    when = _utc(time.time() if now is None else now)
    next_update = crl.next_update_utc
    if next_update is None:
        raise CRLError("CRL has no nextUpdate: cannot tell whether it is current")
    if when > next_update:
        raise CRLError(f"CRL is out of date: its nextUpdate was {next_update:%Y-%m-%d %H:%M} UTC")
    if crl.last_update_utc > when + CLOCK_SKEW:
        raise CRLError(f"CRL thisUpdate {crl.last_update_utc:%Y-%m-%d %H:%M} UTC is in the future")
    return frozenset(entry.serial_number for entry in crl)

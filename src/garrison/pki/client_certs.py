"""Client certificates issued by the internal CA: issue, list, revoke, renew (issue 4).

A client certificate is an identity (CN = user name, roles, email) the gateway can trust
without a password. Every issued certificate is recorded in the store (`client_certs`, never
its key); revocation is a timestamp on that row, which the gateway turns into an in-memory
set (`revoked_serials`) and the CRL (`crl.py`).

Crash safety: `issue` and `renew` commit the store row (with a `cert` event) *before* they
return the key, so before the CLI writes any file. A `kill -9` in between leaves at worst a
row for a certificate nobody holds: harmless (nobody can present it) and visible in
`garrison cert list`, where it can be revoked. The reverse order could leave a usable
certificate the store does not know about, which could then never be revoked by name.

Revocation may be scheduled: `renew --grace` stores the old certificate's `revoked_at` in the
future, and "revoked" always means `revoked_at <= now`, so the grace ends without any job.

Times are UTC seconds since the epoch (floats), as everywhere in the store.
"""

from __future__ import annotations

import builtins
import datetime as dt
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection, Engine, select, update

from garrison.pki.ca import CAError, CertificateAuthority
from garrison.pki.p12 import P12Error, export_p12
from garrison.store.db import client_certs, settings
from garrison.store.events import publish

__all__ = [
    "MAX_ROLES",
    "REVOCATION_REASONS",
    "ROLE_EXTENSION_OID",
    "CertError",
    "ClientCerts",
    "IssuedCert",
    "P12Error",
    "UnknownCert",
    "decode_roles",
    "encode_roles",
    "export_p12",
]

# Private X.509 extension listing the holder's roles as a DER SEQUENCE OF UTF8String.
# The OID is 2.25.<UUID as an integer> (ITU-T X.667 / RFC 4122 §3: no registration needed),
# from UUID 410d2e38-d989-4ce0-8a5a-9908fcdd2553, minted for Garrison. Non-critical: other
# software ignores it; the roles are also in the subject as one OU each (nginx
# $ssl_client_s_dn, tools that only read the DN).
ROLE_EXTENSION_OID = x509.ObjectIdentifier("2.25.86468257080123586283972665885729826131")

NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # as user names (auth/users.py)
ROLE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # as user roles (auth/users.py)
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
MAX_ROLES = 32
MAX_EMAIL = 320
URI_PREFIX = "urn:garrison:user:"

# RFC 5280 §5.3.1 reason names accepted for revocation.
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
}

_CRL_NUMBER_SETTING = "crl_number"


class CertError(Exception):
    """A certificate operation was refused; the text says why."""


class UnknownCert(CertError, KeyError):
    """No certificate has this name or serial."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """What the store knows about an issued client certificate (never its key)."""

    serial: int
    name: str
    email: str | None
    roles: tuple[str, ...]
    fingerprint: str  # SHA-256 of the DER, lower-case hex
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None
    revoke_reason: str | None
    replaced_by: str | None  # serial hex of the certificate that renewed this one

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def revoked(self, now: float) -> bool:
        return self.revoked_at is not None and self.revoked_at <= now

    def status(self, now: float | None = None) -> str:
        """active, revoked, expired or pending-revocation (revoked at a future time)."""
        now = time.time() if now is None else now
        if self.revoked(now):
            return "revoked"
        if self.not_after <= now:
            return "expired"
        if self.revoked_at is not None:
            return "pending-revocation"
        return "active"


def encode_roles(roles: Sequence[str]) -> bytes:
    """DER SEQUENCE OF UTF8String: the role extension's value."""
    items = b"".join(b"\x0c" + _der_length(len(r.encode())) + r.encode() for r in roles)
    return b"\x30" + _der_length(len(items)) + items


def decode_roles(data: bytes) -> list[str] | None:
    """Parse the role extension strictly (DER, definite minimal lengths); None if malformed.

    Hand-written because the value is tiny and fixed; never raises, since it reads what
    a client presents.
    """
    try:
        body, rest = _der_take(data, 0x30)
        if rest:
            return None
        roles: list[str] = []
        while body:
            value, body = _der_take(body, 0x0C)
            roles.append(value.decode("utf-8"))
        return roles
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_take(data: bytes, tag: int) -> tuple[bytes, bytes]:
    """Split one TLV of `tag` off `data`; ValueError on anything but minimal DER."""
    if len(data) < 2 or data[0] != tag:
        raise ValueError("unexpected tag")
    first = data[1]
    if first < 0x80:
        length, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count or data[2] == 0:
            raise ValueError("bad length")
        length, start = int.from_bytes(data[2 : 2 + count], "big"), 2 + count
        if length < 0x80:
            raise ValueError("non-minimal length")
    end = start + length
    if end > len(data):
        raise ValueError("truncated")
    return data[start:end], data[end:]


def parse_serial(text: str) -> int | None:
    """A serial as `garrison cert list` prints it (hex; colons and 0x tolerated)."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    if not cleaned or len(cleaned) > 40 or not re.fullmatch(r"[0-9a-f]+", cleaned):
        return None
    return int(cleaned, 16) or None


def _row(row: Any) -> IssuedCert:
    return IssuedCert(
        serial=int(row.serial, 16),
        name=row.name,
        email=row.email,
        roles=tuple(row.roles or ()),
        fingerprint=row.fingerprint,
        not_before=float(row.not_before),
        not_after=float(row.not_after),
        issued_at=float(row.issued_at),
        revoked_at=None if row.revoked_at is None else float(row.revoked_at),
        revoke_reason=row.revoke_reason,
        replaced_by=row.replaced_by,
    )


def _validate(name: str, email: str | None, roles: Iterable[str]) -> tuple[str, ...]:
    if not NAME_RE.fullmatch(name):
        raise CertError(f"invalid name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    if email is not None and (len(email) > MAX_EMAIL or not EMAIL_RE.fullmatch(email)):
        raise CertError(f"invalid email address {email!r}")
    unique: list[str] = []
    for role in roles:
        if not ROLE_RE.fullmatch(role):
            raise CertError(f"invalid role {role!r}: use 1-64 of A-Z a-z 0-9 _ . : -")
        if role not in unique:
            unique.append(role)
    if len(unique) > MAX_ROLES:
        raise CertError(f"at most {MAX_ROLES} roles per certificate")
    return tuple(unique)


class ClientCerts:
    """Issue and track client certificates in the store. Not on the request path."""

    def __init__(self, engine: Engine, ca: CertificateAuthority) -> None:
        self.engine = engine
        self.ca = ca

    # ------------------------------------------------------------------ issuing
    def issue(
        self,
        name: str,
        email: str | None = None,
        roles: Iterable[str] = (),
        days: int = 365,
        now: float | None = None,
    ) -> tuple[IssuedCert, bytes, bytes]:
        """Issue a certificate; return (record, cert PEM, unencrypted key PEM).

        The row is committed before this returns, so before any file exists (module doc).
        """
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            record, cert_pem, key_pem = self._issue(conn, name, email, roles, days, now)
        return record, cert_pem, key_pem

    def _issue(
        self,
        conn: Connection,
        name: str,
        email: str | None,
        roles: Iterable[str],
        days: int,
        now: float,
    ) -> tuple[IssuedCert, bytes, bytes]:
        role_tuple = _validate(name, email, roles)
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in role_tuple]
        # Email only as an rfc822Name SAN (RFC 5280 §4.1.2.6 deprecates emailAddress in the
        # DN); without one a URN SAN, so every certificate has a SAN to match on.
        sans: list[x509.GeneralName] = (
            [x509.RFC822Name(email)]
            if email
            else [x509.UniformResourceIdentifier(URI_PREFIX + name)]
        )
        extra: list[x509.ExtensionType] = []
        if role_tuple:
            extra.append(x509.UnrecognizedExtension(ROLE_EXTENSION_OID, encode_roles(role_tuple)))
        try:
            cert = self.ca.issue_client_cert(
                key.public_key(),
                x509.Name(attributes),
                sans,
                days,
                extra=extra,
                now=dt.datetime.fromtimestamp(now, dt.UTC),
            )
        except CAError as exc:
            raise CertError(str(exc)) from None
        record = IssuedCert(
            serial=cert.serial_number,
            name=name,
            email=email,
            roles=role_tuple,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            issued_at=now,
            revoked_at=None,
            revoke_reason=None,
            replaced_by=None,
        )
        conn.execute(
            client_certs.insert().values(
                serial=record.serial_hex,
                name=name,
                email=email,
                roles=list(role_tuple),
                fingerprint=record.fingerprint,
                not_before=record.not_before,
                not_after=record.not_after,
                issued_at=now,
            )
        )
        publish(conn, "cert", record.serial_hex, now)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return record, cert.public_bytes(serialization.Encoding.PEM), key_pem

    def renew(
        self,
        name: str,
        grace_seconds: float = 0.0,
        days: int = 365,
        now: float | None = None,
    ) -> tuple[IssuedCert, bytes, bytes]:
        """Issue a new certificate with the identity of the newest live one named `name`.

        Every usable certificate of that name gets `replaced_by` and is revoked as superseded
        at now + grace (scheduled, so both work during the grace; an earlier scheduled time
        is kept). One transaction.
        """
        now = time.time() if now is None else now
        if grace_seconds < 0:
            raise CertError("grace period must not be negative")
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(client_certs)
                .where(client_certs.c.name == name)
                .order_by(client_certs.c.issued_at.desc())
            ).all()
            # Pending ones (inside an earlier grace) are still usable, so they are replaced too.
            usable = [r for r in map(_row, rows) if not r.revoked(now) and r.not_after > now]
            if not rows:
                raise UnknownCert(f"no client certificate named {name!r}")
            if not usable:
                raise CertError(
                    f"no live certificate named {name!r} to renew: use `garrison cert issue`"
                )
            newest = usable[0]
            record, cert_pem, key_pem = self._issue(
                conn, name, newest.email, newest.roles, days, now
            )
            until = now + grace_seconds
            for old in usable:
                revoke_at = until if old.revoked_at is None else min(old.revoked_at, until)
                conn.execute(
                    update(client_certs)
                    .where(client_certs.c.serial == old.serial_hex)
                    .values(
                        replaced_by=old.replaced_by or record.serial_hex,
                        revoked_at=revoke_at,
                        revoke_reason=old.revoke_reason or "superseded",
                    )
                )
                publish(conn, "cert", old.serial_hex, now)
        return record, cert_pem, key_pem

    # ------------------------------------------------------------------ revocation
    def revoke(
        self, name_or_serial: str, reason: str = "unspecified", at: float | None = None
    ) -> builtins.list[IssuedCert]:
        """Revoke by name (every live certificate of that name) or by serial (hex).

        A name wins over a serial that looks the same. Returns the certificates this call
        revoked or moved to an earlier revocation time; repeating it changes nothing.
        """
        if reason not in REVOCATION_REASONS:
            raise CertError(
                f"invalid reason {reason!r}: use one of {', '.join(REVOCATION_REASONS)}"
            )
        at = time.time() if at is None else at
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(client_certs).where(client_certs.c.name == name_or_serial)
            ).all()
            if not rows:
                serial = parse_serial(name_or_serial)
                if serial is not None:
                    rows = conn.execute(
                        select(client_certs).where(client_certs.c.serial == format(serial, "x"))
                    ).all()
                if not rows:
                    raise UnknownCert(
                        f"no client certificate with name or serial {name_or_serial!r}"
                    )
                targets = [_row(r) for r in rows]  # a serial is revoked even if expired
            else:
                targets = [c for c in map(_row, rows) if c.not_after > at]
            changed: list[IssuedCert] = []
            for cert in targets:
                if cert.revoked_at is not None and cert.revoked_at <= at:
                    continue  # already revoked: keep the first time and reason
                conn.execute(
                    update(client_certs)
                    .where(client_certs.c.serial == cert.serial_hex)
                    .values(revoked_at=at, revoke_reason=reason)
                )
                publish(conn, "cert", cert.serial_hex, at)
                changed.append(
                    IssuedCert(**{**_asdict(cert), "revoked_at": at, "revoke_reason": reason})
                )
        return changed

    def revoked_serials(self, now: float | None = None) -> frozenset[int]:
        """Serials revoked at `now`: the gateway's in-memory set, reloaded on `cert` events."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(client_certs.c.serial).where(client_certs.c.revoked_at <= now)
            ).all()
        return frozenset(int(r.serial, 16) for r in rows)

    def revoked(self, now: float | None = None) -> builtins.list[IssuedCert]:
        """Certificates revoked at `now`, for the CRL."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(client_certs)
                .where(client_certs.c.revoked_at <= now)
                .order_by(client_certs.c.revoked_at)
            ).all()
        return [_row(r) for r in rows]

    def crl(self, now: float | None = None) -> bytes:
        """The current CRL (PEM) with a CRL number that only ever increases (kept in settings)."""
        from garrison.pki.crl import build_crl  # crl.py imports this module

        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            row = conn.execute(
                select(settings.c.value).where(settings.c.name == _CRL_NUMBER_SETTING)
            ).first()
            previous = int(row.value) if row is not None else 0
            # Time-based when the clock is sane, +1 when it went backwards or two came at once.
            number = max(previous + 1, int(now))
            if row is None:
                conn.execute(settings.insert().values(name=_CRL_NUMBER_SETTING, value=str(number)))
            else:
                conn.execute(
                    update(settings)
                    .where(settings.c.name == _CRL_NUMBER_SETTING)
                    .values(value=str(number))
                )
            rows = conn.execute(select(client_certs).where(client_certs.c.revoked_at <= now)).all()
        return build_crl(self.ca, [_row(r) for r in rows], now, number=number)

    # ------------------------------------------------------------------ queries
    def list(
        self, expiring_within: float | None = None, now: float | None = None
    ) -> builtins.list[IssuedCert]:
        """All certificates by name then issue time; with `expiring_within` (seconds), only
        those still valid, not being revoked, and expiring within that window."""
        now = time.time() if now is None else now
        query = select(client_certs).order_by(client_certs.c.name, client_certs.c.issued_at)
        if expiring_within is not None:
            query = query.where(
                client_certs.c.revoked_at.is_(None),
                client_certs.c.not_after > now,
                client_certs.c.not_after <= now + expiring_within,
            )
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query).all()]

    def get(self, name_or_serial: str) -> IssuedCert:
        """The newest certificate of a name, else the certificate with that serial."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(client_certs)
                .where(client_certs.c.name == name_or_serial)
                .order_by(client_certs.c.issued_at.desc())
                .limit(1)
            ).first()
            if row is None:
                serial = parse_serial(name_or_serial)
                if serial is not None:
                    row = conn.execute(
                        select(client_certs).where(client_certs.c.serial == format(serial, "x"))
                    ).first()
        if row is None:
            raise UnknownCert(f"no client certificate with name or serial {name_or_serial!r}")
        return _row(row)

    def known(self, serial: int) -> IssuedCert | None:
        """The record for a serial the gateway saw in a handshake, if this CA issued it."""
        if serial <= 0:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(client_certs).where(client_certs.c.serial == format(serial, "x"))
            ).first()
        return None if row is None else _row(row)


def _asdict(cert: IssuedCert) -> dict[str, Any]:
    return {field: getattr(cert, field) for field in IssuedCert.__dataclass_fields__}

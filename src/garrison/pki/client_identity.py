"""Who a verified client certificate names: user name, email, roles, for identity headers.

Runs on certificates that already passed chain verification, but their contents are still
whatever the issuer (possibly an external CA) put there, and they end up in HTTP headers and
authorization decisions. So every value is validated against the same rules as user names
and roles, and anything doubtful yields *no* identity (or drops the doubtful role), never a
cleaned-up guess: "alice\\n" is not "alice". It never raises, whatever the certificate holds.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from garrison.pki.client_certs import (
    EMAIL_RE,
    MAX_EMAIL,
    MAX_ROLES,
    NAME_RE,
    ROLE_EXTENSION_OID,
    ROLE_RE,
    decode_roles,
)

MAX_DN = 1024


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """The identity a client certificate asserts; `dn` is header-safe and at most 1024 chars."""

    name: str
    email: str | None
    roles: tuple[str, ...]
    serial: int
    fingerprint: str  # SHA-256 of the DER, lower-case hex
    dn: str


def identity_from_cert(cert: x509.Certificate) -> CertIdentity | None:
    """The identity in `cert`, or None when it names no one unambiguously and validly."""
    try:
        with warnings.catch_warnings():
            # cryptography warns about over-long attributes: a client's choice, not our bug.
            warnings.simplefilter("ignore")
            return _identity(cert)
    except Exception:  # a hostile certificate must cost an identity, not a 500
        return None


def _identity(cert: x509.Certificate) -> CertIdentity | None:
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    name = cns[0].value
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None

    roles: list[str] = []

    def add_role(role: object) -> None:
        if isinstance(role, str) and ROLE_RE.fullmatch(role) and role not in roles:
            roles.append(role)

    for attribute in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        add_role(attribute.value)

    email: str | None = None
    try:
        extensions = cert.extensions
    except ValueError:
        return None  # a malformed known extension: no trustworthy reading of this cert
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName) and email is None:
            for candidate in value.get_values_for_type(x509.RFC822Name):
                if _valid_email(candidate):
                    email = candidate
                    break
        elif extension.oid == ROLE_EXTENSION_OID and isinstance(value, x509.UnrecognizedExtension):
            for role in decode_roles(value.value) or ():
                add_role(role)
    if email is None:
        for attribute in subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            if _valid_email(attribute.value):
                email = str(attribute.value)
                break

    return CertIdentity(
        name=name,
        email=email,
        roles=tuple(roles[:MAX_ROLES]),
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        dn=_header_safe(subject.rfc4514_string()),
    )


def _valid_email(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_EMAIL and bool(EMAIL_RE.fullmatch(value))


_LINE_BREAKS = re.compile("[\u2028\u2029]")


def _header_safe(text: str) -> str:
    """Drop control characters (CR, LF, NUL, C1...) and cap the length: it becomes a header."""
    cleaned = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
    return _LINE_BREAKS.sub("", cleaned)[:MAX_DN]

"""Identity from a client certificate: exact values or nothing, and never an exception.

The property test builds real certificates (cryptography) from generated subjects, SANs and
role extensions, including control characters, unicode, huge DNs and malformed DER.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import (
    EMAIL_RE,
    NAME_RE,
    ROLE_EXTENSION_OID,
    ROLE_RE,
    ClientCerts,
    decode_roles,
    encode_roles,
)
from garrison.pki.client_identity import MAX_DN, CertIdentity, identity_from_cert
from garrison.store.db import default_url, open_store

# Building over-long attributes on purpose makes cryptography warn; that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime.now(dt.UTC)


def _cert(
    attributes: Sequence[tuple[x509.ObjectIdentifier, str]],
    sans: Sequence[x509.GeneralName] = (),
    roles_der: bytes | None = None,
    serial: int = 4242,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(oid, v, _validate=False) for oid, v in attributes])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    if roles_der is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ROLE_EXTENSION_OID, roles_der), False
        )
    return builder.sign(KEY, hashes.SHA256())


CN, OU, EMAIL = NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.EMAIL_ADDRESS


def test_issued_certificate_roundtrip(tmp_path: object) -> None:
    from pathlib import Path

    data_dir = Path(str(tmp_path))
    ca = CertificateAuthority.load_or_create(data_dir)
    engine = open_store(default_url(data_dir))
    try:
        record, pem, _ = ClientCerts(engine, ca).issue(
            "alice@corp", email="alice@example.com", roles=["admin", "team:ml"]
        )
    finally:
        engine.dispose()
    cert = x509.load_pem_x509_certificate(pem)
    identity = identity_from_cert(cert)
    assert identity == CertIdentity(
        name="alice@corp",
        email="alice@example.com",
        roles=("admin", "team:ml"),
        serial=record.serial,
        fingerprint=record.fingerprint,
        dn="OU=team:ml,OU=admin,CN=alice@corp",
    )


def test_no_identity_without_exactly_one_valid_cn() -> None:
    assert identity_from_cert(_cert([])) is None
    assert identity_from_cert(_cert([(OU, "admin")])) is None
    assert identity_from_cert(_cert([(CN, "alice"), (CN, "bob")])) is None
    for bad in ("alice\n", "al ice", "alïce", "x" * 65, "a\x00", "alice\r\nX-Admin: 1"):
        assert identity_from_cert(_cert([(CN, bad)])) is None, bad


def test_email_prefers_san_then_subject() -> None:
    sans = [x509.RFC822Name("not valid"), x509.RFC822Name("a@example.com")]
    cert = _cert([(CN, "a"), (EMAIL, "b@example.com")], sans)
    assert identity_from_cert(cert).email == "a@example.com"  # type: ignore[union-attr]
    cert = _cert([(CN, "a"), (EMAIL, "b@example.com")], [x509.DNSName("x.example")])
    assert identity_from_cert(cert).email == "b@example.com"  # type: ignore[union-attr]
    cert = _cert([(CN, "a"), (EMAIL, "b@exa\nmple.com")])
    assert identity_from_cert(cert).email is None  # type: ignore[union-attr]


def test_roles_from_ou_and_extension_invalid_dropped_capped() -> None:
    cert = _cert(
        [(CN, "a"), (OU, "admin"), (OU, "bad role"), (OU, "ops")],
        roles_der=encode_roles(["ops", "ml", "é", "x" * 65]),
    )
    assert identity_from_cert(cert).roles == ("admin", "ops", "ml")  # type: ignore[union-attr]
    malformed = _cert([(CN, "a"), (OU, "admin")], roles_der=b"\x30\x05\x0c\x01a")
    assert identity_from_cert(malformed).roles == ("admin",)  # type: ignore[union-attr]
    many = _cert([(CN, "a")], roles_der=encode_roles([f"r{i}" for i in range(100)]))
    assert identity_from_cert(many).roles == tuple(f"r{i}" for i in range(32))  # type: ignore[union-attr]


def test_huge_dn_and_many_sans_do_not_break_anything() -> None:
    attributes = [(CN, "alice")] + [(OU, f"unit-{i}-" + "x" * 40) for i in range(250)]
    sans = [x509.DNSName(f"h{i}.example") for i in range(499)] + [x509.RFC822Name("a@b.example")]
    identity = identity_from_cert(_cert(attributes, sans))
    assert identity is not None
    assert len(identity.dn) == MAX_DN
    assert identity.email == "a@b.example"
    assert len(identity.roles) == 32


def test_dn_is_header_safe() -> None:
    cert = _cert([(CN, "alice"), (OU, "evil\r\nX-Garrison-User: root\x00\x85\u2028")])
    identity = identity_from_cert(cert)
    assert identity is not None
    assert all(unicodedata.category(ch) != "Cc" for ch in identity.dn)
    assert "\u2028" not in identity.dn
    assert identity.roles == ()


_OIDS = st.sampled_from([CN, OU, EMAIL, NameOID.ORGANIZATION_NAME, NameOID.SERIAL_NUMBER])
_VALUES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.@:-]{1,70}", fullmatch=True),
    st.text(min_size=1, max_size=80),
    st.from_regex(EMAIL_RE, fullmatch=True),
)
_ASCII = st.text(st.characters(max_codepoint=127), min_size=1, max_size=60)
# _init_without_validation: whatever another CA may have put there, not what we would build.
_SAN = st.one_of(
    _ASCII.map(x509.RFC822Name._init_without_validation),
    st.from_regex(EMAIL_RE, fullmatch=True).map(x509.RFC822Name),
    st.from_regex(r"[a-z0-9]{1,20}\.example", fullmatch=True).map(x509.DNSName),
    _ASCII.map(x509.UniformResourceIdentifier._init_without_validation),
)
_ROLES_DER = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.lists(st.text(max_size=70), max_size=40).map(encode_roles),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attributes=st.lists(st.tuples(_OIDS, _VALUES), max_size=12),
    sans=st.lists(_SAN, max_size=8),
    roles_der=_ROLES_DER,
    serial=st.integers(min_value=1, max_value=2**159),
)
def test_any_certificate_gives_valid_values_or_nothing(
    attributes: list[tuple[x509.ObjectIdentifier, str]],
    sans: list[x509.GeneralName],
    roles_der: bytes | None,
    serial: int,
) -> None:
    try:
        cert = _cert(attributes, sans, roles_der, serial)
    except (ValueError, TypeError):
        assume(False)  # cryptography refused to build it: not a certificate anyone holds
        return
    identity = identity_from_cert(cert)  # must not raise
    if identity is None:
        return
    cns = [v for oid, v in attributes if oid == CN]
    assert cns == [identity.name] and NAME_RE.fullmatch(identity.name)
    if identity.email is not None:
        present = [v for oid, v in attributes if oid == EMAIL]
        present += [str(s.value) for s in sans if isinstance(s, x509.RFC822Name)]
        assert identity.email in present and EMAIL_RE.fullmatch(identity.email)
    candidates = {v for oid, v in attributes if oid == OU}
    candidates |= set(decode_roles(roles_der) or []) if roles_der is not None else set()
    assert set(identity.roles) <= candidates
    assert all(ROLE_RE.fullmatch(r) for r in identity.roles)
    assert len(identity.roles) == len(set(identity.roles)) <= 32
    assert identity.serial == serial
    assert len(identity.dn) <= MAX_DN
    assert all(unicodedata.category(ch) != "Cc" for ch in identity.dn)

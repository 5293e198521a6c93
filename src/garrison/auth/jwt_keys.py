"""Verification keys of external JWT issuers: JWKS documents, PEM keys and certificates, HMAC
secrets. Each key is bound to exactly one algorithm here, from the key itself and the issuer's
configured list (DESIGN §5.4): a token's `alg` header never chooses it. Symmetric keys come only
from a secret file, never from a JWKS, so a public key can never become an HMAC secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = logging.getLogger("garrison")

_EC_CURVES = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_EC_KEY_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class Key:
    alg: str
    key: Any  # a cryptography public key, or bytes for an HMAC secret


def alg_for_public_key(key: Any, allowed: Sequence[str]) -> str | None:
    """The one configured algorithm this key can verify, or None if none or several fit."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            return None
        fits = [a for a in allowed if a[:2] in ("RS", "PS")]
    elif isinstance(key, ec.EllipticCurvePublicKey):
        fits = [a for a in allowed if a == _EC_KEY_CURVES.get(key.curve.name)]
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        fits = [a for a in allowed if a == "EdDSA"]
    else:
        fits = []
    return fits[0] if len(fits) == 1 else None


def jwk_key(jwk: Any, allowed: Sequence[str]) -> tuple[str | None, Key] | None:
    """One JWK as (kid, key), or None to ignore it. Symmetric ("oct") keys are never taken
    from a JWKS: HMAC keys come only from secret_file."""
    if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in allowed):
        return None
    if alg is None:
        crv = jwk.get("crv")
        if jwk["kty"] == "RSA":
            fits = [a for a in allowed if a[:2] in ("RS", "PS")]
        elif jwk["kty"] == "EC":
            fits = [a for a in allowed if a == _EC_CURVES.get(crv)]
        else:
            fits = [a for a in allowed if a == "EdDSA" and crv in ("Ed25519", "Ed448")]
        if len(fits) != 1:
            return None
        alg = fits[0]
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    # The key itself must fit its algorithm (curve, RSA size), whatever the JWK claims.
    if alg_for_public_key(key, [alg]) != alg:
        return None
    return kid, Key(alg, key)


def jwks_keys(doc: Any, allowed: Sequence[str], issuer: str) -> dict[str | None, Key]:
    """The usable keys of a JWKS document (or of a single JWK); unusable ones are logged."""
    entries = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(entries, list):
        raise ValueError("not a JWKS document")
    keys: dict[str | None, Key] = {}
    for entry in entries:
        found = jwk_key(entry, allowed)
        if found is None:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            log.info("jwt issuer %s: ignoring key %r (unusable with %s)", issuer, kid, allowed)
            continue
        kid, key = found
        if kid in keys:
            raise ValueError(f"kid {kid!r} appears twice")
        keys[kid] = key
    return keys


def load_key_file(path: Path, allowed: Sequence[str], issuer: str) -> dict[str | None, Key]:
    """A PEM public key or certificate, or a JWKS JSON file. Config mistakes raise ValueError."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        keys = jwks_keys(json.loads(data), allowed, issuer)
        if not keys:
            raise ValueError(f"jwt issuer {issuer!r}: {path} has no key usable with {allowed}")
        return keys
    if b"-----BEGIN CERTIFICATE-----" in data:
        key: Any = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = load_pem_public_key(data)
    alg = alg_for_public_key(key, allowed)
    if alg is None:
        raise ValueError(
            f"jwt issuer {issuer!r}: the key in {path} fits none or several of {allowed}"
            " (RSA keys need 2048 bits or more; list exactly one algorithm for the key)"
        )
    return {None: Key(alg, key)}


def load_secret(path: Path, allowed: Sequence[str], issuer: str) -> dict[str | None, Key]:
    """An HMAC secret (surrounding whitespace stripped), bound to the one configured HS*."""
    if len(allowed) != 1 or allowed[0] not in _HMAC_MIN_BYTES:
        raise ValueError(f"jwt issuer {issuer!r}: secret_file needs exactly one HS* algorithm")
    secret = path.read_bytes().strip()
    if len(secret) < _HMAC_MIN_BYTES[allowed[0]]:
        raise ValueError(
            f"jwt issuer {issuer!r}: {allowed[0]} needs a secret of at least "
            f"{_HMAC_MIN_BYTES[allowed[0]]} bytes (RFC 7518 §3.2)"
        )
    return {None: Key(allowed[0], secret)}

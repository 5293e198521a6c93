"""Password hashing: argon2id with RFC 9106's second recommended parameters.

Login must answer in the same time whether the user is unknown, locked, disabled or just typed
the wrong password (issue 3, acceptance 1), so every path spends exactly one argon2 verify:
`dummy_verify` checks against a fixed hash made with the same parameters as real ones.
"""

from __future__ import annotations

import contextlib
import secrets

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MAX_PASSWORD_BYTES = 1024
"""Bound on input so a huge password cannot be used to burn CPU; long passphrases still fit."""

PARAMETERS = profiles.RFC_9106_LOW_MEMORY
"""argon2id, t=3, m=64 MiB, p=4: RFC 9106 §4's second recommendation (first needs 2 GiB)."""

_HASHER = PasswordHasher.from_parameters(PARAMETERS)

# A hash of a random secret nobody knows, made with PARAMETERS; a test keeps them in step.
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$AMSYJKc03EM67dNUzftnPw"
    "$/j2toeKBioD6GpvnHtuh/Jl2PEkLPOFQbbPE7FWbNZs"
)


def check_password(password: str) -> None:
    """Raise ValueError for a password we refuse to store (empty or over the byte limit)."""
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    if not password:
        raise ValueError("password must not be empty")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password is longer than {MAX_PASSWORD_BYTES} bytes")


def hash_password(password: str) -> str:
    """An encoded argon2id hash (`$argon2id$...`) with a fresh random salt."""
    check_password(password)
    return _HASHER.hash(password)


def _within_limits(password: str) -> bool:
    try:
        check_password(password)
    except (TypeError, ValueError):
        return False
    return True


def verify_password(password_hash: str, password: str) -> bool:
    """True only if `password` matches; False for a mismatch, a bad hash or a refused password.

    A refused password (empty, too long) can never match a stored hash, but still costs one
    dummy verify so it cannot be told apart by timing.
    """
    if not _within_limits(password):
        dummy_verify("")
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        # A corrupt or foreign hash: no match, but at the cost of a real verify.
        dummy_verify(password)
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with other parameters than today's (rehash on next login)."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


def dummy_verify(password: str) -> bool:
    """Spend what a real verify costs and return False: for unknown, locked or refused users."""
    candidate = password if _within_limits(password) else "x"
    with contextlib.suppress(VerificationError):
        _HASHER.verify(_DUMMY_HASH, candidate)
    return False


def generate_password() -> str:
    """A random URL-safe password of 24 characters (144 bits), for first-time or reset use."""
    return secrets.token_urlsafe(18)

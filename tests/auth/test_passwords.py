"""argon2id hashing: parameters, round trip, refusals, and the dummy verify used for timing."""

from __future__ import annotations

import string

import pytest
from argon2 import Type, extract_parameters

from garrison.auth import passwords
from garrison.auth.passwords import (
    MAX_PASSWORD_BYTES,
    dummy_verify,
    generate_password,
    hash_password,
    needs_rehash,
    verify_password,
)


def test_hash_is_argon2id_with_rfc9106_parameters() -> None:
    encoded = hash_password("correct horse battery staple")
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    params = extract_parameters(encoded)
    assert params.type is Type.ID
    assert (params.time_cost, params.memory_cost, params.parallelism) == (3, 65536, 4)
    assert not needs_rehash(encoded)


def test_round_trip_and_wrong_password() -> None:
    encoded = hash_password("s3cret-ünïcode")
    assert verify_password(encoded, "s3cret-ünïcode") is True
    assert verify_password(encoded, "s3cret-unicode") is False
    assert verify_password(encoded, "") is False
    assert verify_password(encoded, "x" * (MAX_PASSWORD_BYTES + 1)) is False


def test_same_password_gets_a_fresh_salt() -> None:
    assert hash_password("same") != hash_password("same")


def test_invalid_hash_is_a_mismatch_not_an_error() -> None:
    assert verify_password("not-a-hash", "anything") is False
    assert verify_password("$argon2id$v=19$m=65536,t=3,p=4$broken", "anything") is False
    assert needs_rehash("not-a-hash") is True


def test_weaker_hash_needs_rehash() -> None:
    from argon2 import PasswordHasher

    old = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    assert verify_password(old, "pw") is True
    assert needs_rehash(old) is True


@pytest.mark.parametrize(
    ("password", "message"),
    [("", "must not be empty"), ("é" * 513, "longer than 1024 bytes")],
)
def test_refused_passwords(password: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hash_password(password)


def test_limit_counts_bytes_not_characters() -> None:
    assert verify_password(hash_password("é" * 512), "é" * 512) is True


def test_dummy_verify_returns_false_and_matches_real_parameters() -> None:
    assert dummy_verify("whatever") is False
    assert dummy_verify("") is False
    # Same parameters as a real hash, so it costs the same as a real verify.
    assert extract_parameters(passwords._DUMMY_HASH) == extract_parameters(hash_password("pw"))
    assert not needs_rehash(passwords._DUMMY_HASH)


def test_generated_passwords_are_url_safe_and_distinct() -> None:
    generated = {generate_password() for _ in range(20)}
    assert len(generated) == 20
    allowed = set(string.ascii_letters + string.digits + "-_")
    for password in generated:
        assert len(password) == 24
        assert set(password) <= allowed

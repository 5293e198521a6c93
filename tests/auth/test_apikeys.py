"""API keys on a real SQLite file: shape, hash-only storage, verification, revocation,
expiry, rotation with and without grace, and batched last-use updates.

Time is injected (`now=`), never read from the clock, so expiry and grace are exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, select

from garrison.auth.apikeys import ApiKeyError, ApiKeys, KeyRecord, UnknownApiKey, parse_key
from garrison.store.db import api_keys, default_url, open_store

KEY_RE = re.compile(r"gk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}")
T0 = 1_800_000_000.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_store(default_url(tmp_path))
    yield eng
    eng.dispose()


@pytest.fixture
def keys(engine: Engine) -> ApiKeys:
    return ApiKeys(engine)


def _split(full: str) -> tuple[str, str]:
    parsed = parse_key(full)
    assert parsed is not None
    return parsed


def test_key_shape_and_returned_record(keys: ApiKeys) -> None:
    record, full = keys.create("ci", ["chat", "models:read"], owner="alice", now=T0)
    assert KEY_RE.fullmatch(full)
    key_id, _ = _split(full)
    assert record == KeyRecord(
        id=key_id,
        name="ci",
        owner="alice",
        scopes=("chat", "models:read"),
        expires_at=None,
        revoked_at=None,
        created_at=T0,
        last_used_at=None,
    )
    assert keys.get(key_id) == record
    assert keys.list() == [record]


def test_two_keys_differ_in_id_and_secret(keys: ApiKeys) -> None:
    _, a = keys.create("a", ["chat"], now=T0)
    _, b = keys.create("b", ["chat"], now=T0)
    (id_a, secret_a), (id_b, secret_b) = _split(a), _split(b)
    assert id_a != id_b
    assert secret_a != secret_b


def test_database_files_never_contain_the_secret(tmp_path: Path, keys: ApiKeys) -> None:
    _, full = keys.create("ci", ["chat"], now=T0)
    key_id, secret = _split(full)
    rotated = keys.rotate(key_id, grace_seconds=60, now=T0)
    _, new_secret = _split(rotated)
    # WAL mode: recent writes may still sit in garrison.db-wal, so scan every store file.
    files = sorted(tmp_path.glob("garrison.db*"))
    assert tmp_path / "garrison.db" in files
    blob = b"".join(path.read_bytes() for path in files)
    assert key_id.encode() in blob  # the scan can see what the table holds ...
    for text in (secret, new_secret, full, rotated):
        assert text.encode() not in blob  # ... and no secret is among it


def test_verify_accepts_the_key_and_returns_its_record(keys: ApiKeys) -> None:
    record, full = keys.create("ci", ["chat"], now=T0)
    assert keys.verify(full, now=T0 + 1) == record


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"), id="tampered-secret"),
        pytest.param(lambda k: k[:3] + ("a" if k[3] != "a" else "b") + k[4:], id="wrong-id"),
        pytest.param(lambda k: "gx_" + k[3:], id="wrong-prefix"),
        pytest.param(lambda k: k.upper(), id="upper-case"),
        pytest.param(lambda k: k + "A", id="too-long"),
        pytest.param(lambda k: k[:-1], id="too-short"),
        pytest.param(lambda k: " " + k, id="leading-space"),
        pytest.param(lambda k: k + "\n", id="trailing-newline"),
        pytest.param(lambda k: "Bearer " + k, id="header-not-stripped"),
        pytest.param(lambda k: "", id="empty"),
        pytest.param(lambda k: "gk___", id="garbage"),
    ],
)
def test_verify_refuses_anything_but_the_exact_key(
    keys: ApiKeys, mutate: Callable[[str], str]
) -> None:
    _, full = keys.create("ci", ["chat"], now=T0)
    other = mutate(full)
    assert other != full
    assert keys.verify(other, now=T0) is None
    assert keys.verify(full, now=T0) is not None  # the real key still works


def test_malformed_keys_are_refused_without_touching_the_database(tmp_path: Path) -> None:
    # An engine whose database cannot even be opened: any query would raise.
    broken = ApiKeys(create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"))
    for junk in ("", "gk_", "Bearer x", "gk_short_secret", "sk-" + "a" * 48, "gk_" + "a" * 56):
        assert broken.verify(junk) is None
    well_formed = "gk_" + "a" * 12 + "_" + "A" * 43
    with pytest.raises(Exception, match="unable to open database"):
        broken.verify(well_formed)  # proves the shape check, not luck, kept the DB out


def test_revoked_key_fails_immediately_and_revoke_is_idempotent(keys: ApiKeys) -> None:
    record, full = keys.create("ci", ["chat"], now=T0)
    revoked = keys.revoke(record.id, now=T0 + 5)
    assert revoked.revoked_at == T0 + 5
    assert keys.verify(full, now=T0 + 5) is None
    again = keys.revoke(record.id, now=T0 + 99)
    assert again.revoked_at == T0 + 5  # the first revocation time is kept
    assert keys.get(record.id).status(T0 + 100) == "revoked"


def test_revoke_and_rotate_unknown_id_raise(keys: ApiKeys) -> None:
    with pytest.raises(UnknownApiKey, match="nosuchkey"):
        keys.revoke("nosuchkey", now=T0)
    with pytest.raises(KeyError):
        keys.rotate("nosuchkey", now=T0)
    with pytest.raises(ApiKeyError):
        keys.get("nosuchkey")


def test_expired_key_fails_from_its_expiry_instant(keys: ApiKeys) -> None:
    record, full = keys.create("ci", ["chat"], expires_in=3600, now=T0)
    assert record.expires_at == T0 + 3600
    assert keys.verify(full, now=T0 + 3599.999) is not None
    assert keys.verify(full, now=T0 + 3600) is None
    assert keys.get(record.id).status(T0 + 3600) == "expired"


def test_rotate_without_grace_invalidates_the_old_key_at_once(keys: ApiKeys) -> None:
    record, old = keys.create("ci", ["chat"], now=T0)
    new = keys.rotate(record.id, grace_seconds=0, now=T0 + 10)
    assert KEY_RE.fullmatch(new)
    assert _split(new)[0] == record.id  # same key, new secret
    assert new != old
    assert keys.verify(old, now=T0 + 10) is None
    assert keys.verify(new, now=T0 + 10) is not None


def test_rotate_with_grace_keeps_the_old_key_until_the_grace_ends(keys: ApiKeys) -> None:
    record, old = keys.create("ci", ["chat"], now=T0)
    new = keys.rotate(record.id, grace_seconds=3600, now=T0)
    assert keys.verify(old, now=T0 + 3599) == keys.get(record.id)
    assert keys.verify(new, now=T0 + 3599) is not None
    assert keys.verify(old, now=T0 + 3600) is None
    assert keys.verify(new, now=T0 + 3600) is not None


def test_a_second_rotation_ends_the_first_grace(keys: ApiKeys) -> None:
    record, first = keys.create("ci", ["chat"], now=T0)
    second = keys.rotate(record.id, grace_seconds=3600, now=T0)
    third = keys.rotate(record.id, grace_seconds=3600, now=T0 + 1)
    assert keys.verify(first, now=T0 + 2) is None
    assert keys.verify(second, now=T0 + 2) is not None
    assert keys.verify(third, now=T0 + 2) is not None


def test_revoking_ends_a_rotation_grace(keys: ApiKeys) -> None:
    record, old = keys.create("ci", ["chat"], now=T0)
    new = keys.rotate(record.id, grace_seconds=3600, now=T0)
    keys.revoke(record.id, now=T0 + 1)
    assert keys.verify(old, now=T0 + 2) is None
    assert keys.verify(new, now=T0 + 2) is None


def test_rotating_a_revoked_or_expired_key_is_refused(keys: ApiKeys) -> None:
    revoked, _ = keys.create("r", ["chat"], now=T0)
    keys.revoke(revoked.id, now=T0)
    with pytest.raises(ApiKeyError, match="revoked"):
        keys.rotate(revoked.id, now=T0 + 1)
    expired, _ = keys.create("e", ["chat"], expires_in=10, now=T0)
    with pytest.raises(ApiKeyError, match="expired"):
        keys.rotate(expired.id, now=T0 + 10)
    with pytest.raises(ApiKeyError, match="negative"):
        keys.rotate(keys.create("n", ["chat"], now=T0)[0].id, grace_seconds=-1, now=T0)


@pytest.mark.parametrize(
    ("scopes", "message"),
    [
        ([], "at least one scope"),
        (["Chat"], "invalid scope"),
        (["chat completions"], "invalid scope"),
        (["a" * 65], "invalid scope"),
        ([""], "invalid scope"),
    ],
)
def test_bad_scopes_are_refused_and_nothing_is_stored(
    keys: ApiKeys, scopes: list[str], message: str
) -> None:
    with pytest.raises(ApiKeyError, match=message):
        keys.create("ci", scopes, now=T0)
    assert keys.list() == []


def test_valid_scope_alphabet_and_repeats(keys: ApiKeys) -> None:
    record, _ = keys.create("ci", ["a" * 64, "models:read", "v1.chat_x-y", "models:read"], now=T0)
    assert record.scopes == ("a" * 64, "models:read", "v1.chat_x-y")


def test_bad_name_or_expiry_is_refused(keys: ApiKeys) -> None:
    with pytest.raises(ApiKeyError, match="name"):
        keys.create("  ", ["chat"], now=T0)
    with pytest.raises(ApiKeyError, match="expiry"):
        keys.create("ci", ["chat"], expires_in=0, now=T0)
    assert keys.list() == []


def test_record_use_updates_many_keys_in_one_batch(engine: Engine, keys: ApiKeys) -> None:
    a, _ = keys.create("a", ["chat"], now=T0)
    b, _ = keys.create("b", ["chat"], now=T0)
    c, _ = keys.create("c", ["chat"], now=T0)
    keys.record_use({a.id: T0 + 10, b.id: T0 + 20, "gone00000000": T0 + 30})
    assert keys.get(a.id).last_used_at == T0 + 10
    assert keys.get(b.id).last_used_at == T0 + 20
    assert keys.get(c.id).last_used_at is None
    # A late, older batch must not move last use backwards.
    keys.record_use({a.id: T0 + 5, b.id: T0 + 25})
    with engine.connect() as conn:
        used = dict(conn.execute(select(api_keys.c.id, api_keys.c.last_used_at)).all())
    assert used == {a.id: T0 + 10, b.id: T0 + 25, c.id: None}
    keys.record_use({})  # nothing to do is not an error


def test_list_orders_oldest_first(keys: ApiKeys) -> None:
    late, _ = keys.create("late", ["chat"], now=T0 + 100)
    early, _ = keys.create("early", ["chat"], now=T0)
    assert [r.name for r in keys.list()] == ["early", "late"]
    assert {r.id for r in keys.list()} == {late.id, early.id}

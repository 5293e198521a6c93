"""Accounts on a real SQLite store: CRUD, validation, and per-account login backoff."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from garrison.auth.passwords import needs_rehash
from garrison.auth.users import MAX_LOCK_SECONDS, User, UserError, Users, lock_seconds
from garrison.store.db import default_url, open_store, users

T0 = 1_800_000_000.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_store(default_url(tmp_path))
    yield engine
    engine.dispose()


@pytest.fixture
def accounts(engine: Engine) -> Users:
    return Users(engine)


def test_add_get_list(accounts: Users) -> None:
    accounts.add("bob", "pw-bob", roles=["viewer"])
    accounts.add("alice", "pw-alice", roles=["admin", "ops", "admin"], email="a@example.test")
    alice = accounts.get("alice")
    assert alice == User("alice", "a@example.test", ("admin", "ops"), False, 0, None)
    assert [u.name for u in accounts.list()] == ["alice", "bob"]
    assert accounts.get("nobody") is None
    assert accounts.get("bad name!") is None


def test_password_is_stored_only_as_argon2id(accounts: Users, engine: Engine) -> None:
    accounts.add("alice", "pw-alice")
    with engine.connect() as conn:
        stored = conn.execute(select(users.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$")
    assert "pw-alice" not in stored


def test_duplicate_user_is_refused(accounts: Users) -> None:
    accounts.add("alice", "one")
    with pytest.raises(UserError, match="user 'alice' already exists"):
        accounts.add("alice", "two")
    assert accounts.authenticate("alice", "one", T0) is not None


@pytest.mark.parametrize("name", ["", "a" * 65, "with space", "slash/", "é", "semi;colon"])
def test_bad_names_are_refused(accounts: Users, name: str) -> None:
    with pytest.raises(UserError, match="invalid user name"):
        accounts.add(name, "pw")


def test_allowed_name_characters(accounts: Users) -> None:
    name = "a.B_c-d@e" + "x" * 55
    accounts.add(name, "pw")
    assert accounts.get(name) is not None


def test_bad_password_role_and_email_are_refused(accounts: Users) -> None:
    with pytest.raises(UserError, match="must not be empty"):
        accounts.add("alice", "")
    with pytest.raises(UserError, match="invalid role"):
        accounts.add("alice", "pw", roles=["ok", ""])
    with pytest.raises(UserError, match="not one string"):
        accounts.add("alice", "pw", roles="admin")
    with pytest.raises(UserError, match="invalid email"):
        accounts.add("alice", "pw", email="not an email")
    assert accounts.list() == []


def test_unknown_user_operations_fail_clearly(accounts: Users) -> None:
    for operation in (
        lambda: accounts.disable("ghost"),
        lambda: accounts.enable("ghost"),
        lambda: accounts.set_password("ghost", "pw"),
        lambda: accounts.set_roles("ghost", ["x"]),
    ):
        with pytest.raises(UserError, match="no such user 'ghost'"):
            operation()


def test_authenticate_right_wrong_and_unknown(accounts: Users) -> None:
    accounts.add("alice", "pw-alice", roles=["admin"])
    user = accounts.authenticate("alice", "pw-alice", T0)
    assert user is not None
    assert user.name == "alice"
    assert user.roles == ("admin",)
    assert accounts.authenticate("alice", "wrong", T0) is None
    assert accounts.authenticate("ghost", "pw-alice", T0) is None
    assert accounts.authenticate("not valid!", "pw-alice", T0) is None


def test_disable_and_enable(accounts: Users) -> None:
    accounts.add("alice", "pw")
    accounts.disable("alice")
    assert accounts.get("alice").disabled is True
    assert accounts.authenticate("alice", "pw", T0) is None
    accounts.enable("alice")
    assert accounts.get("alice").disabled is False
    assert accounts.authenticate("alice", "pw", T0) is not None


def test_set_roles(accounts: Users) -> None:
    accounts.add("alice", "pw", roles=["a"])
    accounts.set_roles("alice", ["b", "c"])
    assert accounts.get("alice").roles == ("b", "c")
    accounts.set_roles("alice", [])
    assert accounts.get("alice").roles == ()


def test_lock_schedule() -> None:
    assert [lock_seconds(n) for n in range(0, 5)] == [0.0] * 5
    assert [lock_seconds(n) for n in range(5, 10)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert lock_seconds(14) == 512.0
    assert lock_seconds(15) == MAX_LOCK_SECONDS == 900.0
    assert lock_seconds(10_000) == MAX_LOCK_SECONDS


def test_lockout_sequence(accounts: Users) -> None:
    accounts.add("alice", "right")
    now = T0
    for attempt in range(1, 5):
        assert accounts.authenticate("alice", "wrong", now) is None
        state = accounts.get("alice")
        assert (state.failed_logins, state.locked_until) == (attempt, None)
    # The fifth failure locks for 1 s.
    assert accounts.authenticate("alice", "wrong", now) is None
    assert accounts.get("alice").locked_until == now + 1
    assert accounts.get("alice").locked(now + 0.5)
    # While locked, even the right password fails and the attempt is not counted.
    assert accounts.authenticate("alice", "right", now + 0.5) is None
    assert accounts.get("alice").failed_logins == 5
    # After the lock, a sixth failure locks for 2 s, a seventh for 4 s.
    now += 1
    assert accounts.authenticate("alice", "wrong", now) is None
    assert accounts.get("alice").locked_until == now + 2
    now += 2
    assert accounts.authenticate("alice", "wrong", now) is None
    assert accounts.get("alice").locked_until == now + 4
    # Success after the lock resets everything.
    now += 4
    assert accounts.authenticate("alice", "right", now) is not None
    state = accounts.get("alice")
    assert (state.failed_logins, state.locked_until) == (0, None)
    assert accounts.authenticate("alice", "wrong", now) is None
    assert accounts.get("alice").failed_logins == 1


def test_lock_is_capped_at_fifteen_minutes(accounts: Users, engine: Engine) -> None:
    accounts.add("alice", "right")
    with engine.begin() as conn:
        conn.execute(update(users).values(failed_logins=40))
    assert accounts.authenticate("alice", "wrong", T0) is None
    assert accounts.get("alice").locked_until == T0 + 900


def test_set_password_clears_lockout(accounts: Users) -> None:
    accounts.add("alice", "old")
    for _ in range(6):
        accounts.authenticate("alice", "wrong", T0)
    assert accounts.get("alice").locked(T0)
    accounts.set_password("alice", "new")
    state = accounts.get("alice")
    assert (state.failed_logins, state.locked_until) == (0, None)
    assert accounts.authenticate("alice", "old", T0) is None
    assert accounts.authenticate("alice", "new", T0) is not None


def test_weak_hash_is_upgraded_on_login(accounts: Users, engine: Engine) -> None:
    from argon2 import PasswordHasher

    accounts.add("alice", "pw")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("pw")
    with engine.begin() as conn:
        conn.execute(update(users).values(password_hash=weak))
    assert accounts.authenticate("alice", "pw", T0) is not None
    with engine.connect() as conn:
        stored = conn.execute(select(users.c.password_hash)).scalar_one()
    assert stored != weak
    assert not needs_rehash(stored)
    assert accounts.authenticate("alice", "pw", T0) is not None


def test_store_survives_reopen(tmp_path: Path) -> None:
    first = open_store(default_url(tmp_path))
    Users(first).add("alice", "pw", email="a@b.test")
    first.dispose()
    second = open_store(default_url(tmp_path))
    try:
        assert Users(second).get("alice").email == "a@b.test"
    finally:
        second.dispose()

"""The per-worker identity cache: hits never touch the store, changes arrive through the feed.

Real SQLite, real argon2, real signatures. "No store read on a hit" is shown by changing the
store behind the cache's back (no notice): the cached answer stays until a notice arrives.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, select

from garrison.auth.apikeys import ApiKeys
from garrison.auth.identity import Identity
from garrison.auth.service import AuthFailure, AuthService
from garrison.auth.users import Users
from garrison.config import AuthConfig
from garrison.store.db import api_keys, open_store


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'g.db'}")


def resolve(result: object) -> Identity | None:
    """Run a resolver's answer to the end (it may be an awaitable on a cache miss)."""
    if inspect.isawaitable(result):
        return asyncio.get_event_loop().run_until_complete(result)  # type: ignore[no-any-return]
    return result  # type: ignore[return-value]


@pytest.fixture
def loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop  # type: ignore[misc]
    loop.close()


def test_key_hit_is_served_from_memory_until_a_notice(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    Users(engine).add("alice", "alice-password-1", roles=["staff"], email="a@example.test")
    service = AuthService(engine, AuthConfig())
    record, key = ApiKeys(engine).create("bot", ["chat"], owner="alice")
    first = service.identify_key(key, 1e9)
    assert inspect.isawaitable(first)  # a miss: one store read, in a thread
    ident = resolve(first)
    assert ident is not None
    assert (ident.name, ident.roles, ident.scopes) == ("alice", ("staff",), frozenset({"chat"}))
    with engine.begin() as conn:  # behind the cache's back: no notice published
        conn.execute(delete(api_keys).where(api_keys.c.id == record.id))
    assert service.identify_key(key, 1e9 + 1) is ident  # a hit: no store read
    ApiKeys(engine).create("other", ["x"])  # unrelated
    _, fresh = ApiKeys(engine).create("bot2", ["chat"])
    ApiKeys(engine).revoke(fresh[3:15])
    loop.run_until_complete(service._apply(service.feed.poll()))
    with pytest.raises(AuthFailure):
        resolve(service.identify_key(fresh, 1e9))


def test_revocation_and_owner_disable_reach_the_cache(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    users = Users(engine)
    users.add("bob", "bob-password-123")
    keys = ApiKeys(engine)
    record, key = keys.create("bot", ["chat"], owner="bob")
    _, other = keys.create("bot2", ["chat"], owner="bob")
    service = AuthService(engine, AuthConfig())
    assert resolve(service.identify_key(key, 1e9)) is not None
    keys.revoke(record.id)
    loop.run_until_complete(service._apply(service.feed.poll()))
    with pytest.raises(AuthFailure):
        resolve(service.identify_key(key, 1e9))
    assert resolve(service.identify_key(other, 1e9)) is not None
    users.disable("bob")
    loop.run_until_complete(service._apply(service.feed.poll()))
    with pytest.raises(AuthFailure, match="owner is disabled"):
        resolve(service.identify_key(other, 1e9))


def test_key_uses_are_batched(engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
    service = AuthService(engine, AuthConfig())
    record, key = ApiKeys(engine).create("bot", ["chat"])
    resolve(service.identify_key(key, 1e9))
    for tick in range(100):
        service.identify_key(key, 1e9 + tick)
    with engine.connect() as conn:
        stored = conn.execute(
            select(api_keys.c.last_used_at).where(api_keys.c.id == record.id)
        ).scalar()
    assert stored is None  # nothing written per request
    service._flush()
    assert ApiKeys(engine).get(record.id).last_used_at == 1e9 + 99


def test_sessions_die_with_password_change(engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
    users = Users(engine)
    users.add("carol", "carol-password-1")
    service = AuthService(engine, AuthConfig())
    opened = loop.run_until_complete(service.login("carol", "carol-password-1", 1e9))
    assert opened is not None
    cookie, _ = opened
    ident = resolve(service.identify_session(cookie, 1e9 + 1))
    assert ident is not None and ident.method == "session"
    assert service.identify_session(cookie, 1e9 + 2) is ident  # cached
    assert loop.run_until_complete(service.login("carol", "wrong", 1e9)) is None
    users.set_password("carol", "carol-password-2")
    loop.run_until_complete(service._apply(service.feed.poll()))
    assert resolve(service.identify_session(cookie, 1e9 + 3)) is None


def test_own_tokens_carry_the_user_and_die_with_disable(
    engine: Engine, loop: asyncio.AbstractEventLoop
) -> None:
    users = Users(engine)
    users.add("dave", "dave-password-1", roles=["ops"])
    service = AuthService(engine, AuthConfig())
    token, lifetime = service.issue_token("dave", ("ops",), None, None)
    assert lifetime == 900
    import time

    now = time.time()
    ident = resolve(service.identify_token(token, now))
    assert ident is not None and ident.roles == ("ops",) and ident.scopes is None
    users.disable("dave")
    loop.run_until_complete(service._apply(service.feed.poll()))
    with pytest.raises(AuthFailure, match="revoked"):
        resolve(service.identify_token(token, now))


def test_ip_backoff_grows_and_resets(engine: Engine) -> None:
    service = AuthService(engine, AuthConfig(ip_free_failures=2))
    for _ in range(2):
        assert service.ip_blocked_for("10.0.0.1", 100.0) == 0
        service.ip_failed("10.0.0.1", 100.0)
    assert service.ip_blocked_for("10.0.0.1", 100.0) == 1.0
    service.ip_failed("10.0.0.1", 100.0)
    assert service.ip_blocked_for("10.0.0.1", 100.0) == 2.0
    assert service.ip_blocked_for("10.0.0.2", 100.0) == 0
    service.ip_succeeded("10.0.0.1")
    assert service.ip_blocked_for("10.0.0.1", 100.0) == 0

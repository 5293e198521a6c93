"""Sessions on a real SQLite store: authentic cookies only, timeouts, revocation, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from garrison.auth.sessions import Sessions, hash_id
from garrison.store.db import open_store, sessions
from garrison.store.events import EventFeed


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'g.db'}")


def test_cookie_roundtrip_and_only_the_hash_is_stored(engine: Engine) -> None:
    store = Sessions(engine, idle=60, max_age=3600)
    cookie, record = store.create("alice", now=1000.0)
    session_id = cookie.partition(".")[0]
    assert store.parse_cookie(cookie) == record.id_hash == hash_id(session_id)
    with engine.connect() as conn:
        stored = conn.execute(select(sessions.c.id_hash)).scalars().all()
    assert stored == [record.id_hash]
    assert session_id not in stored


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),  # tag changed
        lambda c: ("A" if c[0] != "A" else "B") + c[1:],  # id changed, old tag
        lambda c: c.partition(".")[0],  # no tag
        lambda c: c + "x",
        lambda c: "",
        lambda c: "." * 66,
    ],
    ids=["tag", "id", "untagged", "longer", "empty", "dots"],
)
def test_forged_cookies_are_refused_without_a_lookup(engine: Engine, mangle: object) -> None:
    store = Sessions(engine, idle=60, max_age=3600)
    cookie, _ = store.create("alice")
    assert store.parse_cookie(mangle(cookie)) is None  # type: ignore[operator]


def test_every_process_shares_the_cookie_key(engine: Engine) -> None:
    cookie, _ = Sessions(engine, 60, 3600).create("alice")
    assert Sessions(engine, 60, 3600).parse_cookie(cookie) is not None


def test_timeouts_revocation_and_batched_last_seen(engine: Engine) -> None:
    store = Sessions(engine, idle=60, max_age=3600)
    _, record = store.create("alice", now=1000.0)
    loaded = store.lookup(record.id_hash)
    assert loaded is not None
    assert loaded.alive(1059.0, 60) and not loaded.alive(1060.0, 60)  # idle
    store.record_seen([(record.id_hash, 1050.0), ("missing", 1.0)])
    store.record_seen([(record.id_hash, 1010.0)])  # older: never moves back
    later = store.lookup(record.id_hash)
    assert later is not None and later.last_seen == 1050.0
    assert later.alive(1100.0, 60)
    assert not later.alive(4600.0, 10_000)  # absolute limit
    feed = EventFeed(engine)
    store.revoke(record.id_hash)
    gone = store.lookup(record.id_hash)
    assert gone is not None and gone.revoked and not gone.alive(1051.0, 60)
    assert [(n.topic, n.subject) for n in feed.poll()] == [("session", record.id_hash)]


def test_revoke_user_ends_all_of_their_sessions(engine: Engine) -> None:
    store = Sessions(engine, idle=60, max_age=3600)
    hashes = [store.create("bob")[1].id_hash for _ in range(3)]
    other = store.create("carol")[1].id_hash
    assert store.revoke_user("bob") == 3
    assert all((s := store.lookup(h)) is not None and s.revoked for h in hashes)
    carol = store.lookup(other)
    assert carol is not None and not carol.revoked

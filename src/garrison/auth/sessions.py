"""Browser sessions: an opaque random id in the `__Host-garrison` cookie, a record in the store.

The cookie carries `<id>.<tag>`, the tag an HMAC of the id under a key shared through the
store, so a forged or guessed cookie is refused without a database read. The store keeps only
SHA-256 of the id. Idle and absolute timeouts are enforced from the record; `last_seen` is
tracked in memory and written in batches, so a request never waits on a write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from garrison.store.db import sessions, settings
from garrison.store.events import publish

COOKIE = "__Host-garrison"
_MAC_SETTING = "session_mac_key"
_ID_BYTES = 32
_TAG_BYTES = 16


@dataclass(slots=True)
class SessionRecord:
    id_hash: str
    user: str
    created_at: float
    last_seen: float
    expires_at: float
    revoked: bool = False

    def alive(self, now: float, idle: float) -> bool:
        return not self.revoked and now < self.expires_at and now - self.last_seen < idle


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _shared_mac_key(engine: Engine) -> bytes:
    """The cookie MAC key, created by whichever process comes first."""
    with engine.begin() as conn:
        row = conn.execute(select(settings.c.value).where(settings.c.name == _MAC_SETTING)).first()
        if row is not None:
            return base64.b64decode(row.value)
    try:
        with engine.begin() as conn:
            conn.execute(
                settings.insert().values(
                    name=_MAC_SETTING, value=base64.b64encode(secrets.token_bytes(32)).decode()
                )
            )
    except IntegrityError:
        pass  # another process won the race; use its key
    with engine.begin() as conn:
        value = conn.execute(
            select(settings.c.value).where(settings.c.name == _MAC_SETTING)
        ).scalar_one()
    return base64.b64decode(value)


class Sessions:
    """Session records in the durable store. Lookups happen only on a cache miss."""

    def __init__(self, engine: Engine, idle: float, max_age: float) -> None:
        self.engine = engine
        self.idle = idle
        self.max_age = max_age
        self._mac_key = _shared_mac_key(engine)

    def _tag(self, session_id: str) -> str:
        digest = hmac.new(self._mac_key, session_id.encode(), hashlib.sha256).digest()
        return _b64(digest[:_TAG_BYTES])

    def parse_cookie(self, value: str) -> str | None:
        """The id hash for a well-formed, authentic cookie value; None for anything else."""
        session_id, dot, tag = value.partition(".")
        if not dot or len(session_id) != 43 or len(tag) != 22:
            return None
        if not hmac.compare_digest(tag.encode(), self._tag(session_id).encode()):
            return None
        return hash_id(session_id)

    def create(self, user: str, now: float | None = None) -> tuple[str, SessionRecord]:
        """A new session for `user`: (cookie value, record). The id is never stored."""
        now = time.time() if now is None else now
        session_id = _b64(secrets.token_bytes(_ID_BYTES))
        record = SessionRecord(hash_id(session_id), user, now, now, now + self.max_age)
        with self.engine.begin() as conn:
            conn.execute(
                sessions.insert().values(
                    id_hash=record.id_hash,
                    user=user,
                    created_at=now,
                    last_seen=now,
                    expires_at=record.expires_at,
                )
            )
            conn.execute(sessions.delete().where(sessions.c.expires_at < now))
        return f"{session_id}.{self._tag(session_id)}", record

    def lookup(self, id_hash: str) -> SessionRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(sessions).where(sessions.c.id_hash == id_hash)).first()
        if row is None:
            return None
        return SessionRecord(
            row.id_hash,
            row.user,
            row.created_at,
            row.last_seen,
            row.expires_at,
            row.revoked_at is not None,
        )

    def revoke(self, id_hash: str, now: float | None = None) -> None:
        """End one session everywhere: every worker drops it at its next poll of the feed."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(
                update(sessions)
                .where(sessions.c.id_hash == id_hash, sessions.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            publish(conn, "session", id_hash, now)

    def revoke_user(self, user: str, now: float | None = None) -> int:
        """End every session of `user` (logout everywhere)."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            result = conn.execute(
                update(sessions)
                .where(sessions.c.user == user, sessions.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            publish(conn, "user", user, now)
        return int(result.rowcount or 0)

    def record_seen(self, seen: Iterable[tuple[str, float]]) -> None:
        """Batch-write last-seen times (never backwards)."""
        params = [{"h": h, "t": t} for h, t in seen]
        if not params:
            return
        stmt = (
            update(sessions)
            .where(sessions.c.id_hash == bindparam("h"), sessions.c.last_seen < bindparam("t"))
            .values(last_seen=bindparam("t"))
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, params)

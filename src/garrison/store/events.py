"""Change notices between processes: a writer publishes, every worker polls and drops caches.

The request path works from in-memory caches (DESIGN §3); this feed is how a `garrison user
disable` in a terminal, or a logout handled by another worker, reaches every worker's caches
within a poll interval. One indexed query per interval per worker, never per request. With
Redis (a later issue) the same notices can travel by pub/sub instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, func, select

from garrison.store.db import events

KEEP_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Notice:
    id: int
    topic: str
    subject: str


def publish(conn: Connection, topic: str, subject: str, now: float | None = None) -> None:
    """Record a change inside the caller's transaction, so the notice and the change commit
    together: a worker never sees one without the other."""
    conn.execute(
        events.insert().values(
            topic=topic, subject=subject[:128], at=time.time() if now is None else now
        )
    )


class EventFeed:
    """Reads notices newer than the last one seen. Starts at the current end of the feed:
    a fresh worker loads its caches from the store, so older notices mean nothing to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.connect() as conn:
            self.last_id = int(conn.execute(select(func.max(events.c.id))).scalar() or 0)

    def poll(self, limit: int = 1000) -> list[Notice]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(events.c.id, events.c.topic, events.c.subject)
                .where(events.c.id > self.last_id)
                .order_by(events.c.id)
                .limit(limit)
            ).all()
        if rows:
            self.last_id = int(rows[-1].id)
        return [Notice(int(r.id), r.topic, r.subject) for r in rows]

    def prune(self, now: float | None = None) -> None:
        """Drop notices older than an hour: every live worker has long read them."""
        cutoff = (time.time() if now is None else now) - KEEP_SECONDS
        with self.engine.begin() as conn:
            conn.execute(delete(events).where(events.c.at < cutoff))

"""Read-only store queries the admin pages need and the stores do not offer (synchronous).

Changes never go through here: they use the stores' own operations (auth/users.py,
auth/apikeys.py, auth/sessions.py, pki/client_certs.py), which publish the change notices
every worker polls. Run these in a thread; they are never on the request path.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, func, select

from garrison.admin.views import SessionView
from garrison.store.db import sessions, users

MAX_SESSIONS = 1000


def user_times(engine: Engine) -> dict[str, tuple[float | None, float | None]]:
    """name -> (created, last login), the last login being the newest session's start."""
    with engine.connect() as conn:
        created = dict(conn.execute(select(users.c.name, users.c.created_at)).all())
        logins = dict(
            conn.execute(
                select(sessions.c.user, func.max(sessions.c.created_at)).group_by(sessions.c.user)
            ).all()
        )
    return {name: (created.get(name), logins.get(name)) for name in created}


def live_sessions(engine: Engine, user: str | None, now: float | None = None) -> list[SessionView]:
    """Sessions not revoked and not past their absolute expiry, newest first (capped)."""
    now = time.time() if now is None else now
    query = (
        select(sessions)
        .where(sessions.c.revoked_at.is_(None), sessions.c.expires_at > now)
        .order_by(sessions.c.created_at.desc())
        .limit(MAX_SESSIONS)
    )
    if user is not None:
        query = query.where(sessions.c.user == user)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        SessionView(
            id=row.id_hash,
            user=row.user,
            created=row.created_at,
            expires=row.expires_at,
            last_seen=row.last_seen,
        )
        for row in rows
    ]


def session_user(engine: Engine, id_hash: str) -> str | None:
    """Whose live (not revoked) session this is; None when there is none."""
    with engine.connect() as conn:
        return conn.execute(
            select(sessions.c.user).where(
                sessions.c.id_hash == id_hash, sessions.c.revoked_at.is_(None)
            )
        ).scalar_one_or_none()

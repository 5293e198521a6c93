"""What the admin UI and the JSON admin API can see and do: one service, used by both.

Every change goes through the same store operations as the `garrison` CLI (auth/users.py,
auth/apikeys.py, auth/sessions.py, pki/client_certs.py): they publish the change notices every
worker polls, so a key revoked here is refused by every worker within a poll interval, as with
the CLI. Store work runs in a thread (the stores are synchronous SQLAlchemy), never on the
event loop. Each change writes an audit event naming the admin who made it (`by`); secrets
(new API keys, passwords, PKCS#12 passwords and files) are returned once and never logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

from garrison.admin import audit_search, queries
from garrison.admin.certs import CertAdmin
from garrison.admin.errors import AdminError, check_limits, check_password
from garrison.admin.overview import build_overview
from garrison.admin.views import (
    CertView,
    ExpiryView,
    KeyView,
    Overview,
    SessionView,
    UpstreamView,
    UserView,
)
from garrison.auth.apikeys import PREFIX, KeyRecord
from garrison.auth.identity import Identity
from garrison.auth.users import User
from garrison.observe.audit import audit_path

__all__ = [
    "AdminError",
    "AdminService",
    "CertView",
    "ExpiryView",
    "KeyView",
    "Overview",
    "SessionView",
    "UpstreamView",
    "UserView",
    "check_limits",
]

ADMIN_ROLE = "admin"
DAY = 86400.0


class AdminService(CertAdmin):
    """Everything the admin UI and API do (certificates in certs.py, plumbing in base.py)."""

    # -- overview -------------------------------------------------------------------------------
    async def overview(self) -> Overview:
        certs, keys = await self._run(lambda: (self._certs().list(), self.auth.keys.list()))
        return build_overview(self.config, certs, keys)

    # -- users ----------------------------------------------------------------------------------
    def _user_view(
        self, user: User, times: dict[str, tuple[float | None, float | None]]
    ) -> UserView:
        created, last_login = times.get(user.name, (None, None))
        return UserView(
            name=user.name,
            roles=list(user.roles),
            disabled=user.disabled,
            created=created,
            last_login=last_login,
            email=user.email,
            locked_until=user.locked_until if user.locked(time.time()) else None,
        )

    async def list_users(self) -> list[UserView]:
        users, times = await self._run(
            lambda: (self.auth.users.list(), queries.user_times(self.auth.engine))
        )
        return [self._user_view(u, times) for u in users]

    async def get_user(self, name: str) -> UserView:
        def read() -> UserView:
            user = self.auth.users.get(name)
            if user is None:
                raise AdminError(404, "user_not_found", f"no such user {name!r}")
            return self._user_view(user, queries.user_times(self.auth.engine))

        return await self._run(read)

    async def create_user(
        self,
        actor: Identity,
        name: str,
        password: str,
        roles: Sequence[str] = (),
        email: str | None = None,
    ) -> UserView:
        check_password(password)
        await self._run(lambda: self.auth.users.add(name, password, roles=roles, email=email))
        self._event(actor, "user_added", {"user": name, "roles": list(roles), "email": email})
        return await self.get_user(name)

    async def set_user_disabled(self, actor: Identity, name: str, disabled: bool) -> UserView:
        if disabled and name == actor.name:
            raise AdminError(409, "self_lockout", "you cannot disable your own account")
        users = self.auth.users
        await self._run(lambda: users.disable(name) if disabled else users.enable(name))
        self._event(actor, "user_disabled" if disabled else "user_enabled", {"user": name})
        return await self.get_user(name)

    async def reset_password(self, actor: Identity, name: str, password: str) -> UserView:
        """New password; every session of the user ends (and Garrison's tokens for it)."""
        check_password(password)

        def change() -> None:
            self.auth.users.set_password(name, password)
            self.auth.sessions.revoke_user(name)

        await self._run(change)
        self._event(actor, "user_password_changed", {"user": name})
        return await self.get_user(name)

    async def set_roles(self, actor: Identity, name: str, roles: Sequence[str]) -> UserView:
        if name == actor.name and ADMIN_ROLE not in roles:
            raise AdminError(409, "self_lockout", "you cannot remove your own admin role")
        await self._run(lambda: self.auth.users.set_roles(name, roles))
        self._event(actor, "user_roles_changed", {"user": name, "roles": list(roles)})
        return await self.get_user(name)

    # -- API keys -------------------------------------------------------------------------------
    def _key_view(self, record: KeyRecord, now: float) -> KeyView:
        owner = self.auth.directory.get(record.owner) if record.owner else None
        return KeyView(
            id=record.id,
            name=record.name,
            owner=record.owner,
            scopes=list(record.scopes),
            roles=list(owner.roles) if owner else [],
            rate=list(record.rate) if record.rate else None,
            tokens=record.tokens,
            created=record.created_at,
            expires=record.expires_at,
            last_used=record.last_used_at,
            status=record.status(now),
            prefix=f"{PREFIX}{record.id}_",
        )

    async def list_keys(self) -> list[KeyView]:
        records = await self._run(self.auth.keys.list)
        now = time.time()
        return [self._key_view(r, now) for r in records]

    async def get_key(self, key_id: str) -> KeyView:
        return self._key_view(await self._run(lambda: self.auth.keys.get(key_id)), time.time())

    async def create_key(
        self,
        actor: Identity,
        name: str,
        owner: str | None = None,
        scopes: Iterable[str] = (),
        roles: Iterable[str] = (),
        rate: Sequence[str] | None = None,
        tokens: str | None = None,
        expires_days: float | None = None,
    ) -> tuple[KeyView, str]:
        """A new key and its secret, which is returned here once and never again."""
        if list(roles):
            raise AdminError(422, "invalid", "API keys take their roles from their owner")
        known = owner is None or owner in self.auth.directory
        if not known and await self._run(lambda: self.auth.users.get(owner)) is None:
            raise AdminError(422, "invalid", f"owner {owner!r} is not a user")
        if expires_days is not None and expires_days <= 0:
            raise AdminError(422, "invalid", "expires_days must be more than 0")
        expires_in = None if expires_days is None else expires_days * DAY
        rate = check_limits(rate, tokens)
        scope_list = list(scopes)
        record, secret = await self._run(
            lambda: self.auth.keys.create(
                name, scope_list, expires_in=expires_in, owner=owner, rate=rate, tokens=tokens
            )
        )
        self._event(
            actor,
            "key_created",
            {
                "key_id": record.id,
                "key_name": record.name,
                "owner": record.owner,
                "scopes": list(record.scopes),
                "expires": int(record.expires_at) if record.expires_at else None,
                "rate": list(record.rate or ()),
                "tokens": record.tokens,
            },
        )
        return self._key_view(record, time.time()), secret

    async def revoke_key(self, actor: Identity, key_id: str) -> KeyView:
        record = await self._run(lambda: self.auth.keys.revoke(key_id))
        self._event(actor, "key_revoked", {"key_id": record.id, "key_name": record.name})
        return self._key_view(record, time.time())

    async def rotate_key(
        self, actor: Identity, key_id: str, grace_seconds: float = 0
    ) -> tuple[KeyView, str]:
        """A new secret for the key (returned once); the old one works `grace_seconds` more."""
        if grace_seconds < 0:
            raise AdminError(422, "invalid", "grace_seconds must not be negative")
        secret = await self._run(lambda: self.auth.keys.rotate(key_id, grace_seconds))
        self._event(actor, "key_rotated", {"key_id": key_id, "grace_s": int(grace_seconds)})
        return await self.get_key(key_id), secret

    async def set_key_limits(
        self, actor: Identity, key_id: str, rate: Sequence[str] | None, tokens: str | None
    ) -> KeyView:
        """The key's own rates and token budget (None: the routes' limits)."""
        await self._run(lambda: self.auth.keys.set_limits(key_id, rate, tokens))
        view = await self.get_key(key_id)
        self._event(
            actor,
            "key_limits_changed",
            {"key_id": key_id, "key_name": view.name, "rate": list(rate or ()), "tokens": tokens},
        )
        return view

    # -- sessions -------------------------------------------------------------------------------
    async def list_sessions(self, user: str | None = None) -> list[SessionView]:
        return await self._run(lambda: queries.live_sessions(self.auth.engine, user))

    async def revoke_session(self, actor: Identity, session_id: str) -> None:
        def revoke() -> str:
            owner = queries.session_user(self.auth.engine, session_id)
            if owner is None:
                raise AdminError(404, "session_not_found", "no live session with this id")
            self.auth.sessions.revoke(session_id)
            return owner

        owner = await self._run(revoke)
        self._event(actor, "session_revoked", {"user": owner})

    async def revoke_user_sessions(self, actor: Identity, user: str) -> int:
        if await self._run(lambda: self.auth.users.get(user)) is None:
            raise AdminError(404, "user_not_found", f"no such user {user!r}")
        count = await self._run(lambda: self.auth.sessions.revoke_user(user))
        self._event(actor, "session_revoked", {"user": user, "everywhere": True})
        return count

    # -- audit ----------------------------------------------------------------------------------
    async def search_audit(
        self,
        identity: str | None = None,
        route: str | None = None,
        status: int | None = None,
        since: float | None = None,
        until: float | None = None,
        event: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, object]]:
        """Newest first from the audit file and its rotations (bounded work, in a thread)."""
        config = self.audit.config
        if config.sink != "file":
            raise AdminError(
                409,
                "audit_not_searchable",
                f"the audit log goes to {config.sink}, not a file: search it where it is kept",
            )
        self.audit.flush()  # this worker's last 200 ms too
        files = audit_search.audit_files(audit_path(config, self.audit.data_dir), config.keep)
        query = audit_search.AuditQuery(identity, route, status, since, until, event, limit)
        return await asyncio.to_thread(audit_search.search, files, query)

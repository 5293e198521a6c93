"""Everything a worker knows about identities, held in memory and kept fresh by change notices.

The request path asks `identify_*`; on a cache hit the answer is a dict lookup and a few float
compares (no database, no argon2, no signature check). A miss returns an awaitable that does
the one store read in a thread. Writes (last use of a key, last activity of a session) are
batched and flushed in the background. Notices from the store's event feed (other workers, the
CLI) drop cached entries within one poll interval (`POLL_SECONDS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from sqlalchemy import Engine

from garrison.auth.apikeys import ApiKeys, KeyRecord, parse_key
from garrison.auth.identity import Identity
from garrison.auth.sessions import SessionRecord, Sessions
from garrison.auth.signing import SigningKeys
from garrison.auth.tokens import Claims, InvalidToken, TokenIssuer, TokenVerifier, UnknownKey
from garrison.auth.users import User, Users
from garrison.config import AuthConfig, ClientCertsConfig
from garrison.limits.model import Budget, Rate
from garrison.pki.revocation import Revocation
from garrison.store.events import EventFeed, Notice

log = logging.getLogger("garrison.auth")

POLL_SECONDS = 0.25
FLUSH_SECONDS = 15.0
PRUNE_SECONDS = 600.0
MAX_CACHED = 50_000
IP_BACKOFF_MAX = 300.0


class AuthFailure(Exception):
    """A credential was presented and is not valid; the reason is safe to show."""


@dataclass(slots=True)
class _IpFailures:
    count: int = 0
    until: float = 0.0


def _user_limits(user: User) -> dict[str, object]:
    """A user's own limit overrides, as Identity fields."""
    return {
        "rates": tuple(Rate.parse(r) for r in user.rate) if user.rate else None,
        "budget": Budget.parse(user.tokens) if user.tokens else None,
    }


class AuthService:
    """One per worker process; survives configuration reloads (`configure`)."""

    def __init__(
        self, engine: Engine, config: AuthConfig, client_certs: ClientCertsConfig | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.revocation = Revocation(engine, client_certs or ClientCertsConfig())
        self.revocation.refresh_internal()
        self.users = Users(engine)
        self.keys = ApiKeys(engine)
        self.sessions = Sessions(engine, config.session_idle, config.session_max)
        self.signing = SigningKeys(
            engine,
            rotate_after=config.signing_key_rotation,
            max_token_lifetime=max(config.token_lifetime, config.assertion_lifetime),
        )
        self.signing.load()
        self.issuer = TokenIssuer(self.signing, config.issuer, config.audience)
        self.verifier = self._make_verifier(config)
        self.feed = EventFeed(engine)
        self.directory: dict[str, User] = {u.name: u for u in self.users.list()}
        self._keys: dict[str, Identity] = {}
        self._sessions: dict[str, tuple[SessionRecord, Identity]] = {}
        self._tokens: dict[str, Identity] = {}
        self._key_uses: dict[str, float] = {}
        self._session_seen: dict[str, float] = {}
        self._ip_failures: dict[str, _IpFailures] = {}
        self._task: asyncio.Task[None] | None = None
        self._verifier_start: asyncio.Future[None] | None = None
        self._pending: set[asyncio.Future[None]] = set()

    def _make_verifier(self, config: AuthConfig) -> TokenVerifier:
        return TokenVerifier(
            self.signing, config.issuer, config.audience, config.jwt_issuer, leeway=30.0
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.verifier.start()
        self._task = asyncio.ensure_future(self._background())

    def configure(self, config: AuthConfig) -> None:
        """Apply a reloaded `[auth]` section. Caches are cleared: policy inputs may have changed."""
        if config == self.config:
            return
        self.config = config
        self.sessions.idle = config.session_idle
        self.sessions.max_age = config.session_max
        self.issuer = TokenIssuer(self.signing, config.issuer, config.audience)
        self.verifier = self._make_verifier(config)
        self._verifier_start = asyncio.ensure_future(self.verifier.start())
        self._clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._flush)

    def _clear(self) -> None:
        self._keys.clear()
        self._sessions.clear()
        self._tokens.clear()

    async def _background(self) -> None:
        flushed = pruned = time.monotonic()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                notices = await asyncio.to_thread(self.feed.poll)
                if notices:
                    await self._apply(notices)
                revocation = self.revocation
                if revocation.enabled and (
                    any(n.topic == "cert" for n in notices) or time.time() >= revocation.next_due
                ):
                    await asyncio.to_thread(revocation.refresh_internal)
                await revocation.refresh_crl()
                now = time.monotonic()
                if now - flushed >= FLUSH_SECONDS:
                    flushed = now
                    await asyncio.to_thread(self._flush)
                if now - pruned >= PRUNE_SECONDS:
                    pruned = now
                    await asyncio.to_thread(self._maintain)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be briefly locked or unreachable
                log.warning("auth cache refresh failed: %s", exc)

    async def _apply(self, notices: list[Notice]) -> None:
        users_changed = {n.subject for n in notices if n.topic == "user"}
        if users_changed:
            fresh = await asyncio.to_thread(self.users.list)
            self.directory = {u.name: u for u in fresh}
            self._clear()  # roles, disablement and key owners all hang on users
        if any(n.topic == "key" for n in notices):
            changed = {n.subject for n in notices if n.topic == "key"}
            for text in [t for t, ident in self._keys.items() if ident.key_id in changed]:
                del self._keys[text]
        for notice in notices:
            if notice.topic == "session":
                self._sessions.pop(notice.subject, None)
        if any(n.topic == "keys" for n in notices):
            await asyncio.to_thread(self.signing.load)
            self.verifier.reload_own_keys()
            self._tokens.clear()

    def _flush(self) -> None:
        uses, self._key_uses = self._key_uses, {}
        seen, self._session_seen = self._session_seen, {}
        if uses:
            self.keys.record_use(uses)
        if seen:
            self.sessions.record_seen(seen.items())

    def _maintain(self) -> None:
        self.feed.prune()
        self.signing.load()  # rotates the signing key when it is due
        self.verifier.reload_own_keys()

    # -- API keys -------------------------------------------------------------------------------
    def identify_key(self, text: str, now: float) -> Identity | Awaitable[Identity]:
        """The identity of an API key, or AuthFailure (raised, or from the awaitable)."""
        ident = self._keys.get(text)
        if ident is not None:
            if now < ident.valid_until:
                self._key_uses[ident.key_id or ""] = now
                return ident
            del self._keys[text]
        if parse_key(text) is None:
            raise AuthFailure("malformed API key")
        return self._load_key(text, now)

    async def _load_key(self, text: str, now: float) -> Identity:
        record = await asyncio.to_thread(self.keys.verify, text, now)
        if record is None:
            raise AuthFailure("invalid, revoked or expired API key")
        ident = self._key_identity(record)
        if ident is None:
            raise AuthFailure("the key's owner is disabled")
        self._remember(self._keys, text, ident)
        self._key_uses[record.id] = now
        return ident

    def _key_identity(self, record: KeyRecord) -> Identity | None:
        owner = self.directory.get(record.owner) if record.owner else None
        if record.owner and (owner is None or owner.disabled):
            return None
        return Identity(
            method="api_key",
            name=record.owner or f"key:{record.name}",
            email=owner.email if owner else None,
            roles=owner.roles if owner else (),
            scopes=frozenset(record.scopes),
            key_id=record.id,
            valid_until=record.expires_at or float("inf"),
            rates=tuple(Rate.parse(r) for r in record.rate) if record.rate else None,
            budget=Budget.parse(record.tokens) if record.tokens else None,
        )

    # -- sessions -------------------------------------------------------------------------------
    def identify_session(self, cookie: str, now: float) -> Identity | Awaitable[Identity] | None:
        """The identity of a session cookie; None when the cookie is not (or no longer) valid."""
        id_hash = self.sessions.parse_cookie(cookie)
        if id_hash is None:
            return None
        cached = self._sessions.get(id_hash)
        if cached is not None:
            record, ident = cached
            if record.alive(now, self.config.session_idle):
                record.last_seen = now
                self._session_seen[id_hash] = now
                return ident
            del self._sessions[id_hash]
            if record.revoked or now >= record.expires_at:
                return None
            # Idle here, but another worker may have seen it since: ask the store.
        return self._load_session(id_hash, now)

    async def _load_session(self, id_hash: str, now: float) -> Identity | None:
        record = await asyncio.to_thread(self.sessions.lookup, id_hash)
        if record is None or not record.alive(now, self.config.session_idle):
            return None
        user = self.directory.get(record.user)
        if user is None or user.disabled:
            return None
        if user.credentials_changed_at and record.created_at < user.credentials_changed_at:
            return None
        ident = Identity(
            method="session",
            name=user.name,
            email=user.email,
            roles=user.roles,
            session_hash=id_hash,
            valid_until=record.expires_at,
            **_user_limits(user),
        )
        record.last_seen = now
        self._session_seen[id_hash] = now
        self._remember(self._sessions, id_hash, (record, ident))
        return ident

    async def check_password(self, name: str, password: str, now: float) -> User | None:
        """argon2 in a thread: the event loop keeps serving while a password is checked.

        A failed attempt on a real account is counted after the answer, not before it, so
        existing and unknown accounts answer in the same time.
        """
        user, failed = await asyncio.to_thread(self.users.check, name, password, now)
        if failed is not None:
            task = asyncio.ensure_future(asyncio.to_thread(self.users.record_failure, failed, now))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return user

    async def login(self, name: str, password: str, now: float) -> tuple[str, User] | None:
        """Check a password and open a session: (cookie value, user)."""
        user = await self.check_password(name, password, now)
        if user is None:
            return None
        cookie, _record = await asyncio.to_thread(self.sessions.create, user.name, now)
        return cookie, user

    def session_user(self, cookie: str) -> str | None:
        """Whose session this cookie is, when this worker has it cached (no store read)."""
        id_hash = self.sessions.parse_cookie(cookie)
        cached = self._sessions.get(id_hash) if id_hash else None
        return cached[1].name if cached else None

    async def logout(self, cookie: str, everywhere: bool = False) -> None:
        """End this session (or every session of its user) on every worker."""
        id_hash = self.sessions.parse_cookie(cookie)
        if id_hash is None:
            return
        cached = self._sessions.pop(id_hash, None)
        if everywhere:
            record = cached[0] if cached else await asyncio.to_thread(self.sessions.lookup, id_hash)
            if record is not None:
                await asyncio.to_thread(self.sessions.revoke_user, record.user)
                return
        await asyncio.to_thread(self.sessions.revoke, id_hash)

    # -- JWTs -----------------------------------------------------------------------------------
    def identify_token(self, token: str, now: float) -> Identity | Awaitable[Identity]:
        ident = self._tokens.get(token)
        if ident is not None:
            if now < ident.valid_until:
                return ident
            del self._tokens[token]
        try:
            claims = self.verifier.verify(token, now)
        except UnknownKey:
            return self._load_token(token, now)  # an external issuer may have a new key
        except InvalidToken as exc:
            raise AuthFailure(str(exc)) from None
        return self._token_identity(token, claims)

    async def _load_token(self, token: str, now: float) -> Identity:
        try:
            claims = await self.verifier.verify_async(token, now)
        except InvalidToken as exc:
            raise AuthFailure(str(exc)) from None
        return self._token_identity(token, claims)

    def _token_identity(self, token: str, claims: Claims) -> Identity:
        roles = claims.roles
        email = claims.email
        overrides: dict[str, object] = {}
        known = self.directory.get(claims.subject) if claims.own else None
        if known is not None:
            overrides = _user_limits(known)
        if claims.own:
            # Garrison's own tokens die with the account or a password change.
            user = self.directory.get(claims.subject)
            if user is not None:
                changed = user.credentials_changed_at
                if user.disabled or (changed and (claims.issued_at or 0) < changed):
                    raise AuthFailure("token revoked")
                roles, email = user.roles, user.email
            elif not claims.subject.startswith("key:"):
                raise AuthFailure("token revoked")
        ident = Identity(
            method="jwt",
            name=claims.subject,
            email=email,
            roles=roles,
            scopes=None if claims.scopes is None else frozenset(claims.scopes),
            valid_until=claims.expires_at,
            **overrides,  # type: ignore[arg-type]
        )
        self._remember(self._tokens, token, ident)
        return ident

    def issue_token(
        self, subject: str, roles: tuple[str, ...], email: str | None, scopes: list[str] | None
    ) -> tuple[str, int]:
        lifetime = self.config.token_lifetime
        token = self.issuer.issue(
            subject, lifetime=lifetime, roles=roles, email=email, scopes=scopes
        )
        return token, int(lifetime)

    def assertion(self, ident: Identity, audience: str, now: float) -> tuple[str, float]:
        """A short-lived JWT for the upstream that says who is calling (like Pomerium's)."""
        lifetime = self.config.assertion_lifetime
        extra: dict[str, object] = {"amr": [ident.method]}
        if ident.scopes is not None:
            extra["scope"] = " ".join(sorted(ident.scopes))
        token = self.issuer.issue(
            ident.name,
            lifetime=lifetime,
            audience=audience,
            roles=ident.roles,
            email=ident.email,
            extra=extra,
            now=now,
        )
        return token, now + lifetime

    # -- per-IP login backoff ------------------------------------------------------------------
    def ip_blocked_for(self, ip: str, now: float) -> float:
        """Seconds this IP must still wait before another login attempt (0: go ahead)."""
        entry = self._ip_failures.get(ip)
        return max(0.0, entry.until - now) if entry else 0.0

    def ip_failed(self, ip: str, now: float) -> None:
        entry = self._ip_failures.setdefault(ip, _IpFailures())
        entry.count += 1
        over = entry.count - self.config.ip_free_failures
        if over >= 0:
            entry.until = now + min(2.0 ** min(over, 16), IP_BACKOFF_MAX)
        if len(self._ip_failures) > 100_000:  # bounded: forget the oldest
            for stale in list(self._ip_failures)[:10_000]:
                del self._ip_failures[stale]

    def ip_succeeded(self, ip: str) -> None:
        self._ip_failures.pop(ip, None)

    @staticmethod
    def _remember(cache: dict, key: str, value: object) -> None:  # type: ignore[type-arg]
        if len(cache) >= MAX_CACHED:
            del cache[next(iter(cache))]
        cache[key] = value

"""Scoped API keys for scripts and SDKs: `gk_<id>_<secret>`, stored only as a hash.

The id (12 lowercase base32 characters) is public: it names the key in `garrison key list`
and lets verification find the row with one indexed lookup instead of hashing against every
key. The secret is 32 random bytes (base64url, no padding) and is shown once, at creation or
rotation. Only SHA-256 of the secret text is stored. A slow password hash (argon2) buys
nothing here: it exists to slow down guessing of low-entropy human passwords, while a
256-bit random secret cannot be brute-forced from its hash, and a fast hash keeps
verification cheap enough to run on a cache miss in the request path.

The identify stage caches verified keys (auth/service.py) and batches `record_use`, so a
request never waits on a database read or write once its key is known.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError

from garrison.store.db import api_keys
from garrison.store.events import publish

PREFIX = "gk_"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_LENGTH = 12
_SECRET_BYTES = 32
_KEY_RE = re.compile(r"gk_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")
_SCOPE_RE = re.compile(r"[a-z0-9:_.-]{1,64}")
_MAX_NAME = 128
_MAX_OWNER = 64


class ApiKeyError(Exception):
    """A key operation was refused (bad input, unknown or revoked key); the text says why."""


class UnknownApiKey(ApiKeyError, KeyError):
    """No key has this id. Also a KeyError, so callers may treat it as a failed lookup."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What is known about a key, never its secret. Times are UTC epoch seconds."""

    id: str
    name: str
    owner: str | None
    scopes: tuple[str, ...]
    expires_at: float | None
    revoked_at: float | None
    created_at: float
    last_used_at: float | None
    rate: tuple[str, ...] | None = None
    tokens: str | None = None

    def status(self, now: float) -> str:
        """`active`, `revoked` or `expired`; revocation wins because it was deliberate."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def _new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()


def _hash(secret: str) -> str:
    # The secret's text is hashed, not its decoded bytes, so a non-canonical base64 spelling
    # of the same bytes is a different (wrong) key rather than an alias.
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _matches(candidate: str, stored: str | None) -> bool:
    return stored is not None and hmac.compare_digest(candidate.encode(), stored.encode())


def parse_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) if `presented` has exactly the shape of a Garrison key, else None."""
    if not isinstance(presented, str):
        return None
    match = _KEY_RE.fullmatch(presented)
    return (match.group(1), match.group(2)) if match else None


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        owner=row.owner,
        scopes=tuple(row.scopes or ()),
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        rate=tuple(row.rate) if row.rate else None,
        tokens=row.tokens,
    )


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    cleaned = list(dict.fromkeys(scopes))  # drop repeats, keep the order given
    if not cleaned:
        raise ApiKeyError("an API key needs at least one scope")
    for scope in cleaned:
        if not isinstance(scope, str) or not _SCOPE_RE.fullmatch(scope):
            raise ApiKeyError(f"invalid scope {scope!r}: use 1-64 of a-z 0-9 : _ . -")
    return cleaned


def _check_limits(rate: Iterable[str] | None, tokens: str | None) -> list[str] | None:
    from garrison.limits.model import check_overrides

    try:
        return check_overrides(rate, tokens)
    except ValueError as exc:
        raise ApiKeyError(str(exc)) from None


class ApiKeys:
    """API keys in the durable store. Administrative calls write; `verify` only reads."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self,
        name: str,
        scopes: Iterable[str],
        expires_in: float | None = None,
        owner: str | None = None,
        now: float | None = None,
        rate: Iterable[str] | None = None,
        tokens: str | None = None,
    ) -> tuple[KeyRecord, str]:
        """Make a key; returns its record and the full key text, which is never shown again."""
        now = time.time() if now is None else now
        name = name.strip()
        if not name or len(name) > _MAX_NAME:
            raise ApiKeyError(f"key name must be 1-{_MAX_NAME} characters")
        if owner is not None and not 0 < len(owner) <= _MAX_OWNER:
            raise ApiKeyError(f"owner must be 1-{_MAX_OWNER} characters")
        scope_list = _check_scopes(scopes)
        if expires_in is not None and expires_in <= 0:
            raise ApiKeyError("expiry must be in the future")
        expires_at = None if expires_in is None else now + expires_in
        rate_list = _check_limits(rate, tokens)
        secret = _new_secret()
        for _attempt in range(5):  # 60-bit ids: a clash is astronomically rare, but not fatal
            key_id = _new_id()
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        api_keys.insert().values(
                            id=key_id,
                            name=name,
                            owner=owner,
                            scopes=scope_list,
                            secret_hash=_hash(secret),
                            expires_at=expires_at,
                            created_at=now,
                            rate=rate_list,
                            tokens=tokens,
                        )
                    )
            except IntegrityError:
                continue
            record = KeyRecord(
                key_id,
                name,
                owner,
                tuple(scope_list),
                expires_at,
                None,
                now,
                None,
                tuple(rate_list) if rate_list else None,
                tokens,
            )
            return record, f"{PREFIX}{key_id}_{secret}"
        raise ApiKeyError("could not allocate a unique key id")

    def get(self, key_id: str) -> KeyRecord:
        """The record for `key_id`; UnknownApiKey if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise UnknownApiKey(f"no API key with id {key_id!r}")
        return _record(row)

    def list(self) -> builtins.list[KeyRecord]:
        """Every key, oldest first, without any secret material."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
            ).all()
        return [_record(row) for row in rows]

    def revoke(self, key_id: str, now: float | None = None) -> KeyRecord:
        """Revoke at once (and any rotation grace with it). Repeating it keeps the first time."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now, previous_hash=None, previous_valid_until=None)
            )
            publish(conn, "key", key_id, now)
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise UnknownApiKey(f"no API key with id {key_id!r}")
        return _record(row)

    def set_limits(self, key_id: str, rate: Iterable[str] | None, tokens: str | None) -> KeyRecord:
        """The key's own rates and token budget (None: the routes' limits apply). Every worker
        drops its cached identity of the key with the change notice."""
        rate_list = _check_limits(rate, tokens)
        with self.engine.begin() as conn:
            result = conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(rate=rate_list, tokens=tokens)
            )
            if result.rowcount != 1:
                raise UnknownApiKey(f"no API key with id {key_id!r}")
            publish(conn, "key", key_id)
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        return _record(row)

    def rotate(self, key_id: str, grace_seconds: float = 0.0, now: float | None = None) -> str:
        """Give the key a new secret; the old one keeps working for `grace_seconds` (0: not at all).

        Only one previous secret is kept: rotating again inside a grace period ends that grace.
        """
        now = time.time() if now is None else now
        if grace_seconds < 0:
            raise ApiKeyError("grace period must not be negative")
        secret = _new_secret()
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise UnknownApiKey(f"no API key with id {key_id!r}")
            status = _record(row).status(now)
            if status != "active":
                raise ApiKeyError(f"API key {key_id} is {status}; create a new one instead")
            keep_old = grace_seconds > 0
            result = conn.execute(
                update(api_keys)
                # Compare-and-swap on the current hash: a concurrent rotation makes this a
                # no-op instead of silently discarding the other one's secret.
                .where(api_keys.c.id == key_id, api_keys.c.secret_hash == row.secret_hash)
                .values(
                    secret_hash=_hash(secret),
                    previous_hash=row.secret_hash if keep_old else None,
                    previous_valid_until=now + grace_seconds if keep_old else None,
                )
            )
            if result.rowcount != 1:
                raise ApiKeyError(f"API key {key_id} was changed concurrently; try again")
            publish(conn, "key", key_id, now)
        return f"{PREFIX}{key_id}_{secret}"

    def verify(self, presented: str, now: float | None = None) -> KeyRecord | None:
        """The key's record if `presented` is a valid, live key; None for anything else.

        Malformed text is refused before any database access, so junk in an Authorization
        header costs a regex, not a query. Secrets are compared with hmac.compare_digest.
        """
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id, secret = parsed
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            return None
        candidate = _hash(secret)
        current = _matches(candidate, row.secret_hash)
        previous = _matches(candidate, row.previous_hash)
        in_grace = row.previous_valid_until is not None and now < row.previous_valid_until
        if not (current or (previous and in_grace)):
            return None
        record = _record(row)
        return record if record.status(now) == "active" else None

    def record_use(self, ids_with_times: dict[str, float]) -> None:
        """Set last_used_at for many keys in one transaction (the gateway batches uses).

        A time never moves backwards, so batches flushed out of order are harmless; ids that
        no longer exist are ignored.
        """
        if not ids_with_times:
            return
        stmt = (
            update(api_keys)
            .where(
                api_keys.c.id == bindparam("key_id"),
                or_(
                    api_keys.c.last_used_at.is_(None),
                    api_keys.c.last_used_at < bindparam("used_at"),
                ),
            )
            .values(last_used_at=bindparam("used_at"))
        )
        params = [{"key_id": k, "used_at": t} for k, t in ids_with_times.items()]
        with self.engine.begin() as conn:
            conn.execute(stmt, params)


__all__ = ["PREFIX", "ApiKeyError", "ApiKeys", "KeyRecord", "UnknownApiKey", "parse_key"]

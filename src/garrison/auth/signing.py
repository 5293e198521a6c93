"""Garrison's own token signing keys: ES256 (P-256), kept in the store, rotated in place.

Every worker process loads the same keys from the database, so a token signed by one worker
verifies in every other. Creation and rotation run inside one write-locked transaction (SQLite:
the write lock taken by a first no-op UPDATE; PostgreSQL: a self-conflicting table lock), so
workers that start at the same moment never mint competing keys: the first one creates the key,
the others find it.

Private keys are stored as unencrypted PKCS#8 PEM. The database file is created 0600 in a 0700
data dir (see `garrison.store.db`); encrypting them with a key kept next to the database would
add nothing.

A retired key stays published (JWKS, verification) until `retired_at + max_token_lifetime`, the
last moment a token it signed can still be alive; after that it is deleted.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, Engine, delete, select, text, update

from garrison.store.db import events, signing_keys

ALGORITHM = "ES256"


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The kid: base64url of the first 16 bytes of SHA-256 over the DER SubjectPublicKeyInfo.

    Derived from the key itself, so two processes can never give one kid to different keys.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _b64(hashlib.sha256(der).digest()[:16])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    private: ec.EllipticCurvePrivateKey
    created_at: float
    retired_at: float | None


class SigningKeys:
    """ES256 (P-256) keys kept in the store; the newest unretired key signs."""

    def __init__(self, engine: Engine, *, rotate_after: float, max_token_lifetime: float) -> None:
        if rotate_after <= 0 or max_token_lifetime <= 0:
            raise ValueError("rotate_after and max_token_lifetime must be more than 0")
        self._engine = engine
        self.rotate_after = rotate_after
        self.max_token_lifetime = max_token_lifetime
        self._current: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        self._keys: list[_Key] = []

    # -- store ------------------------------------------------------------------------------

    def load(self, now: float | None = None) -> None:
        """Read the keys; create the first one, or rotate a current key older than rotate_after.

        Safe to call from many processes at once: the decision and the insert happen under one
        write lock, so all of them end up with the same current key.
        """
        now = time.time() if now is None else now
        with self._engine.begin() as conn:
            _lock(conn)
            keys = _read(conn)
            current = _pick_current(keys)
            if current is None or now - current.created_at >= self.rotate_after:
                self._create(conn, keys, now)
                keys = _read(conn)
            self._prune(conn, keys, now)
            keys = _read(conn)
        self._install(keys)

    def rotate(self, now: float | None = None) -> str:
        """Force a new signing key now (CLI, suspected leak); return its kid."""
        now = time.time() if now is None else now
        with self._engine.begin() as conn:
            _lock(conn)
            keys = _read(conn)
            kid = self._create(conn, keys, now)
            self._prune(conn, keys, now)
            keys = _read(conn)
        self._install(keys)
        return kid

    def _create(self, conn: Connection, keys: Sequence[_Key], now: float) -> str:
        """Insert a new key, retire every other unretired one, and tell the other workers."""
        private = ec.generate_private_key(ec.SECP256R1())
        kid = key_id(private.public_key())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        # Never older than a key already there, so "newest signs" keeps meaning "this one".
        created = max([now, *(k.created_at for k in keys)])
        conn.execute(
            signing_keys.insert().values(
                kid=kid, alg=ALGORITHM, private_pem=pem, created_at=created, retired_at=None
            )
        )
        conn.execute(
            update(signing_keys)
            .where(signing_keys.c.retired_at.is_(None), signing_keys.c.kid != kid)
            .values(retired_at=now)
        )
        conn.execute(events.insert().values(topic="keys", subject="signing", at=now))
        return kid

    def _prune(self, conn: Connection, keys: Sequence[_Key], now: float) -> None:
        """Delete retired keys whose last token has expired: nothing can need them again."""
        dead = [k.kid for k in keys if not self._published(k, now)]
        if dead:
            conn.execute(delete(signing_keys).where(signing_keys.c.kid.in_(dead)))

    def _install(self, keys: list[_Key]) -> None:
        current = _pick_current(keys)
        if current is None:  # only if someone deleted rows under us; load() again fixes it
            raise RuntimeError("no signing key in the store")
        self._keys = keys
        self._current = (current.kid, current.private)

    def _published(self, key: _Key, now: float) -> bool:
        return key.retired_at is None or now < key.retired_at + self.max_token_lifetime

    # -- in memory --------------------------------------------------------------------------

    @property
    def current(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        """(kid, private key) that signs new tokens."""
        if self._current is None:
            raise RuntimeError("SigningKeys.load() has not been called")
        return self._current

    def public_keys(self, now: float | None = None) -> dict[str, ec.EllipticCurvePublicKey]:
        """kid -> public key for every key whose tokens may still be alive."""
        now = time.time() if now is None else now
        return {k.kid: k.private.public_key() for k in self._keys if self._published(k, now)}

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public JWKS document (RFC 7517): public members only, never "d"."""
        out = []
        for kid, public in self.public_keys(now).items():
            numbers = public.public_numbers()
            out.append(
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": _b64(numbers.x.to_bytes(32, "big")),
                    "y": _b64(numbers.y.to_bytes(32, "big")),
                    "kid": kid,
                    "alg": ALGORITHM,
                    "use": "sig",
                }
            )
        return {"keys": out}


def _lock(conn: Connection) -> None:
    """Take the database write lock before reading, so read-decide-insert is atomic."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE"))
    else:
        # SQLite takes its (single) write lock at the first write of a transaction, even one
        # that changes no row; later readers-then-writers wait on busy_timeout.
        conn.execute(update(signing_keys).where(text("1 = 0")).values(alg=signing_keys.c.alg))


def _read(conn: Connection) -> list[_Key]:
    keys = []
    for row in conn.execute(select(signing_keys)):
        if row.alg != ALGORITHM:
            continue
        private = serialization.load_pem_private_key(row.private_pem.encode("ascii"), None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            continue
        keys.append(_Key(row.kid, private, row.created_at, row.retired_at))
    return keys


def _pick_current(keys: Sequence[_Key]) -> _Key | None:
    live = [k for k in keys if k.retired_at is None]
    return max(live, key=lambda k: (k.created_at, k.kid), default=None)

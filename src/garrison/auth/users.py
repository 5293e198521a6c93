"""Browser-login accounts in the durable store, with per-account backoff on failed logins.

Groundwork for issue 3: the CLI manages accounts here; the login page (a later change) calls
`Users.authenticate`. Every outcome of `authenticate` costs one argon2 verify, so its timing
does not tell an unknown user from a locked, disabled or mistyped one.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from garrison.auth.passwords import dummy_verify, hash_password, needs_rehash, verify_password
from garrison.store.db import users
from garrison.store.events import publish

NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ROLE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_EMAIL = 320

FREE_FAILURES = 5
"""Consecutive failures allowed before the account starts locking."""
MAX_LOCK_SECONDS = 15 * 60.0


class UserError(Exception):
    """A refused account operation; the message is fit to show an operator."""


@dataclass(frozen=True)
class User:
    name: str
    email: str | None
    roles: tuple[str, ...]
    disabled: bool
    failed_logins: int
    locked_until: float | None
    credentials_changed_at: float | None = None
    rate: tuple[str, ...] | None = None  # limit overrides (see garrison.limits)
    tokens: str | None = None

    def locked(self, now: float) -> bool:
        """Whether a login attempt at `now` is refused without looking at the password."""
        return self.locked_until is not None and now < self.locked_until


def lock_seconds(failures: int) -> float:
    """Backoff after `failures` consecutive failures: 0 up to 5, then 1, 2, 4 ... s, max 15 min."""
    if failures < FREE_FAILURES:
        return 0.0
    exponent = failures - FREE_FAILURES
    if exponent >= 10:  # 2**10 s already exceeds the cap; avoid huge ints
        return MAX_LOCK_SECONDS
    return min(float(2**exponent), MAX_LOCK_SECONDS)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    return name


def _check_roles(roles: Iterable[str]) -> list[str]:
    if isinstance(roles, str):
        raise UserError("roles must be a list of names, not one string")
    result: list[str] = []
    for role in roles:
        if not isinstance(role, str) or not ROLE_RE.fullmatch(role):
            raise UserError(f"invalid role {role!r}: use 1-64 of A-Z a-z 0-9 _ . : -")
        if role not in result:
            result.append(role)
    return result


def _check_email(email: str | None) -> str | None:
    if email is None:
        return None
    if (
        not isinstance(email, str)
        or len(email) > MAX_EMAIL
        or email.count("@") != 1
        or email.startswith("@")
        or email.endswith("@")
        or any(c.isspace() or ord(c) < 32 for c in email)
    ):
        raise UserError(f"invalid email address {email!r}")
    return email


def _password_hash(password: str) -> str:
    try:
        return hash_password(password)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _to_user(row: Any) -> User:
    return User(
        name=row.name,
        email=row.email,
        roles=tuple(row.roles or ()),
        disabled=bool(row.disabled),
        failed_logins=int(row.failed_logins),
        locked_until=row.locked_until,
        credentials_changed_at=getattr(row, "credentials_changed_at", None),
        rate=tuple(row.rate) if getattr(row, "rate", None) else None,
        tokens=getattr(row, "tokens", None),
    )


_PUBLIC_COLUMNS = (
    users.c.name,
    users.c.email,
    users.c.roles,
    users.c.disabled,
    users.c.failed_logins,
    users.c.locked_until,
    users.c.credentials_changed_at,
    users.c.rate,
    users.c.tokens,
)


class Users:
    """Account operations over one store Engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(
        self,
        name: str,
        password: str,
        roles: Iterable[str] = (),
        email: str | None = None,
    ) -> User:
        check_name(name)
        role_list = _check_roles(roles)
        email = _check_email(email)
        password_hash = _password_hash(password)
        now = time.time()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    users.insert().values(
                        name=name,
                        password_hash=password_hash,
                        email=email,
                        roles=role_list,
                        disabled=False,
                        failed_logins=0,
                        locked_until=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                publish(conn, "user", name, now)
        except IntegrityError:
            raise UserError(f"user {name!r} already exists") from None
        return User(name, email, tuple(role_list), False, 0, None)

    def get(self, name: str) -> User | None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(*_PUBLIC_COLUMNS).where(users.c.name == name)).first()
        return None if row is None else _to_user(row)

    def list(self) -> builtins.list[User]:
        """All accounts, sorted by name."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(*_PUBLIC_COLUMNS).order_by(users.c.name)).all()
        return [_to_user(row) for row in rows]

    def _update(self, name: str, **values: Any) -> None:
        check_name(name)
        with self.engine.begin() as conn:
            result = conn.execute(
                users.update().where(users.c.name == name).values(updated_at=time.time(), **values)
            )
            if result.rowcount:
                publish(conn, "user", name)
        if result.rowcount == 0:
            raise UserError(f"no such user {name!r}")

    def disable(self, name: str) -> None:
        """Disable the account; its sessions and the tokens Garrison issued to it die with it."""
        self._update(name, disabled=True, credentials_changed_at=time.time())

    def enable(self, name: str) -> None:
        self._update(name, disabled=False)

    def set_password(self, name: str, password: str) -> None:
        """New password; also lifts any lockout, since the operator vouches for the user."""
        check_name(name)
        password_hash = _password_hash(password)
        self._update(
            name,
            password_hash=password_hash,
            failed_logins=0,
            locked_until=None,
            credentials_changed_at=time.time(),
        )

    def set_roles(self, name: str, roles: Iterable[str]) -> None:
        self._update(name, roles=_check_roles(roles))

    def set_limits(self, name: str, rate: Iterable[str] | None, tokens: str | None) -> None:
        """Per-user limit overrides (None: the route's own)."""
        from garrison.limits.model import check_overrides

        try:
            rates = check_overrides(rate, tokens)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self._update(name, rate=rates, tokens=tokens)

    def authenticate(self, name: str, password: str, now: float) -> User | None:
        """The user if `password` is right and the account usable at `now`, else None.

        Always one argon2 verify (real or dummy). Failures while locked are not counted, so an
        attacker hammering a locked account cannot push the lock further out.
        """
        user, failed = self.check(name, password, now)
        if failed is not None:
            self.record_failure(failed, now)
        return user

    def check(self, name: str, password: str, now: float) -> tuple[User | None, str | None]:
        """Like `authenticate`, but a failure to count is returned (as the account name)
        instead of written: the gateway answers first and writes after, so the time of the
        answer does not tell an existing account (a write) from an unknown one (none)."""
        row = None
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(*_PUBLIC_COLUMNS, users.c.password_hash).where(users.c.name == name)
                ).first()
        if row is None:
            dummy_verify(password)
            return None, None
        user = _to_user(row)
        if user.locked(now):
            dummy_verify(password)
            return None, None
        if not verify_password(row.password_hash, password):
            return None, name
        if user.disabled:
            return None, None
        self._record_success(name, password, row.password_hash, user)
        return User(user.name, user.email, user.roles, False, 0, None), None

    def record_failure(self, name: str, now: float) -> None:
        with self.engine.begin() as conn:
            # Increment in SQL so concurrent failures from several workers all count.
            conn.execute(
                users.update()
                .where(users.c.name == name)
                .values(failed_logins=users.c.failed_logins + 1)
            )
            failures = conn.execute(
                select(users.c.failed_logins).where(users.c.name == name)
            ).scalar_one_or_none()
            if failures is not None and failures >= FREE_FAILURES:
                conn.execute(
                    users.update()
                    .where(users.c.name == name)
                    .values(locked_until=now + lock_seconds(failures))
                )
                publish(conn, "user", name, now)

    def _record_success(self, name: str, password: str, old_hash: str, user: User) -> None:
        values: dict[str, Any] = {}
        if user.failed_logins or user.locked_until is not None:
            values.update(failed_logins=0, locked_until=None)
        if needs_rehash(old_hash):
            values["password_hash"] = hash_password(password)
        if values:
            with self.engine.begin() as conn:
                conn.execute(
                    users.update()
                    .where(users.c.name == name, users.c.password_hash == old_hash)
                    .values(**values)
                )

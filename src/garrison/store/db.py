"""The durable store: one SQLAlchemy Core schema for SQLite (default) and PostgreSQL.

Never read on the hot path: request-time code works from caches that are invalidated by
events (DESIGN §3). Timestamps are UTC seconds since the epoch (floats), so both databases
store them the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)

SCHEMA_VERSION = 4

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", String(255), nullable=False),
    Column("email", String(320), nullable=True),
    Column("roles", JSON, nullable=False, default=list),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_logins", Integer, nullable=False, default=0),
    Column("locked_until", Float, nullable=True),
    # Sessions and Garrison-signed tokens issued before this time are void (password change,
    # disable): checked against the in-memory user directory, so no session table scan.
    Column("credentials_changed_at", Float, nullable=True),
    Column("rate", JSON, nullable=True),  # per-user limit overrides, like api_keys'
    Column("tokens", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("owner", String(64), nullable=True),
    Column("scopes", JSON, nullable=False, default=list),
    Column("secret_hash", String(128), nullable=False),
    Column("previous_hash", String(128), nullable=True),
    Column("previous_valid_until", Float, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=True),
    # Per-key limit overrides: a list of rate texts ("60/minute") and a token budget text.
    Column("rate", JSON, nullable=True),
    Column("tokens", String(64), nullable=True),
)

sessions = Table(
    "sessions",
    metadata,
    # SHA-256 of the cookie's session id: a copy of the database gives no live cookie.
    Column("id_hash", String(64), primary_key=True),
    Column("user", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    # Set when a newer key takes over signing; published in JWKS until its tokens expired.
    Column("retired_at", Float, nullable=True),
)

events = Table(
    "events",
    metadata,
    # Change notices that every worker polls to invalidate its caches (user:NAME, key:ID,
    # session:HASH, keys:signing); pruned after an hour.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(16), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("at", Float, nullable=False),
)

client_certs = Table(
    "client_certs",
    metadata,
    # Every client certificate the internal CA issued (never its key). Recorded before the
    # files are written, so a crash mid-issue leaves at worst a row for a cert nobody holds.
    Column("serial", String(40), primary_key=True),  # lower-case hex, no colons
    Column("name", String(64), nullable=False, index=True),
    Column("email", String(320), nullable=True),
    Column("roles", JSON, nullable=False, default=list),
    Column("fingerprint", String(64), nullable=False),  # SHA-256 of the DER, lower-case hex
    Column("not_before", Float, nullable=False),
    Column("not_after", Float, nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("revoke_reason", String(32), nullable=True),
    Column("replaced_by", String(40), nullable=True),
)

settings = Table(
    "settings",
    metadata,
    # Small shared values every process must agree on (the session cookie MAC key).
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

schema_info = Table(
    "schema_info",
    metadata,
    Column("version", Integer, primary_key=True),
)


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'garrison.db'}"


def open_store(url: str) -> Engine:
    """Connect and create the schema if needed. SQLite files are created 0600, in WAL mode."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    metadata.create_all(engine)
    with engine.begin() as conn:
        row = conn.execute(schema_info.select()).first()
        if row is None:
            conn.execute(schema_info.insert().values(version=SCHEMA_VERSION))
        elif row.version < SCHEMA_VERSION:
            # New tables come from create_all; new columns of old tables are added here.
            if row.version < 2:
                conn.execute(text("ALTER TABLE users ADD COLUMN credentials_changed_at FLOAT"))
            if row.version < 3:
                conn.execute(text("ALTER TABLE api_keys ADD COLUMN rate JSON"))
                conn.execute(text("ALTER TABLE api_keys ADD COLUMN tokens VARCHAR(64)"))
            if row.version < 4:
                conn.execute(text("ALTER TABLE users ADD COLUMN rate JSON"))
                conn.execute(text("ALTER TABLE users ADD COLUMN tokens VARCHAR(64)"))
            conn.execute(schema_info.update().values(version=SCHEMA_VERSION))
    return engine

"""The durable store: schema creation on a real SQLite file."""

from __future__ import annotations

import stat
from pathlib import Path

from sqlalchemy import inspect, text

from garrison.store.db import SCHEMA_VERSION, default_url, open_store, schema_info


def test_open_creates_a_private_file_with_the_schema(tmp_path: Path) -> None:
    engine = open_store(default_url(tmp_path))
    path = tmp_path / "garrison.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert {"users", "api_keys", "schema_info"} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(schema_info.select()).scalars().all() == [SCHEMA_VERSION]


def test_open_twice_keeps_one_schema_version(tmp_path: Path) -> None:
    open_store(default_url(tmp_path)).dispose()
    engine = open_store(default_url(tmp_path))
    with engine.connect() as conn:
        assert conn.execute(schema_info.select()).scalars().all() == [SCHEMA_VERSION]

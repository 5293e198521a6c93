"""The first account: without one, a gateway that is safe by default would let nobody in."""

from __future__ import annotations

import os
from pathlib import Path

from garrison.auth.passwords import generate_password
from garrison.auth.users import UserError, Users
from garrison.store.db import default_url, open_store

ADMIN = "admin"
ENV_PASSWORD = "GARRISON_ADMIN_PASSWORD"


def ensure_admin(data_dir: Path, password_file: Path | None) -> tuple[str, bool] | None:
    """Create `admin` (role admin) when the store has no user yet.

    Returns None when accounts already exist, else (password, generated): a generated password
    must be shown to the operator once; one given by env or file is not repeated.
    """
    engine = open_store(default_url(data_dir))
    try:
        users = Users(engine)
        if users.list():
            return None
        generated = False
        if password_file is not None:
            password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
        elif os.environ.get(ENV_PASSWORD):
            password = os.environ[ENV_PASSWORD]
        else:
            password, generated = generate_password(), True
        try:
            users.add(ADMIN, password, roles=["admin"])
        except UserError as exc:
            if "already exists" in str(exc):
                return None  # another process created it at the same moment
            raise
        return password, generated
    finally:
        engine.dispose()

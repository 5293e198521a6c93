"""A real store, CA and audit file in a temporary folder: the admin service without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from garrison.admin.guard import AdminGuard
from garrison.admin.service import AdminService
from garrison.auth.identity import Identity
from garrison.auth.service import AuthService
from garrison.config import Config, validate
from garrison.observe.audit import AuditLog
from garrison.pki.ca import CertificateAuthority
from garrison.store.db import open_store

T = TypeVar("T")
ADMIN_PASSWORD = "admin-password-for-tests"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class World:
    """Everything one test needs, built from one config."""

    def __init__(self, tmp: Path, config: Config) -> None:
        self.tmp = tmp
        self.config = config
        self.engine = open_store(f"sqlite:///{tmp / 'g.db'}")
        self.auth = AuthService(self.engine, config.auth, config.client_certs)
        self.audit = AuditLog(config.audit, tmp)
        self.ca = CertificateAuthority.load_or_create(tmp)
        self.service = AdminService(self.auth, self.audit, config, self.ca)
        self.guard = AdminGuard(config.admin, self.auth, self.audit)
        self.auth.users.add("root", ADMIN_PASSWORD, roles=["admin"])
        self.auth.users.add("carol", "carol-password", roles=["staff"])
        self.reload_directory()
        self.actor = Identity(method="session", name="root", roles=("admin",))

    def reload_directory(self) -> None:
        """What the background poll does after a user notice."""
        self.auth.directory = {u.name: u for u in self.auth.users.list()}
        self.auth._clear()

    def audit_text(self) -> str:
        self.audit.flush()
        path = self.tmp / "audit.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        self.audit.close()
        self.engine.dispose()


def make_world(tmp: Path, **sections: Any) -> World:
    return World(tmp, validate(sections))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    yield w
    w.close()

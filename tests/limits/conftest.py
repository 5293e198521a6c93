"""A real redis-server per test (tests/support/redis.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis import REDIS_SERVER, RedisServer, redis_server_or_skip

__all__ = ["REDIS_SERVER", "RedisServer", "redis_server"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = redis_server_or_skip(tmp_path)
    try:
        yield server
    finally:
        server.stop()

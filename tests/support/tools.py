"""What a test does when a tool it drives (openssl, curl, nginx, ...) is not installed: fail
loudly in CI (`CI=true`), where `make test` installs every tool, and skip with the reason on a
developer's machine."""

from __future__ import annotations

import os

import pytest


def missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)

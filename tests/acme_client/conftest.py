"""Fixtures for the ACME tests: a real Pebble per test (it starts in a fraction of a second and
makes a new root each time, so no test sees another's authorizations or accounts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.acme.manager import AcmeManager
from garrison.config import AcmeConfig
from tests.support.pebble import Pebble, pebble_or_skip
from tests.support.webhook import WebhookReceiver

NAMES = ["chat.example.com", "api.example.com"]


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    work = tmp_path / "pebble"
    work.mkdir()
    server = pebble_or_skip(work)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as hook:
        yield hook


def acme_config(
    pebble: Pebble, webhook: WebhookReceiver | None = None, **extra: object
) -> AcmeConfig:
    return AcmeConfig(
        directory=pebble.directory,
        email="ops@example.com",
        names=NAMES,
        ca_bundle=str(pebble.listener_ca),
        alert_webhook=webhook.hook_url if webhook else "",
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def manager(tmp_path: Path, pebble: Pebble, webhook: WebhookReceiver) -> AcmeManager:
    return AcmeManager(tmp_path / "data", acme_config(pebble, webhook, retry_min="2s"))

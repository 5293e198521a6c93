"""A real HTTP endpoint (aiohttp, in a thread) that records the JSON POSTed to it: the
receiving side of `alert_webhook`."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tests.support.upstream import BackgroundApp


class WebhookReceiver(BackgroundApp):
    """`with WebhookReceiver() as hook:`; `hook.url` to configure, `hook.received` to check."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook/{secret}", self._post)
        return app

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hook/s3cr3t-path-token"

    async def _post(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.json_response({"ok": True})

    def wait(self, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait (bounded) until `count` alerts arrived; return them."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.received) >= count, f"{len(self.received)} alerts, wanted {count}"
        return self.received

"""Stage: the gateway's own endpoints under /.garrison/ (health now; login, metrics later)."""

from __future__ import annotations

from collections.abc import Callable

from garrison import __version__
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import Stage, StageResult

PREFIX = "/.garrison/"
Handler = Callable[[Exchange], StageResult]


class GatewayEndpoints(Stage):
    """A small router for paths the gateway answers itself; the upstream never sees /.garrison/."""

    name = "endpoints"

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {"/.garrison/healthz": self.healthz}

    def add(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def __call__(self, ex: Exchange) -> StageResult:
        if not ex.path.startswith(PREFIX):
            return None
        handler = self.handlers.get(ex.path)
        if handler is None:
            return error_reply(404, "not_found", "no such gateway endpoint", html=ex.wants_html())
        return handler(ex)

    @staticmethod
    def healthz(ex: Exchange) -> Reply:
        return Reply.json(200, {"status": "ok", "version": __version__})

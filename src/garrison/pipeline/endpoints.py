"""Stage: the gateway's own endpoints under /.garrison/ (health, login, metrics, admin)."""

from __future__ import annotations

from collections.abc import Callable

from garrison import __version__
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import Stage, StageResult

PREFIX = "/.garrison/"
Handler = Callable[[Exchange], StageResult]


class GatewayEndpoints(Stage):
    """A small router for paths the gateway answers itself; the upstream never sees /.garrison/.

    Exact paths first, then prefixes (a whole subtree, like /.garrison/api/, handled by one
    object that routes inside it), longest prefix first. A prefix `/x/` also takes `/x`.
    """

    name = "endpoints"

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {"/.garrison/healthz": self.healthz}
        self.prefixes: list[tuple[str, Handler]] = []

    def add(self, path: str, handler: Handler) -> None:
        self.handlers[path] = handler

    def add_prefix(self, prefix: str, handler: Handler) -> None:
        if not prefix.startswith(PREFIX) or not prefix.endswith("/") or prefix == PREFIX:
            raise ValueError(f"a prefix is a folder under {PREFIX}, ending in /: {prefix!r}")
        self.prefixes = [(p, h) for p, h in self.prefixes if p != prefix]
        self.prefixes.append((prefix, handler))
        self.prefixes.sort(key=lambda item: len(item[0]), reverse=True)

    def routes(self) -> list[tuple[str, str]]:
        """(method, path) of everything registered, for tests that must cover every endpoint.

        A prefix handler lists its own routes through a `routes()` method (paths may hold
        `{placeholders}`); one without that is listed as ("*", prefix)."""
        found: list[tuple[str, str]] = [("*", path) for path in sorted(self.handlers)]
        for prefix, handler in self.prefixes:
            listed = getattr(handler, "routes", None)
            found += list(listed()) if callable(listed) else [("*", prefix)]
        return found

    def __call__(self, ex: Exchange) -> StageResult:
        path = ex.path
        if not path.startswith(PREFIX):
            return None
        handler = self.handlers.get(path)
        if handler is None:
            for prefix, candidate in self.prefixes:
                if path.startswith(prefix) or path == prefix[:-1]:
                    handler = candidate
                    break
            else:
                return error_reply(
                    404, "not_found", "no such gateway endpoint", html=ex.wants_html()
                )
        return handler(ex)

    @staticmethod
    def healthz(ex: Exchange) -> Reply:
        return Reply.json(200, {"status": "ok", "version": __version__})

"""Stage: which upstream serves this path, and whether a deny rule forbids it."""

from __future__ import annotations

from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.paths import encode_path
from garrison.pipeline.pipeline import Stage
from garrison.pipeline.routes import RouteTable


class RouteMatch(Stage):
    """Longest prefix wins; what is forwarded is exactly the normalised path that was matched."""

    name = "route"

    def __init__(self, table: RouteTable) -> None:
        self.table = table

    def __call__(self, ex: Exchange) -> Reply | None:
        route = self.table.match(ex.path)
        if route is None:
            return error_reply(404, "no_route", "no route for this path", html=ex.wants_html())
        if route.deny and route.denies(ex.path):
            return error_reply(
                403, "path_denied", "this path is not available", html=ex.wants_html()
            )
        ex.route = route
        upstream_path, prefix = route.upstream_path(ex.path)
        ex.forwarded_prefix = prefix
        if prefix:
            ex.upstream_headers.append((b"x-forwarded-prefix", prefix.encode()))
        target = encode_path(upstream_path)
        ex.upstream_target = target + b"?" + ex.query if ex.query else target
        return None

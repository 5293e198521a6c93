"""Stage: CORS, answered by the gateway for the routes that allow other web origins.

Runs after RouteMatch and before Identify: a browser's preflight (OPTIONS with Origin and
Access-Control-Request-Method) never carries credentials, so the gateway answers it itself
(204, or 403 saying what was refused) and the upstream never sees it. An actual request from
an allowed origin gets its CORS header lines added to `ex.response_head_extra`, so they go out
with whatever the client receives: the upstream's response, and also the gateway's own 401,
429 or 502, whose bodies and Retry-After the page's script must be able to read.

Every header block is serialised per (route policy, origin) when the configuration is built;
on the request path this is a header lookup, a dict lookup and one concatenation. A request
without an Origin header costs a header scan and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from garrison.config import Config, CorsConfig
from garrison.pipeline.exchange import Exchange, Reply
from garrison.pipeline.pipeline import Stage

# Always exposed: the rate limit headers (IETF draft and the seed's X- names) and Retry-After,
# so a page can back off instead of retrying blindly. Browsers expose only safelisted
# response headers (Content-Type, ...) otherwise.
ALWAYS_EXPOSED = (
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "Retry-After",
)
# CORS-safelisted request headers: browsers may list them in Access-Control-Request-Headers
# (for unusual values), and they are harmless, so they are always allowed (as Starlette does).
SAFELISTED_REQUEST = frozenset({"accept", "accept-language", "content-language"})
PREFLIGHT_VARY = b"vary: Origin, Access-Control-Request-Method, Access-Control-Request-Headers\r\n"
_SHOWN = 120  # how much of a refused value is quoted back in a 403


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """One compiled [cors] table: per allowed origin, the header lines for each kind of answer.

    `any_origin` is the `allow_origins = ["*"]` case (never with credentials: the config
    refuses it), answered with `*` and not echoing the origin.
    """

    actual: dict[bytes, bytes]  # Origin header value -> lines for an actual request
    preflight: dict[bytes, bytes]  # Origin header value -> lines for an accepted preflight
    any_actual: bytes | None
    any_preflight: bytes | None
    methods: frozenset[str]
    headers: frozenset[str]  # lower case, safelisted ones included
    methods_text: str
    headers_text: str

    @classmethod
    def build(cls, config: CorsConfig) -> CorsPolicy:
        expose = list(ALWAYS_EXPOSED)
        lowered = {name.lower() for name in expose}
        expose += [n for n in config.expose_headers if n.lower() not in lowered]
        common = b"access-control-expose-headers: %s\r\n" % ", ".join(expose).encode()
        if config.allow_credentials:
            common += b"access-control-allow-credentials: true\r\n"
        methods_text = ", ".join(config.allow_methods)
        headers_text = ", ".join(config.allow_headers)
        preflight_common = b"access-control-allow-methods: %s\r\n" % methods_text.encode()
        if headers_text:
            preflight_common += b"access-control-allow-headers: %s\r\n" % headers_text.encode()
        preflight_common += b"access-control-max-age: %d\r\n" % int(config.max_age)
        if config.allow_credentials:
            preflight_common += b"access-control-allow-credentials: true\r\n"
        actual: dict[bytes, bytes] = {}
        preflight: dict[bytes, bytes] = {}
        any_actual = any_preflight = None
        if config.allow_origins == ["*"]:
            any_actual = b"access-control-allow-origin: *\r\n" + common
            any_preflight = b"access-control-allow-origin: *\r\n" + preflight_common
        else:
            for origin in config.allow_origins:
                key = origin.encode()
                allow = b"access-control-allow-origin: " + key + b"\r\n"
                actual[key] = allow + b"vary: Origin\r\n" + common
                preflight[key] = allow + PREFLIGHT_VARY + preflight_common
        return cls(
            actual=actual,
            preflight=preflight,
            any_actual=any_actual,
            any_preflight=any_preflight,
            methods=frozenset(config.allow_methods),
            headers=frozenset(h.lower() for h in config.allow_headers) | SAFELISTED_REQUEST,
            methods_text=methods_text or "none",
            headers_text=headers_text or "none",
        )

    def answer_preflight(self, ex: Exchange, origin: bytes, method: bytes) -> Reply:
        """204 with the policy, or 403 naming what was refused (no Allow-Origin: the browser
        then blocks the actual request, and the page's developer sees why in devtools)."""
        lines = self.preflight.get(origin)
        if lines is None:
            lines = self.any_preflight
        if lines is None:
            return _refused(
                "cors_origin_not_allowed", f"origin {_show(origin)} may not call this route"
            )
        if method.decode("latin-1") not in self.methods:
            return _refused(
                "cors_method_not_allowed",
                f"method {_show(method)} is not allowed here (allowed: {self.methods_text})",
            )
        requested = ex.header(b"access-control-request-headers")
        if requested:
            names = {n.strip().lower() for n in requested.decode("latin-1").split(",")}
            names.discard("")
            refused = sorted(names - self.headers)
            if refused:
                return _refused(
                    "cors_header_not_allowed",
                    f"request header(s) {_show(', '.join(refused).encode())} not allowed here "
                    f"(allowed: {self.headers_text})",
                )
        ex.response_head_extra += lines
        return Reply(204, b"", b"")


def _show(value: bytes) -> str:
    text = value.decode("latin-1")
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _refused(code: str, message: str) -> Reply:
    return Reply.json(403, {"error": {"code": code, "message": message}})


class Cors(Stage):
    """Preflights answered here; allowed origins' actual requests get their header lines."""

    name = "cors"

    def __init__(self, by_route: Sequence[CorsPolicy | None]) -> None:
        self.by_route = tuple(by_route)  # indexed by CompiledRoute.index

    def __call__(self, ex: Exchange) -> Reply | None:
        route = ex.route
        assert route is not None
        policy = self.by_route[route.index]
        if policy is None:
            return None
        origin = ex.header(b"origin")
        if origin is None:
            return None
        if ex.method == "OPTIONS":
            method = ex.header(b"access-control-request-method")
            if method is not None:
                return policy.answer_preflight(ex, origin, method)
        lines = policy.actual.get(origin)
        if lines is not None:
            ex.response_head_extra += lines
            ex.cors_allowed = True  # an explicitly listed origin (the token alias trusts it)
        elif policy.any_actual is not None:
            ex.response_head_extra += policy.any_actual
        return None


def cors_stage(config: Config) -> list[Cors]:
    """The CORS stage, or nothing when no route allows another origin (then it costs nothing).

    Routes sharing the global [cors] share one compiled policy."""
    shared: CorsPolicy | None = None
    by_route: list[CorsPolicy | None] = []
    for route in config.route:
        policy = config.route_cors(route)
        if policy is None:
            by_route.append(None)
        elif policy is config.cors:
            shared = shared or CorsPolicy.build(policy)
            by_route.append(shared)
        else:
            by_route.append(CorsPolicy.build(policy))
    if not any(by_route):
        return []
    return [Cors(by_route)]


def describe(config: Config) -> list[str]:
    """What `garrison check` says about CORS: who may read which routes from a browser on
    another origin, and where the app's own CORS headers pass. Nothing when there is none."""
    groups: dict[int, tuple[CorsConfig, list[str]]] = {}
    without: list[str] = []
    lines: list[str] = []
    for route in config.route:
        policy = config.route_cors(route)
        if policy is None:
            without.append(route.path)
        else:
            groups.setdefault(id(policy), (policy, []))[1].append(route.path)
    for policy, paths in groups.values():
        who = "every origin" if policy.allow_origins == ["*"] else ", ".join(policy.allow_origins)
        details = [
            f"methods {', '.join(policy.allow_methods) or 'none'}",
            f"headers {', '.join(policy.allow_headers) or 'none'}",
            "credentials" if policy.allow_credentials else "no credentials",
            f"max-age {int(policy.max_age)}s",
        ]
        lines.append(f"cors {', '.join(paths)}: {who} ({'; '.join(details)})")
    if groups and without:
        lines.append(f"cors off: {', '.join(without)}")
    passed = [r.path for r in config.route if r.cors_passthrough]
    if passed:
        lines.append(
            f"cors passthrough (the app's own Access-Control-* headers): {', '.join(passed)}"
        )
    return lines

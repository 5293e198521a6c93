"""Which upstream a normalised path goes to, and which of its paths are refused.

Route prefixes (case-sensitive, like nginx; compared with the *normalised* path):

- A prefix matches on segment boundaries only: ``/v1`` matches ``/v1`` and ``/v1/x`` but never
  ``/v1x``; ``/v1/`` matches ``/v1/x`` and also ``/v1`` exactly. ``/`` matches every path.
- The longest matching prefix wins. If both ``/v1`` and ``/v1/`` exist, ``/v1`` takes the exact
  path ``/v1`` and ``/v1/`` takes everything below it.
- ``strip_prefix`` forwards ``/app/x`` as ``/x`` and ``/app`` as ``/``, with ``/app`` as the
  forwarded prefix (X-Forwarded-Prefix) so the app can build its own links.

Deny prefixes (absolute paths, checked only for paths that this route matched):

- Compared as ``deny_key`` forms (NFKC, casefold, ``;params`` and trailing dots/spaces dropped per
  segment, and, where folding creates dot segments, also with those resolved): a deny rule errs on
  the side of refusing, since the upstream may read the path more leniently than we do.
- A plain string prefix: ``/proxy=`` blocks ``/proxy=http://...``; ``/admin`` would also block
  ``/administrator``, so write ``/admin/`` for a directory. A prefix ending in ``/`` also blocks
  the path without it (``/admin/`` blocks ``/admin``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from garrison.config import RouteConfig
from garrison.pipeline.paths import deny_key, deny_keys

__all__ = ["CompiledRoute", "RouteTable"]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route ready for the hot path: deny prefixes folded once, at build time."""

    path: str
    upstream: str
    strip_prefix: bool = False
    deny: tuple[str, ...] = ()
    index: int = 0
    auth: frozenset[str] = frozenset({"session", "api_key", "jwt"})
    allow_scopes: frozenset[str] = frozenset()
    allow_roles: frozenset[str] = frozenset()
    allow_users: frozenset[str] = frozenset()
    token_alias: str | None = None
    cors_passthrough: bool = False  # keep the upstream's Access-Control-* response headers
    base: str = field(init=False, repr=False, compare=False, default="")
    # `auth` entries as sets of methods ("client_cert+session" -> both), and every method named.
    entries: tuple[frozenset[str], ...] = field(init=False, repr=False, compare=False, default=())
    methods: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())
    singles: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        # Fold here rather than in the caller so that no CompiledRoute holds raw deny prefixes.
        # A prefix not starting with "/" ("" above all) would match every path or none.
        for prefix in self.deny:
            if not prefix.startswith("/"):
                raise ValueError(f"deny prefix {prefix!r} must start with /")
        object.__setattr__(self, "deny", tuple(dict.fromkeys(deny_key(d) for d in self.deny)))
        object.__setattr__(self, "base", self.path.rstrip("/"))
        entries = tuple(frozenset(entry.split("+")) for entry in sorted(self.auth, key=len))
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "methods", frozenset().union(*entries) if entries else frozenset())
        singles = frozenset(next(iter(e)) for e in entries if len(e) == 1)
        object.__setattr__(self, "singles", singles)

    @classmethod
    def from_config(cls, config: RouteConfig, index: int) -> CompiledRoute:
        """Compile one ``[[route]]`` entry; ``index`` is its position in the config."""
        return cls(
            config.path,
            config.upstream,
            config.strip_prefix,
            tuple(config.deny),
            index,
            auth=frozenset(config.auth),
            allow_scopes=frozenset(config.allow.scopes),
            allow_roles=frozenset(config.allow.roles),
            allow_users=frozenset(config.allow.users),
            token_alias=config.token_alias,
            cors_passthrough=config.cors_passthrough,
        )

    @property
    def public(self) -> bool:
        return "none" in self.auth

    def denies(self, path: str) -> bool:
        """Whether a normalised path falls under one of this route's deny prefixes."""
        if not self.deny:
            return False
        # key + "/" lets a prefix "/admin/" block "/admin" while "/proxy=" still needs its "=".
        keys = deny_keys(path)
        if len(keys) == 1:
            return (keys[0] + "/").startswith(self.deny)
        return any((key + "/").startswith(self.deny) for key in keys)

    def upstream_path(self, path: str) -> tuple[str, str]:
        """(path to forward, forwarded prefix): the route's prefix removed when strip_prefix."""
        if not self.strip_prefix or not self.base:
            return path, ""
        rest = path[len(self.base) :]
        return (rest if rest else "/"), self.base


class RouteTable:
    """Longest-prefix routing over segment boundaries: a few dict lookups per request."""

    __slots__ = ("_by_base", "_by_exact", "routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes: tuple[CompiledRoute, ...] = tuple(
            CompiledRoute.from_config(config, index) for index, config in enumerate(routes)
        )
        # _by_base: "/v1" for both "/v1" and "/v1/" (prefix matches); when both exist the one
        # with the slash is the longer prefix and wins below the base. _by_exact: the literal
        # configured path, which wins for the path equal to it.
        self._by_base: dict[str, CompiledRoute] = {}
        self._by_exact: dict[str, CompiledRoute] = {}
        for route in sorted(self.routes, key=lambda r: len(r.path)):
            self._by_base[route.base] = route
            self._by_exact[route.path] = route

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, path: str) -> CompiledRoute | None:
        """The route whose prefix is the longest one matching ``path`` on a segment boundary."""
        route = self._by_exact.get(path)
        if route is not None:
            return route
        by_base = self._by_base
        end = len(path)
        if path.endswith("/"):
            end -= 1
        while end >= 0:
            route = by_base.get(path[:end])
            if route is not None:
                return route
            end = path.rfind("/", 0, end)
        return None

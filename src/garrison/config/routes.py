"""[[upstream]] and [[route]]: where requests go, and who may send them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator

from garrison.config.base import _Model
from garrison.config.cors import CorsConfig
from garrison.config.limits import BudgetText, RateText
from garrison.config.units import Duration


class UpstreamConfig(_Model):
    name: str
    url: str
    max_idle_connections: int = Field(default=64, ge=0)
    max_in_flight: int | None = Field(default=None, ge=1)  # GPU slots, fair between identities

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("letters, digits, '_', '.' and '-' only (1 to 64)")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "http":
            raise ValueError(
                "upstream url must start with http:// (TLS to upstreams is not supported yet)"
            )
        if not parts.hostname:
            raise ValueError("upstream url needs a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("upstream url must not have a path, query or fragment; use a route")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


AUTH_METHODS = ("session", "api_key", "jwt", "client_cert")
DEFAULT_AUTH: tuple[str, ...] = ("session", "api_key", "jwt")


def _check_auth_entry(entry: str) -> str:
    """One accepted way in: a method, or methods joined by "+" that must all be presented."""
    if entry == "none":
        return entry
    parts = entry.split("+")
    for part in parts:
        if part not in AUTH_METHODS:
            raise ValueError(
                f"unknown auth method {part!r}: use {', '.join(AUTH_METHODS)} or none "
                '(join with "+" to require several, e.g. "client_cert+session")'
            )
    if len(set(parts)) != len(parts):
        raise ValueError(f"{entry!r} names a method twice")
    if len(parts) > 2 or (len(parts) == 2 and "client_cert" not in parts):
        raise ValueError('only "client_cert+<method>" combinations are supported')
    return entry


AuthEntry = Annotated[str, AfterValidator(_check_auth_entry)]


class AllowConfig(_Model):
    """Who may use a route once identified. Every key given must hold; within a key, any value.

    `scopes` restricts delegated credentials (API keys, tokens that carry a scope); a person
    logged in with a session (or a token without a scope claim) is not scope-restricted.
    """

    scopes: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)


class RouteConfig(_Model):
    path: str = "/"
    upstream: str
    strip_prefix: bool = False
    deny: list[str] = Field(default_factory=list)
    auth: list[AuthEntry] = Field(default_factory=lambda: list(DEFAULT_AUTH))
    allow: AllowConfig = Field(default_factory=AllowConfig)
    token_alias: str | None = None
    rate: list[RateText] = Field(default_factory=list)
    concurrency: int | None = Field(default=None, ge=1)
    tokens: BudgetText | None = None
    queue_timeout: Duration = 0.0
    # Omitted: the global [cors]. false: no CORS on this route. A table: replaces [cors] here.
    cors: CorsConfig | Literal[False] | None = None
    # Keep the upstream's own Access-Control-* response headers (stripped by default).
    cors_passthrough: bool = False

    @field_validator("cors", mode="before")
    @classmethod
    def _cors(cls, value: Any) -> Any:
        if value is True:
            raise ValueError(
                "cors on a route is false (off) or a table replacing [cors]; "
                "leave it out to use [cors]"
            )
        return value

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("auth")
    @classmethod
    def _auth(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('give at least one method, or ["none"] for a public route')
        if "none" in value and len(value) > 1:
            raise ValueError('"none" (public) cannot be combined with other methods')
        return list(dict.fromkeys(value))

    def model_post_init(self, _context: Any) -> None:
        if self.token_alias is not None:
            base = self.path.rstrip("/")
            if not (self.token_alias == base or self.token_alias.startswith(base + "/")):
                raise ValueError(f"token_alias {self.token_alias!r} must lie under {self.path!r}")
        if self.auth == ["none"] and (self.allow.scopes or self.allow.roles or self.allow.users):
            raise ValueError('allow needs an identity; it cannot go with auth = ["none"]')

    @property
    def public(self) -> bool:
        return self.auth == ["none"]

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("route path must start with /")
        if any(c in value for c in "?#%\\") or "//" in value or "/./" in value or "/../" in value:
            raise ValueError("route path must be a plain normalised path prefix")
        return value

    @field_validator("deny")
    @classmethod
    def _deny(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith("/"):
                raise ValueError(f"deny prefix {prefix!r} must start with /")
            if "%" in prefix or "\\" in prefix:
                raise ValueError(f"deny prefix {prefix!r} must be written decoded, without % or \\")
        return value

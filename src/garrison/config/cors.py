"""[cors] (and a route's own [route.cors]): origins, methods and header names."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration

_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)"
    r"(?::(?P<port>\d{1,5}))?/?"
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: a header or method name
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def normalise_origin(value: str) -> str:
    """``scheme://host[:port]`` as browsers serialise an Origin: lower case, no default port,
    no trailing slash. Anything else (a path, a pattern, ``null``) is refused, because the
    Origin header is compared byte for byte and a value browsers never send would never match.
    """
    text = value.strip()
    if text == "null":
        raise ValueError(
            '"null" is the origin of sandboxed frames, file:// pages and redirects: '
            "any site can produce it, so it cannot be allowed"
        )
    if "*" in text:
        raise ValueError(
            f'{value!r}: patterns are not supported; list each origin, or use "*" alone'
        )
    match = _ORIGIN.fullmatch(text.lower())
    if not match:
        raise ValueError(
            f"{value!r} is not an origin: use scheme://host[:port] with http or https, "
            'e.g. "https://app.example.com" (no path; IDN hosts in punycode)'
        )
    scheme, host, port = match.group("scheme"), match.group("host"), match.group("port")
    if port is not None:
        number = int(port)
        if not 0 < number <= 65535:
            raise ValueError(f"{value!r}: port {number} out of range 1-65535")
        if number != (443 if scheme == "https" else 80):
            return f"{scheme}://{host}:{number}"
    return f"{scheme}://{host}"


def _header_names(value: list[str], what: str) -> list[str]:
    names: list[str] = []
    for name in value:
        if name == "*":
            raise ValueError(
                f'"*" is not accepted: list the {what} explicitly (with credentials a browser '
                'reads "*" as a literal name, and a wildcard is not "strict CORS")'
            )
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if name.lower() not in (n.lower() for n in names):
            names.append(name)
    return names


class CorsConfig(_Model):
    """[cors] (or a route's own [route.cors]): which other web origins' scripts may read
    responses. No origins (the default) means no CORS headers at all: browsers then keep
    cross-origin pages from reading anything, which is the safe default."""

    allow_origins: list[str] = Field(default_factory=list)
    allow_methods: list[str] = Field(default_factory=lambda: ["GET", "POST"])
    allow_headers: list[str] = Field(default_factory=lambda: ["Authorization", "Content-Type"])
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age: Duration = 600.0

    @field_validator("allow_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        if "*" in (v.strip() for v in value):
            if len(value) > 1:
                raise ValueError('"*" already allows every origin; give it alone or not at all')
            return ["*"]
        return list(dict.fromkeys(normalise_origin(v) for v in value))

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        methods: list[str] = []
        for method in value:
            if method == "*":
                raise ValueError('"*" is not accepted: list the methods, e.g. ["GET", "POST"]')
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"{method!r} is not a valid method name")
            if method.upper() in ("CONNECT", "TRACE", "TRACK"):
                raise ValueError(f"{method.upper()} cannot be allowed (browsers forbid it)")
            if method.upper() not in methods:
                methods.append(method.upper())
        return methods

    @field_validator("allow_headers")
    @classmethod
    def _allow_headers(cls, value: list[str]) -> list[str]:
        return _header_names(value, "request headers")

    @field_validator("expose_headers")
    @classmethod
    def _expose_headers(cls, value: list[str]) -> list[str]:
        return _header_names(value, "response headers to expose")

    @field_validator("max_age")
    @classmethod
    def _max_age(cls, value: float) -> float:
        if value > 86400:
            raise ValueError("at most 1d (browsers cap it: Firefox at 24 h, Chromium at 2 h)")
        return value

    def model_post_init(self, _context: Any) -> None:
        if not self.allow_credentials:
            return
        if self.allow_origins == ["*"]:
            raise ValueError(
                'allow_credentials = true cannot go with allow_origins = ["*"]: every site '
                "could read your users' responses; list the origins that may"
            )
        for origin in self.allow_origins:
            if origin.startswith("http://") and urlsplit(origin).hostname not in _LOOPBACK:
                raise ValueError(
                    f"{origin!r}: with allow_credentials an http:// origin (other than "
                    "localhost) is refused: anyone on its network could inject a script "
                    "there and read your users' responses; use https://"
                )

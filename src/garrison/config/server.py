"""[server]: listeners, hostnames, request size limits, security headers, timeouts."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration, Size, _is_ip, parse_hostport
from garrison.netaddr import check_networks


class TimeoutsConfig(_Model):
    """Timeouts of the data plane. No total timeout: an LLM stream may run for minutes."""

    header_read: Duration = 10.0
    keepalive_idle: Duration = 75.0
    upstream_connect: Duration = 5.0
    upstream_idle: Duration = 300.0
    shutdown_grace: Duration = 30.0

    @field_validator("header_read", "keepalive_idle", "upstream_connect", "upstream_idle")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0 (a zero timeout would cut every connection)")
        return value


class ServerConfig(_Model):
    listen: str = "0.0.0.0:8443"
    http_listen: str | None = None
    hostnames: list[str] = Field(default_factory=list)
    tls_profile: Literal["intermediate", "modern"] = "intermediate"
    trusted_proxies: list[str] = Field(default_factory=list)
    max_body: Size = 1024**3
    max_header_bytes: Size = 32 * 1024
    max_headers: int = Field(default=100, ge=1, le=1000)
    hsts_max_age: Duration = 365 * 86400
    hsts_include_subdomains: bool = False
    referrer_policy: str = "strict-origin-when-cross-origin"
    server_cert_days: int = Field(default=90, ge=1, le=397)
    access_log: str = "stderr"
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

    @field_validator("hostnames")
    @classmethod
    def _hostnames(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _is_ip(name) and not re.fullmatch(
                r"(\*\.)?([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*"
                r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?",
                name,
            ):
                raise ValueError(f"{name!r} is not a valid DNS name or IP address")
        return value

    @field_validator("referrer_policy")
    @classmethod
    def _referrer_policy(cls, value: str) -> str:
        allowed = {
            "no-referrer",
            "no-referrer-when-downgrade",
            "origin",
            "origin-when-cross-origin",
            "same-origin",
            "strict-origin",
            "strict-origin-when-cross-origin",
            "unsafe-url",
        }
        if value not in allowed:
            raise ValueError(f"unknown Referrer-Policy {value!r}")
        return value

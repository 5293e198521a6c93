"""[audit], [metrics] and [admin]: the security record, scraping, and the admin UI/API."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration, Size
from garrison.netaddr import check_networks


class AuditConfig(_Model):
    """[audit]: the security record (decisions, logins, changes), separate from the access log.

    Secure by default: a 0600 file in the data dir, request bodies never stored. Lines are
    written in batches (every 200 ms or 64 KiB) and fsynced at most every `fsync_interval`;
    `fsync = "always"` writes and fsyncs each decision before the client gets the answer."""

    sink: Literal["file", "stdout", "syslog", "off"] = "file"
    path: Path | None = None  # default: <data dir>/audit.log
    max_size: Size = 100 * 1024**2
    keep: int = Field(default=10, ge=1, le=1000)
    fsync: Literal["never", "interval", "always"] = "interval"
    fsync_interval: Duration = 1.0
    bodies: Literal["none", "hash", "full"] = "none"
    requests: Literal["all", "refused", "none"] = "all"
    syslog_address: str = "/dev/log"

    @field_validator("max_size")
    @classmethod
    def _max_size(cls, value: int) -> int:
        if value and value < 4096:
            raise ValueError("at least 4KiB (or 0 for no rotation)")
        return value

    @field_validator("fsync_interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if not 0.001 <= value <= 3600:
            raise ValueError("between 1ms and 1h")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.sink != "file" and self.path is not None:
            raise ValueError(f'path is for sink = "file", not {self.sink!r}')
        if self.sink != "file" and self.fsync == "always":
            raise ValueError(
                'fsync = "always" needs sink = "file" (stdout and syslog cannot fsync)'
            )


class MetricsConfig(_Model):
    """[metrics]: who may scrape /.garrison/metrics. Secure by default: loopback only.

    A client whose address (after trusted_proxies) is in `allow` may scrape; anyone else needs
    a session or bearer credential of a user with role `admin` (`admin_role` = false: never).
    `enabled` = false counts nothing per request and answers /.garrison/metrics with 404 (the
    benchmark's "without" row; the admin overview's traffic figures are then empty)."""

    enabled: bool = True
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    admin_role: bool = True

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)


class AdminConfig(_Model):
    """[admin]: the admin UI (/.garrison/admin/) and JSON API (/.garrison/api/).

    Secure by default: only clients whose address (after trusted_proxies) is in `allow`
    (loopback) reach it at all, and they must be users with role `admin` (an API key or a
    scoped token must also carry scope `admin`). `require_client_cert` also asks for a valid
    client certificate of the same user (needs [client_certs] mode optional or required)."""

    enabled: bool = True
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    require_client_cert: bool = False

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return check_networks(value)

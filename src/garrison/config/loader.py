"""The whole configuration: validation with every problem at once, TOML files, CLI flags."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from garrison.config.auth import AuthConfig, ClientCertsConfig
from garrison.config.base import _Model
from garrison.config.cors import CorsConfig
from garrison.config.limits import LimitsConfig
from garrison.config.observe import AdminConfig, AuditConfig, MetricsConfig
from garrison.config.routes import RouteConfig, UpstreamConfig
from garrison.config.server import ServerConfig
from garrison.config.tls import TlsConfig


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    client_certs: ClientCertsConfig = Field(default_factory=ClientCertsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cors: CorsConfig = Field(default_factory=CorsConfig)
    upstream: list[UpstreamConfig] = Field(default_factory=list)
    route: list[RouteConfig] = Field(default_factory=list)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    def upstream_by_name(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstream if u.name == name)

    def route_cors(self, route: RouteConfig) -> CorsConfig | None:
        """The CORS policy of one route (its own table, else [cors]); None when it has none."""
        policy = self.cors if route.cors is None else route.cors
        if policy is False or not policy.allow_origins:
            return None
        return policy


class ConfigError(Exception):
    """Every problem found in a configuration, each as ``path.to.key: reason``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            message = "unknown option"
        problems.append(f"{'.'.join(loc) or '(top)'}: {message}")
    return problems


def _reference_problems(data: dict[str, Any]) -> list[str]:
    """Cross-references (route -> upstream, unique names and paths), checked on the raw mapping
    so that they are reported together with every other error, not only once the rest is valid."""
    problems = []
    upstreams = data.get("upstream")
    names: list[object] = []
    if isinstance(upstreams, list):
        for index, item in enumerate(upstreams):
            name = item.get("name") if isinstance(item, dict) else None
            if name is not None and name in names:
                problems.append(f"upstream.{index}.name: duplicate upstream name {name!r}")
            names.append(name)
    routes = data.get("route")
    paths: list[object] = []
    if isinstance(routes, list):
        for index, item in enumerate(routes):
            if not isinstance(item, dict):
                continue
            target = item.get("upstream")
            if isinstance(target, str) and target not in names:
                problems.append(f"route.{index}.upstream: unknown upstream {target!r}")
            path = item.get("path", "/")
            if path in paths:
                problems.append(f"route.{index}.path: another route has the same path {path!r}")
            paths.append(path)
    return problems


def validate(data: dict[str, Any]) -> Config:
    """Validate a parsed config mapping, raising ConfigError with every problem."""
    problems: list[str] = []
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = _format_errors(exc)
    problems += [p for p in _reference_problems(data) if p not in problems]
    if config is not None and config.client_certs.mode == "off":
        for index, route in enumerate(config.route):
            if any("client_cert" in entry for entry in route.auth):
                problems.append(
                    f"route.{index}.auth: client_cert needs [client_certs] mode = "
                    '"optional" or "required"'
                )
    if config is not None:
        for index, route in enumerate(config.route):
            if route.cors_passthrough and config.route_cors(route) is not None:
                problems.append(
                    f"route.{index}.cors_passthrough: Garrison answers CORS on this route; "
                    "set cors = false on it as well to let the app answer instead"
                )
    if config is not None and config.tls.source == "acme" and not config.server.http_listen:
        problems.append(
            'tls.source: "acme" answers HTTP-01 on server.http_listen; set it (":80" in production)'
        )
    if problems or config is None:
        raise ConfigError(problems)
    return config


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML file into a mapping, with syntax errors reported as ConfigError."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None


def build(
    config_file: Path | None = None,
    *,
    upstream: str | None = None,
    listen: str | None = None,
    http_listen: str | None = None,
    hostnames: tuple[str, ...] = (),
) -> Config:
    """Merge a config file (optional) with command-line flags; flags win."""
    data: dict[str, Any] = load_file(config_file) if config_file else {}
    server = dict(data.get("server") or {})
    if listen:
        server["listen"] = listen
    if http_listen:
        server["http_listen"] = http_listen
    if hostnames:
        server["hostnames"] = list(hostnames)
    data["server"] = server
    if upstream:
        upstreams = [u for u in data.get("upstream") or [] if u.get("name") != "default"]
        data["upstream"] = [*upstreams, {"name": "default", "url": upstream}]
        if not any(r.get("path") == "/" for r in data.get("route") or []):
            data["route"] = [*(data.get("route") or []), {"path": "/", "upstream": "default"}]
    config = validate(data)
    if not config.route:
        raise ConfigError(["route: no route configured: give --upstream URL, --demo, or [[route]]"])
    return config

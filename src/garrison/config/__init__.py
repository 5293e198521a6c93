"""The configuration schema: the single source of truth for every option.

Read from TOML with ``tomllib`` and validated by pydantic, so that every mistake is reported as
``path.to.key: reason`` (like ``nginx -t``) before anything starts.

One module per job: `units` (sizes, durations, addresses), `base` (the strict model every
section derives from), one module per group of sections (`server`, `limits`, `cors`, `routes`,
`auth`, `tls`, `observe`), and `loader` (the whole `Config`, `validate`, `load_file`, `build`).
Everything is re-exported here: import from `garrison.config`.
"""

from __future__ import annotations

from garrison.config.auth import AuthConfig, ClientCertsConfig, JwtIssuerConfig
from garrison.config.cors import CorsConfig, normalise_origin
from garrison.config.limits import BudgetText, LimitsConfig, RateText
from garrison.config.loader import Config, ConfigError, build, load_file, validate
from garrison.config.observe import AdminConfig, AuditConfig, MetricsConfig
from garrison.config.routes import (
    AUTH_METHODS,
    DEFAULT_AUTH,
    AllowConfig,
    AuthEntry,
    RouteConfig,
    UpstreamConfig,
)
from garrison.config.server import ServerConfig, TimeoutsConfig
from garrison.config.tls import (
    LETSENCRYPT,
    LETSENCRYPT_STAGING,
    AcmeConfig,
    TlsConfig,
    TlsFilesConfig,
)
from garrison.config.units import Duration, Size, parse_duration, parse_hostport, parse_size

__all__ = [
    "AUTH_METHODS",
    "DEFAULT_AUTH",
    "LETSENCRYPT",
    "LETSENCRYPT_STAGING",
    "AcmeConfig",
    "AdminConfig",
    "AllowConfig",
    "AuditConfig",
    "AuthConfig",
    "AuthEntry",
    "BudgetText",
    "ClientCertsConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "Duration",
    "JwtIssuerConfig",
    "LimitsConfig",
    "MetricsConfig",
    "RateText",
    "RouteConfig",
    "ServerConfig",
    "Size",
    "TimeoutsConfig",
    "TlsConfig",
    "TlsFilesConfig",
    "UpstreamConfig",
    "build",
    "load_file",
    "normalise_origin",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "validate",
]

"""The configuration schema: the single source of truth for every option.

Read from TOML with ``tomllib`` and validated by pydantic, so that every mistake is reported as
``path.to.key: reason`` (like ``nginx -t``) before anything starts.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from garrison.netaddr import check_networks

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: Any) -> int:
    """Parse ``"1GiB"``, ``"500MB"``, ``"10k"`` or a plain integer into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1GiB or 500MB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {value!r}: use a number with B, KiB, MiB, GiB, kB, MB or GB"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(value: Any) -> float:
    """Parse ``"30s"``, ``"5m"``, ``"365d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 5m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
    if not match:
        raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m, h or d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_hostport(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` into a (host, port) pair."""
    text = str(value).strip()
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not match:
        raise ValueError(f"invalid address {value!r}: use HOST:PORT or [IPv6]:PORT")
    host = match.group(1) or match.group(3) or default_host
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return host, port


Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


def _check_rate(value: str) -> str:
    from garrison.limits.model import Rate

    Rate.parse(value)
    return value


def _check_budget(value: str) -> str:
    from garrison.limits.model import Budget

    Budget.parse(value)
    return value


RateText = Annotated[str, AfterValidator(_check_rate)]
BudgetText = Annotated[str, AfterValidator(_check_budget)]


class LimitsConfig(_Model):
    """Where limit counters live: this process ("memory") or Redis (global across processes)."""

    backend: str = "memory"
    on_backend_error: Literal["closed", "open"] = "closed"
    lease: Duration = 30.0  # a concurrency slot of a crashed process frees itself after this

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError('use "memory" or a redis:// URL')
        return value


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


class ClientCertsConfig(_Model):
    """Mutual TLS: who may present a certificate, and what happens without one."""

    mode: Literal["off", "optional", "required"] = "off"
    ca: str = "internal"  # or a path to a PEM bundle of external CAs
    crl: str | None = None  # external CA only: a CRL file path or http(s) URL
    crl_refresh: Duration = 300.0
    forward_cert: bool = False  # X-SSL-Client-Cert (URL-encoded PEM) to the upstream

    @field_validator("crl")
    @classmethod
    def _crl(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("http://"):
            host = urlsplit(value).hostname
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise ValueError("a CRL URL must use https:// (http:// only for loopback)")
        return value

    def model_post_init(self, _context: Any) -> None:
        if self.ca == "internal" and self.crl is not None:
            raise ValueError("crl is for an external ca; the internal CA keeps its own list")


class AllowConfig(_Model):
    """Who may use a route once identified. Every key given must hold; within a key, any value.

    `scopes` restricts delegated credentials (API keys, tokens that carry a scope); a person
    logged in with a session (or a token without a scope claim) is not scope-restricted.
    """

    scopes: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)


class JwtIssuerConfig(_Model):
    """An external identity provider whose JWTs are accepted (`jwt` in a route's `auth`)."""

    issuer: str
    audience: list[str]
    jwks_url: str | None = None
    key_file: Path | None = None
    secret_file: Path | None = None
    algorithms: list[
        Literal[
            "RS256",
            "RS384",
            "RS512",
            "PS256",
            "PS384",
            "PS512",
            "ES256",
            "ES384",
            "ES512",
            "EdDSA",
            "HS256",
            "HS384",
            "HS512",
        ]
    ] = Field(default_factory=lambda: ["RS256"])
    user_claim: str = "sub"
    email_claim: str = "email"
    roles_claim: str = "roles"
    scope_claim: str = "scope"
    leeway: Duration = 30.0

    @field_validator("audience", mode="before")
    @classmethod
    def _audience(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError("jwks_url must use https:// (http:// only for a loopback address)")
        return value

    def model_post_init(self, _context: Any) -> None:
        sources = [s for s in (self.jwks_url, self.key_file, self.secret_file) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of jwks_url, key_file or secret_file")
        hmac_algs = {a for a in self.algorithms if a.startswith("HS")}
        if self.secret_file is not None and hmac_algs != set(self.algorithms):
            raise ValueError("secret_file goes with HS256/HS384/HS512 algorithms only")
        if self.secret_file is None and hmac_algs:
            raise ValueError("HS* algorithms need secret_file (a public key cannot verify HMAC)")
        if not self.audience:
            raise ValueError("audience: at least one audience is required")


class AuthConfig(_Model):
    """Sessions, tokens and login backoff (users and keys live in the store, not here)."""

    session_idle: Duration = 8 * 3600.0
    session_max: Duration = 7 * 86400.0
    token_lifetime: Duration = 15 * 60.0
    assertion_lifetime: Duration = 5 * 60.0
    issuer: str = "garrison"
    audience: str = "garrison"
    signing_key_rotation: Duration = 30 * 86400.0
    ip_free_failures: int = Field(default=10, ge=1)
    jwt_issuer: list[JwtIssuerConfig] = Field(default_factory=list)

    @field_validator("session_idle", "session_max", "token_lifetime", "assertion_lifetime")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value


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


LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _acme_directory(value: str) -> str:
    aliases = {
        "letsencrypt": LETSENCRYPT,
        "production": LETSENCRYPT,
        "staging": LETSENCRYPT_STAGING,
    }
    url = aliases.get(value.strip().lower(), value.strip())
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(
            f'{value!r} is not an ACME directory: give an https:// URL, "letsencrypt" or "staging"'
        )
    return url


class AcmeConfig(_Model):
    """[tls.acme]: one certificate for `names`, from the CA at `directory`, over HTTP-01."""

    directory: Annotated[str, AfterValidator(_acme_directory)] = LETSENCRYPT
    staging_directory: Annotated[str, AfterValidator(_acme_directory)] | None = None
    email: str = ""
    names: list[str] = Field(default_factory=list)
    ca_bundle: str = ""  # trust for a private ACME server (step-ca, Pebble); "" = system store
    renew_before: Duration = 30 * 86400.0
    alert_webhook: str = ""
    retry_min: Duration = 60.0
    retry_max: Duration = 6 * 3600.0
    challenge: Literal["http-01"] = "http-01"

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        names: list[str] = []
        for raw in value:
            name = raw.strip().lower().rstrip(".")
            if name.startswith("*."):
                raise ValueError(f"{raw!r}: wildcards need DNS-01, which is not supported")
            if _is_ip(name):
                raise ValueError(f"{raw!r}: ACME certificates here are for DNS names, not IPs")
            labels = name.split(".")
            if (
                len(name) > 253
                or len(labels) < 2
                or not all(_DNS_LABEL.fullmatch(x) for x in labels)
            ):
                raise ValueError(f"{raw!r} is not a fully qualified DNS name")
            if name not in names:
                names.append(name)
        return names

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
            raise ValueError(f"{value!r} is not an email address")
        return value

    @field_validator("alert_webhook")
    @classmethod
    def _webhook(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("alert_webhook must be an http:// or https:// URL")
        return value

    @field_validator("retry_min", "retry_max")
    @classmethod
    def _retry(cls, value: float) -> float:
        if value < 1:
            raise ValueError("must be at least 1s (retrying faster would hammer the CA)")
        return value

    @property
    def dry_run_directory(self) -> str:
        """Where `--dry-run` goes: the staging directory, else the directory itself."""
        if self.staging_directory:
            return self.staging_directory
        return LETSENCRYPT_STAGING if self.directory == LETSENCRYPT else self.directory


class TlsFilesConfig(_Model):
    """[tls.files]: your own certificate chain and key, reloaded when the files change."""

    cert: Path | None = None
    key: Path | None = None


class TlsConfig(_Model):
    """[tls]: where the server certificate comes from."""

    source: Literal["internal", "acme", "files"] = "internal"
    acme: AcmeConfig = Field(default_factory=AcmeConfig)
    files: TlsFilesConfig = Field(default_factory=TlsFilesConfig)

    def model_post_init(self, _context: Any) -> None:
        if self.source == "acme" and not self.acme.names:
            raise ValueError('source = "acme" needs [tls.acme] names = ["your.domain", ...]')
        if self.source == "files" and (self.files.cert is None or self.files.key is None):
            raise ValueError('source = "files" needs [tls.files] cert and key paths')


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


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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

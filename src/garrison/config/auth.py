"""[auth] (sessions, tokens, external JWT issuers) and [client_certs] (mutual TLS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration


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

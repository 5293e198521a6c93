"""[tls]: the server certificate, internal, from an ACME CA, or from files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration, _is_ip

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

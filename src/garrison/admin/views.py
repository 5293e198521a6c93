"""What the admin service hands out: plain dataclasses, never a secret, safe to render or JSON.

The UI renders them; the JSON API serialises them with `dataclasses.asdict`, and the OpenAPI
document describes them from the same classes (pydantic reads dataclasses), so the three
cannot drift apart. Times are UTC epoch seconds (floats), as in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class UpstreamView:
    name: str
    url: str
    in_flight: int = 0
    queued: int = 0
    # The last connection attempt (a request's, or the idle probe's): None before the first.
    healthy: bool | None = None


@dataclass(slots=True)
class ExpiryView:
    kind: str  # server | ca | acme | client | key
    name: str
    not_after: float
    days_left: float


@dataclass(slots=True)
class Overview:
    requests: int
    errors: int  # answers with a 5xx status
    refused: int  # answers with a 4xx status
    limit_hits: int
    upstreams: list[UpstreamView] = field(default_factory=list)
    expiries: list[ExpiryView] = field(default_factory=list)


@dataclass(slots=True)
class UserView:
    name: str
    roles: list[str]
    disabled: bool
    created: float | None = None
    last_login: float | None = None  # the newest session's start (a login opens one)
    email: str | None = None
    locked_until: float | None = None


@dataclass(slots=True)
class KeyView:
    id: str
    name: str
    owner: str | None
    scopes: list[str]
    roles: list[str]  # the owner's roles: a key acts for its owner
    rate: list[str] | None
    tokens: str | None
    created: float
    expires: float | None
    last_used: float | None
    status: str  # active | revoked | expired
    prefix: str  # gk_<id>_ : the public part of the key, to recognise it


@dataclass(slots=True)
class CertView:
    serial: str  # lower-case hex, as `garrison cert list` prints it
    name: str
    roles: list[str]
    not_before: float
    not_after: float
    status: str  # active | revoked | expired | pending-revocation
    fingerprint: str  # SHA-256 of the DER, hex
    email: str | None = None
    revoked_at: float | None = None
    revoke_reason: str | None = None
    replaced_by: str | None = None


@dataclass(slots=True)
class SessionView:
    id: str  # SHA-256 of the session id as stored (not the cookie: it cannot log anyone in)
    user: str
    created: float
    expires: float
    last_seen: float

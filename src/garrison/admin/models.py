"""Request and response bodies of the JSON admin API (pydantic v2): validation and OpenAPI.

Requests refuse unknown fields and carry their limits (lengths, counts, ranges), so a
malformed call is a 422 naming the field before any store work. Responses reuse the views
(admin/views.py) through pydantic's dataclass support.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from garrison.admin.errors import AdminError, check_limits
from garrison.admin.views import CertView, KeyView

NAME = r"^[A-Za-z0-9_.@-]{1,64}$"
ROLE = r"^[A-Za-z0-9_.:-]{1,64}$"
SCOPE = r"^[a-z0-9:_.-]{1,64}$"
KEY_ID = r"^[a-z2-7]{12}$"
SERIAL = r"^[0-9a-fA-F]{1,40}$"
SESSION_ID = r"^[0-9a-f]{64}$"

Name = Annotated[str, Field(pattern=NAME, max_length=64)]
Role = Annotated[str, Field(pattern=ROLE, max_length=64)]
Scope = Annotated[str, Field(pattern=SCOPE, max_length=64)]
Password = Annotated[str, Field(min_length=8, max_length=1024)]
Email = Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
RateText = Annotated[str, Field(min_length=1, max_length=64)]
Days = Annotated[int, Field(ge=1, le=3650)]
Reason = Literal[
    "unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation"
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=False)


class _Limits(_Body):
    @model_validator(mode="after")
    def _limits(self) -> _Limits:
        try:
            check_limits(getattr(self, "rate", None), getattr(self, "tokens", None))
        except AdminError as exc:
            raise ValueError(exc.message) from None
        return self


class UserCreate(_Body):
    name: Name
    password: Password
    roles: list[Role] = Field(default_factory=list, max_length=32)
    email: Email | None = None


class UserPatch(_Body):
    """Change what is given: `disabled`, `roles` (replaces them all), or both."""

    disabled: bool | None = None
    roles: list[Role] | None = Field(default=None, max_length=32)


class PasswordReset(_Body):
    password: Password


class KeyCreate(_Limits):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    owner: Name | None = None
    scopes: list[Scope] = Field(min_length=1, max_length=32)
    rate: list[RateText] | None = Field(default=None, max_length=8)
    tokens: RateText | None = None
    expires_days: Annotated[float, Field(gt=0, le=3650)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a key name must not be blank")
        return value


class KeyRotate(_Body):
    grace_seconds: Annotated[float, Field(ge=0, le=30 * 86400)] = 0


class KeyLimits(_Limits):
    """Both replace the key's own limits; null for the routes' limits."""

    rate: list[RateText] | None = Field(default=None, max_length=8)
    tokens: RateText | None = None


class CertIssue(_Body):
    name: Name
    roles: list[Role] = Field(default_factory=list, max_length=32)
    email: Email | None = None
    days: Days | None = None
    p12_password: Password


class CertRevoke(_Body):
    reason: Reason = "unspecified"


class CertRenew(_Body):
    p12_password: Password
    days: Days | None = None


class AuditParams(_Body):
    identity: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    route: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    status: Annotated[int, Field(ge=100, le=599)] | None = None
    since: Annotated[float, Field(ge=0, le=1e11)] | None = None
    until: Annotated[float, Field(ge=0, le=1e11)] | None = None
    event: Annotated[str, Field(pattern=r"^[a-z_]{1,64}$")] | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class SessionParams(_Body):
    user: Name | None = None


# -- responses -------------------------------------------------------------------------------
class KeyCreated(BaseModel):
    key: KeyView
    secret: str = Field(description="The whole API key: shown this once, never retrievable.")


class CertIssued(BaseModel):
    cert: CertView
    p12: str = Field(description="The PKCS#12 file (base64): shown this once, never stored.")


class Revoked(BaseModel):
    revoked: int


class ErrorField(BaseModel):
    loc: str
    msg: str
    type: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    id: str | None = None
    fields: list[ErrorField] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AuditRecord(BaseModel):
    """One audit line as written (fields vary by event; see docs/decisions.md)."""

    model_config = ConfigDict(extra="allow")
    ts: str
    event: str

"""Refusals of the admin service, and the input checks the service and the API share."""

from __future__ import annotations

from collections.abc import Sequence

from garrison.auth.apikeys import ApiKeyError, UnknownApiKey
from garrison.auth.users import UserError
from garrison.limits.model import Budget, Rate
from garrison.pki.client_certs import CertError, UnknownCert

MIN_PASSWORD = 8
DEFAULT_CERT_DAYS = 365
MAX_CERT_DAYS = 3650


class AdminError(Exception):
    """A refused admin operation: `status` 404 / 409 / 422, a stable `code`, and a message
    fit to show (it never holds a secret)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def user_error(exc: UserError) -> AdminError:
    text = str(exc)
    if text.startswith("no such user"):
        return AdminError(404, "user_not_found", text)
    if text.endswith("already exists"):
        return AdminError(409, "user_exists", text)
    return AdminError(422, "invalid", text)


def key_error(exc: ApiKeyError) -> AdminError:
    text = str(exc)
    if isinstance(exc, UnknownApiKey):
        return AdminError(404, "key_not_found", text)
    if "create a new one" in text or "concurrently" in text:
        return AdminError(409, "key_not_active", text)
    return AdminError(422, "invalid", text)


def cert_error(exc: CertError) -> AdminError:
    if isinstance(exc, UnknownCert):
        return AdminError(404, "cert_not_found", str(exc))
    if str(exc).startswith("no live certificate"):
        return AdminError(409, "cert_not_live", str(exc))
    return AdminError(422, "invalid", str(exc))


def check_limits(rate: Sequence[str] | None, tokens: str | None) -> list[str] | None:
    """Per-key limits as the limits stage will read them; AdminError (422) otherwise.

    Stricter than the store's check: an amount too large for an integer, or a zero period,
    is refused here rather than met later on the request path."""
    rates = list(rate) if rate else None
    try:
        parsed = [Rate.parse(text) for text in rates or ()]
        budget = Budget.parse(tokens) if tokens is not None else None
    except (ValueError, ArithmeticError) as exc:
        raise AdminError(422, "invalid", str(exc)) from None
    for item in [*parsed, *([budget] if budget else [])]:
        if item.period <= 0 or item.limit <= 0:
            raise AdminError(422, "invalid", f"invalid limit {item.text!r}: the period must be > 0")
    return rates


def check_password(password: str) -> None:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AdminError(422, "invalid", f"a password needs at least {MIN_PASSWORD} characters")


def p12_secret(password: str) -> bytes:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AdminError(
            422, "invalid", f"the .p12 password needs at least {MIN_PASSWORD} characters"
        )
    return password.encode("utf-8")


def cert_days(days: int | None) -> int:
    if days is None:
        return DEFAULT_CERT_DAYS
    if not 1 <= days <= MAX_CERT_DAYS:
        raise AdminError(422, "invalid", f"days must be 1-{MAX_CERT_DAYS}")
    return days

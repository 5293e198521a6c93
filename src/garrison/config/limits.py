"""[limits] and the rate / token-budget texts of a route."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, field_validator

from garrison.config.base import _Model
from garrison.config.units import Duration


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

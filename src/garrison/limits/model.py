"""What a limit is, and what a backend answers: shared by the memory and Redis backends.

A request is admitted by one `Backend.admit` call (one round trip with Redis): every rate of
the route is checked and, only if all pass, each consumes one unit; the identity's
concurrency slot is taken in the same step; the token budget is checked (spent later, from the
response's usage). Keys are `<scope>|<who>`: the route and the identity (or client IP).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_AMOUNT = 10**12  # far above any real limit; keeps the numbers exact and finite
MAX_PERIOD = 366 * 86400.0  # a year: longer windows outlive any counter's retention
_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*/\s*(\d*)\s*([a-z]+)\s*", re.IGNORECASE)


def _parse(text: str, what: str) -> tuple[float, float]:
    match = _RATE_RE.fullmatch(str(text))
    if not match:
        raise ValueError(f"invalid {what} {text!r}: use N/second, N/minute, N/hour or N/day")
    amount, multiple, unit = float(match.group(1)), match.group(2), match.group(3).lower()
    unit = unit[:-1] if unit.endswith("s") and unit[:-1] in _PERIODS else unit
    period = _PERIODS.get(unit) or _UNITS.get(unit)
    if period is None:
        raise ValueError(f"invalid {what} {text!r}: unknown period {unit!r}")
    period *= int(multiple) if multiple else 1
    if not 1 <= amount <= MAX_AMOUNT or amount != int(amount):
        raise ValueError(
            f"invalid {what} {text!r}: the amount must be a whole number from 1 to {MAX_AMOUNT:,}"
        )
    if not 1 <= period <= MAX_PERIOD:
        raise ValueError(f"invalid {what} {text!r}: the period must be from 1 second to 366 days")
    return amount, period


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` requests per `period` seconds, as GCRA: a bucket of `limit` that refills evenly
    (one every period/limit seconds). No window edge: in any period at most limit + the
    refill pass, never the 2x of a fixed window at its boundary."""

    limit: int
    period: float
    text: str
    suffix: str = ""  # "|<limit>/<period>": the part of a counter key that names this rate
    step: float = 0.0  # period / limit, precomputed (the hot path reads it on every request)

    def __post_init__(self) -> None:
        object.__setattr__(self, "suffix", f"|{self.limit}/{self.period}")
        object.__setattr__(self, "step", self.period / self.limit)

    @classmethod
    def parse(cls, text: str) -> Rate:
        amount, period = _parse(text, "rate")
        return cls(int(amount), period, str(text).strip())

    @property
    def interval(self) -> float:
        return self.period / self.limit


@dataclass(frozen=True, slots=True)
class Budget:
    """`limit` LLM tokens per `period` (a window that starts at the first spend)."""

    limit: int
    period: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        amount, period = _parse(text, "token budget")
        return cls(int(amount), period, str(text).strip())


def check_overrides(rate: object, tokens: str | None) -> list[str] | None:
    """Validate per-key / per-user overrides (rate texts, budget text); ValueError if bad."""
    rates = [str(r) for r in rate] if rate else None  # type: ignore[attr-defined]
    for text in rates or ():
        Rate.parse(text)
    if tokens is not None:
        Budget.parse(tokens)
    return rates


@dataclass(slots=True)
class RateInfo:
    """For the RateLimit-* headers: the most restrictive rate after this request."""

    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


@dataclass(slots=True)
class Decision:
    allowed: bool
    hit: str = ""  # which limit refused: "rate 10/minute", "concurrency", "tokens", "backend"
    retry_after: float = 0.0
    info: RateInfo | None = None
    lease: object = None  # the concurrency slot taken (opaque); give it back with `release`


ALLOW = Decision(True)


class Backend(Protocol):
    """Memory (one process) or Redis (global). Answers directly when it can (memory)."""

    def admit(
        self,
        key: str,
        rates: tuple[Rate, ...],
        concurrency: int | None,
        budget: Budget | None,
        now: float,
    ) -> Decision | Awaitable[Decision]: ...

    def release(self, key: str, lease: object) -> None:
        """Give a concurrency slot back (idempotent; never raises)."""

    def spend(self, key: str, budget: Budget, tokens: int, now: float) -> None:
        """Add used tokens to the budget (fire-and-forget; never raises)."""

    def usage(
        self, prefix: str = ""
    ) -> list[dict[str, object]] | Awaitable[list[dict[str, object]]]:
        """Current state per key (for `garrison limits show`)."""

    async def close(self) -> None: ...

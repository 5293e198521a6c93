"""Who is calling, once identified: the one shape every credential turns into.

Identities are cached (per session, per API key, per token) and shared by every request that
presents the same credential, so whatever is derived from them for the upstream (the identity
headers, the signed assertion) is computed once per identity, not per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from garrison.limits.model import Budget, Rate


@dataclass(slots=True, eq=False)
class Identity:
    """A verified caller. `scopes` None means not scope-restricted (a person, not a credential)."""

    method: str  # "session" | "api_key" | "jwt"
    name: str
    email: str | None = None
    roles: tuple[str, ...] = ()
    scopes: frozenset[str] | None = None
    key_id: str | None = None
    session_hash: str | None = None
    valid_until: float = float("inf")
    # Per-key / per-user limit overrides (None: the route's own).
    rates: tuple[Rate, ...] | None = None
    budget: Budget | None = None
    limit_keys: dict[int, str] = field(default_factory=dict)  # route index -> counter key
    # Upstream header lines per upstream name, rendered once and reused until the assertion
    # expires (see pipeline/authorise.py).
    headers: dict[str, tuple[bytes, float]] = field(default_factory=dict)


def header_value(text: str) -> bytes:
    """A header-safe rendering: names and roles are validated, but external JWT claims are not."""
    return "".join(c for c in text if 32 <= ord(c) < 127).encode("ascii")

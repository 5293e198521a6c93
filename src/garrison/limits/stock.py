"""Permits and concurrency slots one process takes from Redis ahead of use, while plenty are free.

A round trip to Redis per request costs more than everything else the limits do (a write and
a read on a TCP socket, here and in redis-server). While an identity is far from its limits
(allowed 100 requests a second, sending 20), asking Redis every time buys no precision. So when
a reply shows room for many more, the next call asks for several permits (and slots) at once
and this process hands them out without a round trip. What keeps the limits exact:

- A stock is asked for only when, after it, at least SPARE_RATIO times as much stays free for
  everyone else; near a limit every request goes to Redis, one by one, as without stock.
- Every permit is charged in Redis when it is taken (the bucket counts it already), and is void
  PERMIT_TTL after: the total never exceeds the limit, and a permit is used at most PERMIT_TTL
  late, so no window sees more than PERMIT_TTL / interval requests early (the stock is also
  capped at that many permits).
- Every stocked slot is a lease held in Redis (refreshed by the heartbeat): slots in use plus
  slots in stock never exceed the concurrency limit. Stocked slots unused for IDLE_RETURN go
  back; a Redis error voids the whole stock (its leases expire on their own).
- Token budgets are never stocked: a request on a budgeted route always asks Redis.
"""

from __future__ import annotations

import asyncio

from garrison.limits.model import Decision, RateInfo

SPARE_RATIO = 8  # stock k only while 8k more stay free after it
STOCK_MAX = 32  # permits / slots asked for at once, at most
PERMIT_TTL = 0.25  # seconds a stocked permit stays usable
IDLE_RETURN = 0.5  # seconds a stocked slot may stay unused before it goes back


class Stock:
    """What this process holds ahead for one route x identity, and how much to ask for."""

    __slots__ = (
        "asking_permits",
        "asking_slots",
        "info",
        "leases",
        "permits",
        "until",
        "used_at",
        "waiters",
        "want_permits",
        "want_slots",
    )

    def __init__(self) -> None:
        self.permits = 0  # rate permits charged in Redis, not used yet
        self.until = 0.0  # monotonic time after which they are void
        self.leases: list[str] = []  # slots held in Redis, free here
        self.want_permits = 1  # permits to ask for on the next round trip
        self.want_slots = 0  # slots to keep in stock
        self.asking_permits = False  # a round trip asking for a stock of permits is out
        self.asking_slots = False  # ... for a stock of slots
        self.info: RateInfo | None = None  # the rate state Redis last reported (headers)
        self.used_at = 0.0
        self.waiters: list[asyncio.Future[Decision]] = []  # requests waiting for the asked stock

    def take(self, has_rates: bool, has_slots: bool, now: float) -> Decision | None:
        """An admission from stock (no round trip), or None: ask Redis."""
        if has_rates and (self.permits <= 0 or now >= self.until):
            return None
        if has_slots and not self.leases:
            return None
        if has_rates:
            self.permits -= 1
        self.used_at = now
        return Decision(True, info=self.info, lease=self.leases.pop() if has_slots else None)

    def take_permit(self, now: float) -> bool:
        """One stocked permit for a request that must still ask Redis for a slot."""
        if self.permits > 0 and now < self.until:
            self.permits -= 1
            return True
        return False

    def ask_permits(self) -> int:
        """How many permits the next round trip asks for (one stock request out at a time)."""
        if self.want_permits > 1 and not self.asking_permits:
            self.asking_permits = True
            return self.want_permits
        return 1

    def ask_slots(self) -> int:
        """How many slots beyond its own the next round trip asks for."""
        extra = self.want_slots - len(self.leases)
        if extra > 0 and not self.asking_slots:
            self.asking_slots = True
            return extra
        return 0

    def permits_granted(
        self,
        asked: int,
        granted: int,
        room: int,
        slowest_step: float,
        info: RateInfo | None,
        now: float,
    ) -> None:
        """A round trip that `asked` for permits got `granted` (one is the asking request's);
        `room` more stay free. Only the call that asked for a stock sets the stock: replies to
        single asks that crossed it must not wipe it."""
        if asked > 1:
            self.asking_permits = False
            self.permits = granted - 1  # what is left of an older stock is dropped (charged)
            self.until = now + PERMIT_TTL
        self.info = info
        self.used_at = now
        want = min(room // SPARE_RATIO, int(PERMIT_TTL / slowest_step))
        self.want_permits = max(1, min(STOCK_MAX, want))

    def slots_granted(self, room: int, asked: bool, now: float) -> None:
        """A round trip took slots (`asked`: for the stock too); `room` more stay free."""
        if asked:
            self.asking_slots = False
        self.used_at = now
        if room >= 0:
            self.want_slots = max(0, min(STOCK_MAX, room // SPARE_RATIO))

    def void(self) -> list[str]:
        """Forget everything held (after a Redis error); the leases, returned, expire there."""
        leases, self.leases = self.leases, []
        self.permits = 0
        self.want_permits, self.want_slots = 1, 0
        self.asking_permits = self.asking_slots = False
        return leases

"""Fair sharing of an upstream's GPU slots (`max_in_flight`) between identities.

When every slot is busy, waiting requests queue per identity, and a freed slot goes to the
next identity in round-robin order, not to the oldest request overall: one client with 50
requests queued cannot make another client wait for all 50 — the other waits at most about
one slot's service time. Per process (the Redis backend does not share this queue).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from typing import Any


class FairGate:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.free = slots
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return self.slots - self.free

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody is waiting (the common case)."""
        if self.free > 0 and not self._queues:
            self.free -= 1
            return True
        return False

    def try_acquire_for(self, ex: Any) -> bool:
        """try_acquire, and give the slot back when the request ends."""
        if self.try_acquire():
            ex.finally_(self.release)
            return True
        return False

    async def acquire(self, who: str, timeout: float) -> bool:
        """Wait in `who`'s queue for a slot; False when `timeout` passes first."""
        if self.try_acquire():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(who, deque()).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return True  # the slot arrived just as time ran out: keep it
            waiter.cancel()
            self._forget(who, waiter)
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # we were handed a slot but will not use it
            else:
                waiter.cancel()
                self._forget(who, waiter)
            raise

    def release(self) -> None:
        """Hand the slot to the next identity in turn, or put it back."""
        queues = self._queues
        while queues:
            who, queue = queues.popitem(last=False)
            waiter = queue.popleft()
            if queue:
                queues[who] = queue  # to the back of the line: round robin
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free = min(self.slots, self.free + 1)

    def _forget(self, who: str, waiter: asyncio.Future[None]) -> None:
        queue = self._queues.get(who)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._queues[who]

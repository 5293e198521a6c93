"""Fair GPU slots: a flood from one identity does not make another wait behind it."""

from __future__ import annotations

import asyncio

from garrison.limits.fair import FairGate


def test_round_robin_between_identities() -> None:
    async def scenario() -> list[str]:
        gate = FairGate(1)
        order: list[str] = []
        assert gate.try_acquire()

        async def request(who: str) -> None:
            assert await gate.acquire(who, 10.0)
            order.append(who)
            await asyncio.sleep(0)
            gate.release()

        flood = [asyncio.ensure_future(request("flood")) for _ in range(50)]
        await asyncio.sleep(0)
        polite = asyncio.ensure_future(request("polite"))
        await asyncio.sleep(0)
        gate.release()
        await asyncio.gather(*flood, polite)
        assert gate.free == 1 and gate.queued == 0
        return order

    order = asyncio.run(scenario())
    assert order.index("polite") <= 1  # served within one slot's turn, not after 50


def test_timeouts_and_cancellations_never_leak_a_slot() -> None:
    async def scenario() -> None:
        gate = FairGate(2)
        assert gate.try_acquire() and gate.try_acquire()
        assert await gate.acquire("a", 0.01) is False
        waiter = asyncio.ensure_future(gate.acquire("b", 10.0))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        gate.release()
        gate.release()
        assert gate.free == 2 and gate.queued == 0
        # handed a slot at the moment it is cancelled: either it holds the slot (and its
        # caller gives it back) or the slot went back to the gate; never lost
        assert gate.try_acquire() and gate.try_acquire()
        late = asyncio.ensure_future(gate.acquire("c", 10.0))
        await asyncio.sleep(0)
        gate.release()  # hands the slot to `late`
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        if not late.cancelled() and late.result() is True:
            gate.release()
        gate.release()
        assert gate.free == 2

    asyncio.run(scenario())

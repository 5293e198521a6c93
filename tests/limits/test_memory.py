"""The in-process limits backend: GCRA without a window edge, slots, budgets."""

from __future__ import annotations

import asyncio

from garrison.limits.memory import MemoryBackend
from garrison.limits.model import Budget, Rate

TEN_PER_MINUTE = Rate.parse("10/minute")


def admitted(backend: MemoryBackend, key: str, rates: tuple[Rate, ...], times: list[float]) -> int:
    return sum(backend.admit(key, rates, None, None, t).allowed for t in times)


def test_a_full_bucket_then_an_even_refill() -> None:
    backend = MemoryBackend()
    first = [backend.admit("k", (TEN_PER_MINUTE,), None, None, 0.0) for _ in range(11)]
    assert [d.allowed for d in first] == [True] * 10 + [False]
    assert first[0].info is not None and first[0].info.remaining == 9
    assert first[9].info is not None and first[9].info.remaining == 0
    refused = first[10]
    assert refused.hit == "rate 10/minute" and abs(refused.retry_after - 6.0) < 1e-6
    assert not backend.admit("k", (TEN_PER_MINUTE,), None, None, 5.9).allowed
    assert backend.admit("k", (TEN_PER_MINUTE,), None, None, 6.0).allowed


def test_no_fixed_window_burst_at_the_edge() -> None:
    """2x the limit sent across where a fixed window would reset: at most limit + 1 pass."""
    backend = MemoryBackend()
    before_edge = [59.0 + i * 0.09 for i in range(10)]
    after_edge = [60.0 + i * 0.09 for i in range(10)]
    passed = admitted(backend, "k", (TEN_PER_MINUTE,), before_edge + after_edge)
    assert passed <= 10 + 1


def test_a_refused_request_consumes_no_rate() -> None:
    backend = MemoryBackend()
    tight, loose = Rate.parse("1/minute"), Rate.parse("100/minute")
    assert backend.admit("k", (loose, tight), None, None, 0.0).allowed
    for _ in range(5):
        assert not backend.admit("k", (loose, tight), None, None, 0.0).allowed
    decision = backend.admit("k", (loose,), None, None, 0.0)
    assert decision.info is not None and decision.info.remaining == 98  # only 1 + this one used


def test_concurrency_slots_and_waiters() -> None:
    async def scenario() -> None:
        backend = MemoryBackend()
        a = backend.admit("k", (), 2, None, 0.0)
        b = backend.admit("k", (), 2, None, 0.0)
        c = backend.admit("k", (), 2, None, 0.0)
        assert a.allowed and b.allowed and not c.allowed and c.hit == "concurrency"
        assert backend.slots_held() == 2
        waiting = asyncio.ensure_future(backend.wait_for_slot("k", 5.0))
        await asyncio.sleep(0)
        assert a.lease is not None
        backend.release("k", a.lease)
        backend.release("k", a.lease)  # idempotent
        assert await waiting is True
        assert backend.admit("k", (), 2, None, 0.0).allowed
        assert await backend.wait_for_slot("k", 0.01) is False

    asyncio.run(scenario())


def test_token_budget_refuses_once_spent_and_resets() -> None:
    backend = MemoryBackend()
    budget = Budget.parse("100/minute")
    assert backend.admit("k", (), None, budget, 0.0).allowed
    backend.spend("k", budget, 60, 1.0)
    assert backend.admit("k", (), None, budget, 2.0).allowed
    backend.spend("k", budget, 60, 3.0)  # over by less than one request's tokens
    refused = backend.admit("k", (), None, budget, 4.0)
    assert not refused.allowed and refused.hit == "tokens"
    assert abs(refused.retry_after - 57.0) < 1e-6  # the window began at the first spend
    assert backend.admit("k", (), None, budget, 61.0).allowed

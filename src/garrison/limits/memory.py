"""Limits kept in this process: GCRA rates, concurrency slots and token budgets in dicts.

Answers synchronously (no coroutine on the request path). With several worker processes each
keeps its own counts; use the Redis backend for limits that must hold across processes.
"""

from __future__ import annotations

import asyncio
import itertools
import math

from garrison.limits.model import Budget, Decision, Rate, RateInfo

PRUNE_EVERY = 10_000


class MemoryBackend:
    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._slots: dict[str, set[int]] = {}
        self._tokens: dict[str, tuple[int, float]] = {}  # key -> (used, window end)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._ids = itertools.count(1)
        self._admits = 0

    def admit(
        self,
        key: str,
        rates: tuple[Rate, ...],
        concurrency: int | None,
        budget: Budget | None,
        now: float,
    ) -> Decision:
        self._admits += 1
        if self._admits % PRUNE_EVERY == 0:
            self._prune(now)
        tats = self._tats
        if budget is None and len(rates) == 1:  # the common route, without the general loop
            rate = rates[0]
            rate_key = key + rate.suffix
            step = rate.step
            tat = tats.get(rate_key, now)
            if tat < now:
                tat = now
            ahead = tat + step - now
            if ahead > rate.period + 1e-9:
                return Decision(
                    False,
                    f"rate {rate.text}",
                    ahead - rate.period,
                    RateInfo(rate.limit, 0, tat - now),
                )
            info = RateInfo(rate.limit, int((rate.period - ahead) / step + 1e-9), ahead)
            lease = None
            if concurrency is not None:
                held = self._slots.get(key)
                if held is None:
                    held = self._slots[key] = set()
                elif len(held) >= concurrency:
                    return Decision(False, "concurrency", 1.0, info)
                lease = next(self._ids)
                held.add(lease)
            tats[rate_key] = tat + step
            return Decision(True, "", 0.0, info, lease)
        info = None
        updates: list[tuple[str, float]] = []
        for rate in rates:
            rate_key = key + rate.suffix
            interval = rate.step
            tat = tats.get(rate_key, now)
            if tat < now:
                tat = now
            ahead = tat + interval - now  # where the bucket would stand after this request
            if ahead > rate.period + 1e-9:
                retry = ahead - rate.period
                return Decision(
                    False,
                    f"rate {rate.text}",
                    retry,
                    RateInfo(rate.limit, 0, tat - now),
                )
            updates.append((rate_key, tat + interval))
            remaining = int((rate.period - ahead) / interval + 1e-9)
            if info is None or remaining < info.remaining:
                info = RateInfo(rate.limit, remaining, ahead)
        if budget is not None:
            used, ends = self._tokens.get(key, (0, 0.0))
            if now < ends and used >= budget.limit:
                return Decision(False, "tokens", ends - now, info)
        lease = None
        if concurrency is not None:
            held = self._slots.get(key)
            if held is None:
                held = self._slots[key] = set()
            elif len(held) >= concurrency:
                return Decision(False, "concurrency", 1.0, info)
            lease = next(self._ids)
            held.add(lease)
        for rate_key, tat in updates:
            tats[rate_key] = tat
        return Decision(True, "", 0.0, info, lease)

    def release(self, key: str, lease: object) -> None:
        held = self._slots.get(key)
        if held is None or lease not in held:
            return
        held.remove(lease)  # an empty set stays until the next prune: no set per request
        if self._waiters:
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_for_slot(self, key: str, timeout: float) -> bool:
        """Wait until a slot of `key` is released (True) or `timeout` passes (False)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        return True

    def spend(self, key: str, budget: Budget, tokens: int, now: float) -> None:
        used, ends = self._tokens.get(key, (0, 0.0))
        if now >= ends:
            used, ends = 0, now + budget.period
        self._tokens[key] = (used + max(0, tokens), ends)

    def slots_held(self) -> int:
        """Concurrency slots held now, over every key."""
        return sum(len(s) for s in self._slots.values())

    def usage(self, prefix: str = "") -> list[dict[str, object]]:
        import time

        now = time.time()
        rows: list[dict[str, object]] = []
        for rate_key, tat in sorted(self._tats.items()):
            if rate_key.startswith(prefix) and tat > now:
                key, _, spec = rate_key.rpartition("|")
                limit_text, _, period_text = spec.partition("/")
                limit, period = int(limit_text), float(period_text)
                used = math.ceil((tat - now) / (period / limit) - 1e-9)
                rows.append(
                    {"key": key, "kind": "rate", "limit": f"{limit}/{period:g}s", "used": used}
                )
        for key, held in sorted(self._slots.items()):
            if key.startswith(prefix) and held:
                rows.append({"key": key, "kind": "concurrency", "used": len(held)})
        for key, (used, ends) in sorted(self._tokens.items()):
            if key.startswith(prefix) and now < ends:
                rows.append({"key": key, "kind": "tokens", "used": used, "resets_in": ends - now})
        return rows

    def _prune(self, now: float) -> None:
        self._tats = {k: t for k, t in self._tats.items() if t > now}
        self._tokens = {k: v for k, v in self._tokens.items() if v[1] > now}
        self._slots = {k: held for k, held in self._slots.items() if held}

    async def close(self) -> None:
        return None

"""RedisBackend against a real redis-server: GCRA, slots and leases, budgets, limits shared by
several backends and processes, failing closed/open, recovery after a Redis restart, and the
one-round-trip promise of `admit`."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from garrison.limits import stock
from garrison.limits.model import Budget, Decision, Rate
from garrison.limits.redis_backend import RedisBackend
from garrison.limits.redis_scripts import ADMIT, sha
from garrison.observe import metrics
from tests.limits.conftest import RedisServer

T = TypeVar("T")

R5S = Rate.parse("5/second")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


async def started(server: RedisServer, **kwargs: Any) -> RedisBackend:
    backend = RedisBackend(server.url, **kwargs)
    await backend.start()
    return backend


async def drain(backend: RedisBackend) -> None:
    """Wait for the fire-and-forget releases and spends sent so far."""
    await asyncio.gather(*list(backend._tasks), return_exceptions=True)


async def admit(
    backend: RedisBackend,
    key: str = "route|alice",
    rates: tuple[Rate, ...] = (),
    concurrency: int | None = None,
    budget: Budget | None = None,
) -> Decision:
    found = backend.admit(key, rates, concurrency, budget, time.time())
    return found if isinstance(found, Decision) else await found  # Decision: from stock


def errors(op: str) -> float:
    value = metrics.REGISTRY.get_sample_value("garrison_limits_backend_errors_total", {"op": op})
    return value or 0.0


# -- GCRA ---------------------------------------------------------------------------------------


def test_full_bucket_admits_limit_at_once_then_refuses_for_one_interval(
    redis_server: RedisServer,
) -> None:
    async def go() -> list[Decision]:
        backend = await started(redis_server)
        try:
            return [await admit(backend, rates=(R5S,)) for _ in range(6)]
        finally:
            await backend.close()

    decisions = run(go)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.info.remaining for d in decisions if d.info] == [4, 3, 2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.hit == "rate 5/second"
    assert 0.15 < refused.retry_after <= 0.2
    assert refused.lease is None


def test_twice_the_limit_around_the_refill_never_passes_more_than_limit_plus_one(
    redis_server: RedisServer,
) -> None:
    async def go() -> tuple[list[int], int, float]:
        backend = await started(redis_server)
        try:
            bursts = []
            t0 = time.monotonic()
            for offset in (0.0, 0.9, 1.9, 3.0):  # before, at and after each refill moment
                await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
                results = await asyncio.gather(*(admit(backend, rates=(R5S,)) for _ in range(10)))
                bursts.append(sum(d.allowed for d in results))
            total = sum(bursts)
            return bursts, total, time.monotonic() - t0
        finally:
            await backend.close()

    bursts, total, elapsed = run(go)
    assert bursts[0] == 5
    assert all(n <= 5 + 1 for n in bursts), bursts
    # GCRA's bound: the bucket plus one per emission interval, never a fixed window's 2x.
    assert total <= 5 + elapsed / R5S.interval + 1, (bursts, elapsed)


def test_a_refused_request_consumes_no_rate(redis_server: RedisServer) -> None:
    tight, loose = Rate.parse("2/minute"), Rate.parse("100/minute")

    async def go() -> tuple[list[Decision], list[dict[str, object]]]:
        backend = await started(redis_server)
        try:
            decisions = [await admit(backend, rates=(tight, loose)) for _ in range(7)]
            return decisions, await backend.usage()
        finally:
            await backend.close()

    decisions, usage = run(go)
    assert [d.allowed for d in decisions] == [True, True] + [False] * 5
    assert {d.hit for d in decisions[2:]} == {"rate 2/minute"}
    assert 29 < decisions[-1].retry_after <= 30
    used = {row["limit"]: row["used"] for row in usage if row["kind"] == "rate"}
    assert used == {"2/60s": 2, "100/60s": 2}  # the five refusals took nothing from 100/minute
    assert {row["key"] for row in usage} == {"route|alice"}


# -- concurrency and leases ----------------------------------------------------------------------


def test_slots_are_counted_refused_at_the_limit_and_released_once(
    redis_server: RedisServer,
) -> None:
    async def go() -> None:
        backend = await started(redis_server)
        try:
            a = await admit(backend, concurrency=2)
            b = await admit(backend, concurrency=2)
            assert a.allowed and b.allowed and a.lease and b.lease and a.lease != b.lease
            c = await admit(backend, concurrency=2)
            assert (c.allowed, c.hit, c.lease) == (False, "concurrency", None)
            assert c.retry_after > 0
            backend.release("route|alice", a.lease)
            await drain(backend)
            d = await admit(backend, concurrency=2)
            assert d.allowed
            backend.release("route|alice", a.lease)  # again: nothing happens, nothing raised
            await drain(backend)
            assert not (await admit(backend, concurrency=2)).allowed
            assert await backend.usage() == [
                {"key": "route|alice", "kind": "concurrency", "used": 2}
            ]
            # Another identity has its own slots.
            assert (await admit(backend, key="route|bob", concurrency=2)).allowed
        finally:
            await backend.close()

    run(go)


def test_the_heartbeat_keeps_a_held_lease_past_its_lease_time(redis_server: RedisServer) -> None:
    async def go() -> None:
        backend = await started(redis_server, lease=1.0)
        try:
            held = await admit(backend, concurrency=1)
            assert held.allowed
            await asyncio.sleep(2.2)  # more than twice the lease
            assert (await admit(backend, concurrency=1)).hit == "concurrency"
            backend.release("route|alice", held.lease or "")
            await drain(backend)
            assert (await admit(backend, concurrency=1)).allowed
        finally:
            await backend.close()

    run(go)


def test_the_slot_of_a_crashed_process_expires_after_the_lease(redis_server: RedisServer) -> None:
    async def go() -> None:
        survivor = await started(redis_server, lease=1.0)
        crashed = await started(redis_server, lease=1.0)
        try:
            assert (await admit(crashed, concurrency=1)).allowed
            await crashed.close()  # gone without releasing: no heartbeat any more
            t0 = time.monotonic()
            assert (await admit(survivor, concurrency=1)).hit == "concurrency"
            while not (await admit(survivor, concurrency=1)).allowed:
                assert time.monotonic() - t0 < 3.0, "the orphaned slot never expired"
                await asyncio.sleep(0.05)
            assert 0.5 < time.monotonic() - t0 < 1.5
        finally:
            await survivor.close()

    run(go)


# -- global across backends and processes --------------------------------------------------------


def test_two_backends_share_one_limit(redis_server: RedisServer) -> None:
    rate = Rate.parse("10/minute")

    async def go() -> list[Decision]:
        one, two = await started(redis_server), await started(redis_server)
        try:
            calls = [admit(b, rates=(rate,)) for _ in range(15) for b in (one, two)]
            return list(await asyncio.gather(*calls))
        finally:
            await one.close()
            await two.close()

    assert sum(d.allowed for d in run(go)) == 10


WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from garrison.limits.model import Rate
    from garrison.limits.redis_backend import RedisBackend

    async def main():
        backend = RedisBackend(sys.argv[1])
        await backend.start()
        rate = Rate.parse("25/minute")
        start = float(sys.argv[2])
        await asyncio.sleep(max(0.0, start - time.time()))  # both processes at once
        ok = 0
        for _ in range(40):
            ok += (await backend.admit("api|shared", (rate,), None, None, time.time())).allowed
        await backend.close()
        print(ok)

    asyncio.run(main())
    """
)


def test_two_processes_share_one_limit(redis_server: RedisServer) -> None:
    start = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_server.url, start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    counts = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        counts.append(int(out.strip()))
    assert sum(counts) == 25, counts


# -- token budgets ---------------------------------------------------------------------------------


def test_spent_tokens_refuse_with_the_windows_ttl(redis_server: RedisServer) -> None:
    budget = Budget.parse("100/hour")

    async def go() -> None:
        backend = await started(redis_server)
        direct = aioredis.from_url(redis_server.url)
        try:
            assert (await admit(backend, budget=budget)).allowed
            backend.spend("route|alice", budget, 60, time.time())
            await drain(backend)
            first_ttl = await direct.pttl("garrison:lim:route|alice|t")
            assert 3_599_000 < first_ttl <= 3_600_000
            assert (await admit(backend, budget=budget)).allowed  # 60 < 100
            await asyncio.sleep(0.3)
            backend.spend("route|alice", budget, 50, time.time())
            await drain(backend)
            assert int(await direct.get("garrison:lim:route|alice|t")) == 110
            ttl = await direct.pttl("garrison:lim:route|alice|t")
            assert ttl <= first_ttl - 250  # set once, at the first spend: not pushed back
            refused = await admit(backend, budget=budget)
            assert (refused.allowed, refused.hit) == (False, "tokens")
            assert 3590 < refused.retry_after <= 3600
            (row,) = await backend.usage()
            assert (row["key"], row["kind"], row["used"]) == ("route|alice", "tokens", 110)
            assert 3590 < row["resets_in"] <= 3600  # type: ignore[operator]
            # Another identity's budget is untouched.
            assert (await admit(backend, key="route|bob", budget=budget)).allowed
        finally:
            await direct.aclose()
            await backend.close()

    run(go)


# -- failure modes -------------------------------------------------------------------------------


def test_redis_down_fails_closed_logs_once_counts_every_call_and_recovers(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="garrison.limits")

    async def go() -> None:
        backend = await started(redis_server)
        try:
            assert (await admit(backend, rates=(R5S,))).allowed
            redis_server.stop()
            before = errors("admit")
            caplog.clear()
            t0 = time.monotonic()
            decisions = [await admit(backend, rates=(R5S,)) for _ in range(20)]
            assert time.monotonic() - t0 < 2.0  # a dead Redis does not stall requests
            assert all(
                (d.allowed, d.hit, d.retry_after) == (False, "backend", 1.0) for d in decisions
            )
            assert errors("admit") - before == 20
            lines = [r for r in caplog.records if r.name == "garrison.limits"]
            assert len(lines) == 1, [r.getMessage() for r in lines]
            assert "failing closed" in lines[0].getMessage()
            backend.release("route|alice", "nothing")  # fire-and-forget never raises
            backend.spend("route|alice", Budget.parse("10/hour"), 5, time.time())
            await drain(backend)

            redis_server.start()  # same port, empty: the script cache is gone too
            direct = aioredis.from_url(redis_server.url)
            try:
                assert await direct.script_exists(_sha_admit()) == [False]
                t1 = time.monotonic()
                while not (await admit(backend, rates=(R5S,))).allowed:
                    assert time.monotonic() - t1 < 3.0, "the backend never recovered"
                    await asyncio.sleep(0.05)
                assert await direct.script_exists(_sha_admit()) == [True]
            finally:
                await direct.aclose()
        finally:
            await backend.close()

    run(go)


def _sha_admit() -> str:
    return sha(ADMIT)


def test_redis_down_fails_open_when_configured(redis_server: RedisServer) -> None:
    async def go() -> None:
        backend = await started(redis_server, on_error="open")
        try:
            redis_server.stop()
            decision = await admit(backend, rates=(R5S,), concurrency=1)
            assert (decision.allowed, decision.hit, decision.lease) == (True, "backend", None)
        finally:
            await backend.close()

    run(go)


def test_start_with_redis_down_is_not_fatal(redis_server: RedisServer) -> None:
    async def go() -> None:
        redis_server.stop()
        backend = await started(redis_server)
        try:
            assert (await admit(backend, rates=(R5S,))).hit == "backend"
            redis_server.start()
            await asyncio.sleep(RedisBackend.DOWN_RETRY + 0.05)
            assert (await admit(backend, rates=(R5S,))).allowed
        finally:
            await backend.close()

    run(go)


# -- cost ------------------------------------------------------------------------------------------


def test_one_admit_is_one_command(redis_server: RedisServer) -> None:
    rates = (R5S, Rate.parse("100/minute"))

    async def go() -> list[dict[str, Any]]:
        backend = await started(redis_server)
        watcher = aioredis.from_url(redis_server.url)
        try:
            await admit(backend, rates=rates, concurrency=3, budget=Budget.parse("9/day"))
            seen: list[dict[str, Any]] = []
            async with watcher.monitor() as monitor:

                async def listen() -> None:
                    while True:
                        seen.append(await monitor.next_command())

                listener = asyncio.get_running_loop().create_task(listen())
                await asyncio.sleep(0.1)
                await admit(backend, rates=rates, concurrency=3, budget=Budget.parse("9/day"))
                await asyncio.sleep(0.2)
                listener.cancel()
            return seen
        finally:
            await watcher.aclose()
            await backend.close()

    seen = run(go)
    from_clients = [c for c in seen if c.get("client_type") != "lua"]
    assert [c["command"].split()[0] for c in from_clients] == ["EVALSHA"], seen


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_far_from_the_limits_most_admits_come_from_stock(redis_server: RedisServer) -> None:
    """Rates and slots with plenty of room: permits and slots are taken from Redis by the
    dozen (stock.py), so 2000 admits make far fewer than 2000 round trips; every slot handed
    out is held in Redis while in use or in stock, and idle stock goes back."""
    rates = (Rate.parse("1000000/second"), Rate.parse("100000000/day"))

    async def go() -> tuple[int, int, int, int]:
        backend = await started(redis_server)
        client = aioredis.from_url(redis_server.url)
        try:
            before = await evalsha_calls(client)
            held_max = 0
            for _ in range(100):
                decisions = [await admit(backend, "r|x", rates, 1000) for _ in range(20)]
                assert all(d.allowed for d in decisions)
                held_max = max(held_max, int(await client.zcard("garrison:lim:r|x|c")))
                for d in decisions:
                    backend.release("r|x", d.lease)  # type: ignore[arg-type]
            calls = await evalsha_calls(client) - before
            await asyncio.sleep(stock.IDLE_RETURN * 3)  # the sweep gives idle stock back
            held_after = int(await client.zcard("garrison:lim:r|x|c"))
            return calls, held_max, held_after, len(backend._held)
        finally:
            await client.aclose()
            await backend.close()

    calls, held_max, held_after, held_here = run(go)
    assert calls <= 2000 // 8, calls
    assert 20 <= held_max <= 20 + stock.STOCK_MAX
    assert held_after == 0 and held_here == 0


def test_a_budgeted_route_asks_redis_for_every_request(redis_server: RedisServer) -> None:
    """Token budgets are never stocked: each admit is one EVALSHA."""
    rates = (Rate.parse("1000000/second"),)

    async def go() -> int:
        backend = await started(redis_server)
        client = aioredis.from_url(redis_server.url)
        try:
            before = await evalsha_calls(client)
            for _ in range(200):
                assert (await admit(backend, "r|b", rates, None, Budget.parse("1e9/day"))).allowed
            return await evalsha_calls(client) - before
        finally:
            await client.aclose()
            await backend.close()

    assert run(go) == 200


def test_near_the_limit_nothing_is_stocked_and_two_backends_stay_exact(
    redis_server: RedisServer,
) -> None:
    """A limit with little room: every admit asks Redis for one permit and one slot; two
    backends admitting in turn pass exactly `limit` requests and hold exactly the slots."""
    rates = (Rate.parse("40/minute"),)

    async def go() -> tuple[int, int, int]:
        one, two = await started(redis_server), await started(redis_server)
        client = aioredis.from_url(redis_server.url)
        try:
            passed = 0
            kept: list[tuple[RedisBackend, Decision]] = []
            for i in range(60):
                backend = one if i % 2 else two
                decision = await admit(backend, "r|n", rates, 12)
                if decision.allowed:
                    passed += 1
                    kept.append((backend, decision))
                if len(kept) > 8:  # release some, keep up to 8 held at once
                    b, d = kept.pop(0)
                    b.release("r|n", d.lease)  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            held = int(await client.zcard("garrison:lim:r|n|c"))
            return passed, held, len(kept)
        finally:
            await client.aclose()
            await one.close()
            await two.close()

    passed, held, kept = run(go)
    assert passed == 40
    assert held == kept


def test_an_emptied_script_cache_is_refilled_and_the_admit_still_counts(
    redis_server: RedisServer,
) -> None:
    """SCRIPT FLUSH (what a Redis restart does): the pre-encoded EVALSHA gets NOSCRIPT, the
    same admit goes again as EVAL (lease id included), and later admits use EVALSHA again."""

    async def go() -> tuple[list[Decision], int]:
        backend = await started(redis_server)
        client = aioredis.from_url(redis_server.url)
        try:
            first = await admit(backend, rates=(R5S,), concurrency=2)
            await client.script_flush()
            second = await admit(backend, rates=(R5S,), concurrency=2)
            third = await admit(backend, rates=(R5S,), concurrency=2)
            held = await client.zcard("garrison:lim:route|alice|c")
            return [first, second, third], int(held)
        finally:
            await client.aclose()
            await backend.close()

    decisions, held = run(go)
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2].hit == "concurrency"
    assert held == 2
    assert [d.info.remaining for d in decisions[:2] if d.info] == [4, 3]


def test_changed_limits_for_the_same_identity_take_effect_at_once(
    redis_server: RedisServer,
) -> None:
    """The encoded command is cached per counter key; new limit objects (an override changed,
    a reload) must not reuse the old one."""

    async def go() -> list[Decision]:
        backend = await started(redis_server)
        try:
            out = [await admit(backend, rates=(Rate.parse("2/minute"),)) for _ in range(3)]
            out.append(await admit(backend, rates=(Rate.parse("10/minute"),)))
            out.append(await admit(backend, concurrency=1))
            out.append(await admit(backend, concurrency=1))
            return out
        finally:
            await backend.close()

    decisions = run(go)
    assert [d.allowed for d in decisions] == [True, True, False, True, True, False]
    assert decisions[3].info is not None and decisions[3].info.limit == 10
    assert decisions[5].hit == "concurrency"


def test_stocks_of_two_backends_never_hold_more_slots_than_the_limit(
    redis_server: RedisServer,
) -> None:
    """Two backends take slots ahead while plenty are free; together with the slots in use
    they never exceed the limit, every request still gets one, and all go back when idle."""

    async def go() -> tuple[list[bool], int, int]:
        one, two = await started(redis_server), await started(redis_server)
        client = aioredis.from_url(redis_server.url)
        try:
            allowed: list[bool] = []
            held: list[tuple[RedisBackend, Decision]] = []
            most = 0
            for i in range(90):
                backend = one if i % 3 else two
                decision = await admit(backend, "r|s", (), 100)
                allowed.append(decision.allowed)
                held.append((backend, decision))
                most = max(most, int(await client.zcard("garrison:lim:r|s|c")))
            for backend, decision in held:
                backend.release("r|s", decision.lease)  # type: ignore[arg-type]
            await asyncio.sleep(stock.IDLE_RETURN * 3)
            return allowed, most, int(await client.zcard("garrison:lim:r|s|c"))
        finally:
            await client.aclose()
            await one.close()
            await two.close()

    allowed, most, after = run(go)
    assert all(allowed)
    assert 90 <= most <= 100
    assert after == 0


def test_a_stock_in_use_when_redis_stops_runs_out_then_the_fail_mode_applies(
    redis_server: RedisServer,
) -> None:
    """Permits in stock were charged before the outage and stay usable for PERMIT_TTL; once a
    round trip fails, nothing held ahead is trusted and `closed` refuses."""
    rates = (Rate.parse("1000000/second"),)

    async def go() -> tuple[int, Decision]:
        backend = await started(redis_server)
        try:
            for _ in range(5):
                assert (await admit(backend, "r|o", rates)).allowed
            redis_server.stop()
            for served in range(stock.STOCK_MAX + 5):  # bounded: a stock is STOCK_MAX at most
                decision = await admit(backend, "r|o", rates)
                if not decision.allowed:
                    return served, decision
            raise AssertionError("the stock never ran out")
        finally:
            await backend.close()

    from_stock, refused = run(go)
    assert from_stock <= stock.STOCK_MAX
    assert refused.hit == "backend"

"""The pipeline runner: stages in order, the first Reply ends the request; synchronous stages
cost no coroutine, and the first awaitable switches the rest of the run to async."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable

import pytest

from garrison.pipeline.exchange import Exchange, Reply
from garrison.pipeline.pipeline import Pipeline, Stage, StageResult


def new_exchange() -> Exchange:
    return Exchange("GET", b"/", "1.1", [(b"host", b"h")], "127.0.0.1")


class Record(Stage):
    """Appends its name to a shared log and returns a fixed result (sync or async)."""

    def __init__(
        self, name: str, log: list[str], result: Reply | None = None, mode: str = "sync"
    ) -> None:
        self.name = name
        self.log = log
        self.result = result
        self.mode = mode

    def __call__(self, ex: Exchange) -> StageResult:
        self.log.append(self.name)
        if self.mode == "sync":
            return self.result
        if self.mode == "coroutine":
            return self._later()
        future: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, self.result)
        return future

    async def _later(self) -> Reply | None:
        await asyncio.sleep(0)
        self.log.append(self.name + ":done")
        return self.result


def run_async(pipeline: Pipeline, ex: Exchange) -> Reply | None:
    async def go() -> Reply | None:
        result = pipeline.run(ex)
        assert inspect.isawaitable(result), result
        return await result  # type: ignore[misc]

    return asyncio.run(go())


# -- synchronous path -----------------------------------------------------------------------------


def test_all_sync_stages_run_in_order_and_return_none_directly() -> None:
    log: list[str] = []
    pipeline = Pipeline([Record(n, log) for n in ("a", "b", "c")])
    ex = new_exchange()
    assert pipeline.run(ex) is None  # not an awaitable: no coroutine was created
    assert log == ["a", "b", "c"]
    assert ex.stage == ""


def test_a_sync_reply_ends_the_run_and_names_the_stage() -> None:
    log: list[str] = []
    reply = Reply(403)
    pipeline = Pipeline([Record("a", log), Record("deny", log, reply), Record("c", log)])
    ex = new_exchange()
    assert pipeline.run(ex) is reply
    assert log == ["a", "deny"]
    assert ex.stage == "deny"


def test_plain_functions_are_stages_named_after_themselves() -> None:
    def refuse(ex: Exchange) -> Reply:
        return Reply(401)

    ex = new_exchange()
    result = Pipeline([refuse]).run(ex)
    assert isinstance(result, Reply) and result.status == 401
    assert ex.stage == "refuse"


def test_empty_pipeline_proxies() -> None:
    assert Pipeline([]).run(new_exchange()) is None


def test_a_sync_exception_propagates() -> None:
    def boom(ex: Exchange) -> None:
        raise ValueError("stage failed")

    with pytest.raises(ValueError, match="stage failed"):
        Pipeline([boom]).run(new_exchange())


def test_stages_see_what_earlier_stages_set() -> None:
    def first(ex: Exchange) -> None:
        ex.client_ip = "198.51.100.7"

    def second(ex: Exchange) -> Reply | None:
        return Reply(200) if ex.client_ip == "198.51.100.7" else Reply(500)

    result = Pipeline([first, second]).run(new_exchange())
    assert isinstance(result, Reply) and result.status == 200


# -- asynchronous path ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["coroutine", "future"])
def test_an_awaitable_stage_then_the_rest_run_in_order(mode: str) -> None:
    log: list[str] = []
    pipeline = Pipeline(
        [Record("a", log), Record("wait", log, mode=mode), Record("c", log), Record("d", log)]
    )
    ex = new_exchange()
    assert run_async(pipeline, ex) is None
    expected = (
        ["a", "wait", "wait:done", "c", "d"] if mode == "coroutine" else ["a", "wait", "c", "d"]
    )
    assert log == expected
    assert ex.stage == ""


def test_nothing_after_an_awaitable_runs_before_it_is_awaited() -> None:
    log: list[str] = []
    pipeline = Pipeline([Record("wait", log, mode="coroutine"), Record("after", log)])

    async def go() -> None:
        pending = pipeline.run(new_exchange())
        assert log == ["wait"]
        await pending  # type: ignore[misc]
        assert log == ["wait", "wait:done", "after"]

    asyncio.run(go())


@pytest.mark.parametrize("mode", ["coroutine", "future"])
def test_a_reply_from_an_awaitable_stage_names_that_stage(mode: str) -> None:
    log: list[str] = []
    reply = Reply(429)
    pipeline = Pipeline([Record("limit", log, reply, mode=mode), Record("after", log)])
    ex = new_exchange()
    assert run_async(pipeline, ex) is reply
    assert ex.stage == "limit"
    assert "after" not in log


def test_a_sync_reply_after_an_awaitable_stage_names_the_sync_stage() -> None:
    log: list[str] = []
    reply = Reply(404)
    pipeline = Pipeline(
        [Record("wait", log, mode="coroutine"), Record("route", log, reply), Record("z", log)]
    )
    ex = new_exchange()
    assert run_async(pipeline, ex) is reply
    assert ex.stage == "route"
    assert log == ["wait", "wait:done", "route"]


def test_several_awaitable_stages_in_a_row() -> None:
    log: list[str] = []
    reply = Reply(403)
    pipeline = Pipeline(
        [
            Record("w1", log, mode="coroutine"),
            Record("w2", log, mode="future"),
            Record("w3", log, reply, mode="coroutine"),
            Record("never", log),
        ]
    )
    ex = new_exchange()
    assert run_async(pipeline, ex) is reply
    assert log == ["w1", "w1:done", "w2", "w3", "w3:done"]
    assert ex.stage == "w3"


def test_an_async_exception_propagates_when_awaited() -> None:
    async def fails() -> Reply | None:
        raise RuntimeError("store unreachable")

    def stage(ex: Exchange) -> Awaitable[Reply | None]:
        return fails()

    async def go() -> None:
        pending = Pipeline([stage]).run(new_exchange())
        with pytest.raises(RuntimeError, match="store unreachable"):
            await pending  # type: ignore[misc]

    asyncio.run(go())


def test_the_pipeline_is_reusable_across_requests() -> None:
    log: list[str] = []
    pipeline = Pipeline([Record("a", log), Record("w", log, mode="coroutine")])
    for _ in range(3):
        assert run_async(pipeline, new_exchange()) is None
    assert log == ["a", "w", "w:done"] * 3

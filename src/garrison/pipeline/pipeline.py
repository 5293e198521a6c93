"""The pipeline runner: stages in order, the first Reply ends the request.

A stage returns None (go on), a Reply (answer now) or an awaitable of either. Stages that can
decide at once return directly, so the common request runs the whole pipeline without creating
a coroutine or a Task; only a stage that must wait pays for it (see docs/decisions.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from garrison.pipeline.exchange import Exchange, Reply

StageResult = Reply | None | Awaitable[Reply | None]


class Stage:
    """Base for stages: a name (for logs: which stage refused) and a call."""

    name = "stage"

    def __call__(self, ex: Exchange) -> StageResult:  # pragma: no cover - interface
        raise NotImplementedError


class Pipeline:
    """An ordered, immutable list of stages, built once per configuration."""

    def __init__(self, stages: Sequence[Stage | Callable[[Exchange], StageResult]]) -> None:
        self.stages = tuple(stages)

    def run(self, ex: Exchange) -> StageResult:
        """Run every stage; return None when the request should be proxied."""
        for index, stage in enumerate(self.stages):
            result = stage(ex)
            if result is None:
                continue
            if isinstance(result, Reply):
                ex.stage = _name(stage)
                return result
            if index == len(self.stages) - 1 and isinstance(result, asyncio.Future):
                # The last stage answers later with a future (limits in Redis): hand it over
                # as is, so the connection waits on it without a Task.
                result.add_done_callback(partial(_name_stage, ex, _name(stage)))
                return result
            return self._run_async(ex, result, index)
        return None

    async def _run_async(
        self, ex: Exchange, pending: Awaitable[Reply | None], index: int
    ) -> Reply | None:
        result = await pending
        if result is not None:
            ex.stage = _name(self.stages[index])
            return result
        for stage in self.stages[index + 1 :]:
            step = stage(ex)
            if step is not None and not isinstance(step, Reply):
                step = await step
            if step is not None:
                ex.stage = _name(stage)
                return step
        return None


def _name_stage(ex: Exchange, name: str, future: asyncio.Future[Reply | None]) -> None:
    if not future.cancelled() and future.exception() is None and future.result() is not None:
        ex.stage = name


def _name(stage: object) -> str:
    """A stage's name for logs: its `name`, else a plain function's own name."""
    return getattr(stage, "name", None) or getattr(stage, "__name__", type(stage).__name__)

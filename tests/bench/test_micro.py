"""The micro benchmark drives the real protocols end to end (it must not rot)."""

from __future__ import annotations

import uvloop
from bench.micro import measure


def test_micro_benchmark_proxies_requests() -> None:
    per_request = uvloop.run(measure(200, profile=False))
    assert per_request > 0

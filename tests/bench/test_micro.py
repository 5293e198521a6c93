"""The micro benchmark drives the real protocols end to end (it must not rot)."""

from __future__ import annotations

import pytest
import uvloop
from bench.micro import measure


@pytest.mark.parametrize("auth", ["none", "key", "jwt"])
def test_micro_benchmark_proxies_requests(auth: str) -> None:
    # measure() raises unless the last request was answered 200 (a refused key/JWT is a 401).
    per_request = uvloop.run(measure(200, profile=False, auth=auth))
    assert per_request > 0

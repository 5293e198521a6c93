"""Per-upstream gauges from a real gateway: requests in flight at an upstream that has no
`max_in_flight` (read from its connection pool at scrape time), and queued ones behind one
that has. Slow requests to the fake upstream are held open while the gateway is scraped."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.fixtures_core import client_context, config, running_gateway
from tests.e2e.fixtures_stream import wait_until
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

HELD = 3  # slow requests open at once
HOLD_S = 4.0  # how long the upstream holds each one
WAIT_S = 10.0  # bounds how long a failure takes


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


def gauge(gw: GatewayProcess, name: str, upstream: str) -> float | None:
    with httpx.Client(base_url=gw.url, verify=client_context(gw), timeout=30) as c:
        text = c.get("/.garrison/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("upstream") == upstream:
                return sample.value
    return None


def hold(gw: GatewayProcess, path: str, statuses: list[int]) -> list[threading.Thread]:
    """HELD requests that the upstream answers after HOLD_S; their statuses go to `statuses`."""

    def one() -> None:
        with httpx.Client(base_url=gw.url, verify=client_context(gw), timeout=30) as c:
            statuses.append(c.get(path, params={"delay": HOLD_S}).status_code)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(HELD)]
    for thread in threads:
        thread.start()
    return threads


def test_in_flight_without_max_in_flight(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path_factory.mktemp("gauges"), config(upstream.url)) as gw:
        assert wait_until(lambda: gauge(gw, "garrison_upstream_in_flight", "app") == 0, WAIT_S)
        statuses: list[int] = []
        threads = hold(gw, "/slow", statuses)
        assert wait_until(lambda: gauge(gw, "garrison_upstream_in_flight", "app") == HELD, WAIT_S)
        for thread in threads:
            thread.join(30)
        assert statuses == [200] * HELD
        assert gauge(gw, "garrison_upstream_in_flight", "app") == 0


def test_queued_behind_max_in_flight(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> None:
    text = config(upstream.url).replace(
        'url = "' + upstream.url + '"', 'url = "' + upstream.url + '"\nmax_in_flight = 1', 1
    )
    with running_gateway(tmp_path_factory.mktemp("gauges-gate"), text) as gw:
        statuses: list[int] = []
        threads = hold(gw, "/slow", statuses)
        assert wait_until(
            lambda: (
                (
                    gauge(gw, "garrison_upstream_in_flight", "app"),
                    gauge(gw, "garrison_upstream_queued", "app"),
                )
                == (1, HELD - 1)
            ),
            WAIT_S,
        )
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * HELD
        assert gauge(gw, "garrison_upstream_queued", "app") == 0

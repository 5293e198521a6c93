"""Limits shared through Redis, end to end: two gateway processes on one real redis-server.

The limit is global (two processes together never pass more than it), a Redis outage does
what `on_backend_error` says (logged once per interval, counted in a metric), and service
comes back by itself when Redis does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import httpx
import pytest

from tests.e2e.fixtures_core import client_context, running_gateway
from tests.support.gateway import GatewayProcess
from tests.support.redis import RedisServer, redis_server_or_skip
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = redis_server_or_skip(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def config(upstream: str, redis_url: str, on_error: str = "closed") -> str:
    return f"""
[server]
listen = "127.0.0.1:0"

[limits]
backend = "{redis_url}"
on_backend_error = "{on_error}"

[[upstream]]
name = "app"
url = "{upstream}"

[[route]]
path = "/"
upstream = "app"
auth = ["none"]
rate = ["6/minute"]
"""


def status(gw: GatewayProcess, path: str = "/x") -> int:
    with closing(httpx.Client(base_url=gw.url, verify=client_context(gw), timeout=10)) as c:
        return c.get(path).status_code


def metric(gw: GatewayProcess, name: str) -> float:
    with closing(httpx.Client(base_url=gw.url, verify=client_context(gw), timeout=10)) as c:
        text = c.get("/.garrison/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_two_processes_share_one_limit(tmp_path: Path, redis: RedisServer) -> None:
    with FakeUpstream() as upstream, ExitStack() as stack:
        gateways = [
            stack.enter_context(
                running_gateway(tmp_path / f"gw{i}", config(upstream.url, redis.url))
            )
            for i in range(2)
        ]
        statuses = [status(gateways[i % 2]) for i in range(12)]
        assert statuses.count(200) == 6, statuses  # not 2 x 6: the limit is global
        assert statuses[:6] == [200] * 6
        assert len(upstream.requests) == 6


def test_redis_outage_fails_closed_logs_once_and_recovers(
    tmp_path: Path, redis: RedisServer
) -> None:
    with (
        FakeUpstream() as upstream,
        running_gateway(tmp_path / "gw", config(upstream.url, redis.url)) as gw,
    ):
        assert status(gw) == 200
        redis.stop()
        before = len(upstream.requests)
        answers = [status(gw) for _ in range(8)]
        assert answers == [503] * 8  # closed: nothing passes unchecked
        assert len(upstream.requests) == before
        assert metric(gw, "garrison_limits_backend_errors_total") >= 8
        time.sleep(0.3)
        logged = [line for line in gw.lines if "failing closed" in line]
        assert 1 <= len(logged) <= 2, logged  # once per interval, not once per request
        redis.start()
        deadline = time.monotonic() + 5
        code = 503
        while code != 200 and time.monotonic() < deadline:
            code = status(gw)
            time.sleep(0.1)
        assert code == 200  # back without a restart


def test_redis_outage_open_mode_lets_requests_through(tmp_path: Path, redis: RedisServer) -> None:
    with (
        FakeUpstream() as upstream,
        running_gateway(tmp_path / "gw", config(upstream.url, redis.url, on_error="open")) as gw,
    ):
        redis.stop()
        assert [status(gw) for _ in range(8)] == [200] * 8  # more than the limit: open
        assert len(upstream.requests) == 8


def test_aborted_streams_leave_no_slot_in_redis(tmp_path: Path, redis: RedisServer) -> None:
    import redis as redis_py

    from tests.support.gateway import tls_socket

    text = config("http://127.0.0.1:1", redis.url).replace(
        'rate = ["6/minute"]', 'concurrency = 2\nqueue_timeout = "2s"'
    )
    with FakeUpstream() as upstream:
        text = text.replace("http://127.0.0.1:1", upstream.url)
        with running_gateway(tmp_path / "gw", text) as gw:
            for round_ in range(60):
                socks = []
                for _ in range(2):
                    sock = tls_socket(gw, "localhost")
                    sock.sendall(b"GET /forever HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    socks.append(sock)
                if round_ % 2:  # half the rounds: wait for the stream to start, then leave
                    for sock in socks:
                        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
                for sock in socks:
                    sock.close()
            assert [status(gw) for _ in range(3)] == [200, 200, 200]
            client = redis_py.Redis.from_url(redis.url)
            deadline = time.monotonic() + 5
            held = -1
            while time.monotonic() < deadline:
                held = sum(client.zcard(k) for k in client.scan_iter("garrison:lim:*|c"))
                if held == 0:
                    break
                time.sleep(0.05)
            assert held == 0

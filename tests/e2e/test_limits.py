"""Limits that protect the GPU, end to end (issue 5): a real gateway, real keys, real upstreams.

Every refusal is also checked at the upstream (its request log must not grow), and slot
accounting is checked by behaviour (a leaked slot would make the next request wait or fail)
and by the gateway's own metrics.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.e2e.fixtures_core import (
    OPEN,
    client,
    demo_upstream,
    gateway_config,
    route_toml,
    running_gateway,
    upstream_toml,
)
from tests.e2e.test_auth import Counting, cli, new_key
from tests.support.gateway import GatewayProcess, tls_socket
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    with demo_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, demo: str
) -> Iterator[GatewayProcess]:
    text = gateway_config(
        upstream.url,
        upstream_toml("gpu", upstream.url, "max_in_flight = 1"),
        upstream_toml("llm", demo),
        route_toml("/rated/", "app", 'rate = ["5/minute"]'),
        route_toml("/anon/", "app", OPEN, 'rate = ["3/minute"]'),
        route_toml(
            "/streams/", "app", "strip_prefix = true", "concurrency = 3", 'queue_timeout = "2s"'
        ),
        route_toml("/gpu/", "gpu", "strip_prefix = true", 'queue_timeout = "30s"'),
        route_toml("/v1/", "llm", 'tokens = "20/minute"'),
    )
    with running_gateway(tmp_path_factory.mktemp("limits"), text) as gateway:
        yield gateway


def metric(gw: GatewayProcess, name: str) -> float:
    with client(gw) as c:
        text = c.get("/.garrison/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_rate_limit_per_key_with_headers(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    key = new_key(gw, "rated", "x")
    other = new_key(gw, "rated-other", "x")
    with closing(client(gw, key)) as c:
        with Counting(upstream, 5):
            ok = [c.get("/rated/x") for _ in range(5)]
        assert [r.status_code for r in ok] == [200] * 5
        assert ok[0].headers["ratelimit-limit"] == "5"
        assert [r.headers["ratelimit-remaining"] for r in ok] == ["4", "3", "2", "1", "0"]
        assert ok[0].headers["x-ratelimit-limit"] == "5"
        with Counting(upstream, 0):
            refused = c.get("/rated/x")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 12
        body = refused.json()["error"]
        assert body["code"] == "rate_limited" and body["limit"] == "rate 5/minute"
    with closing(client(gw, other)) as c:  # another identity has its own bucket
        assert c.get("/rated/x").status_code == 200


def test_anonymous_limit_is_per_client_ip_and_spoofing_does_not_reset_it(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    statuses = []
    with Counting(upstream, 3):
        for i in range(6):
            with closing(client(gw)) as c:
                spoof = {"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"198.51.100.{i}"}
                statuses.append(c.get("/anon/x", headers=spoof).status_code)
    assert statuses == [200, 200, 200, 429, 429, 429]


def _open_stream(gw: GatewayProcess, key: str) -> socket.socket:
    sock = tls_socket(gw, "localhost")
    sock.sendall(
        b"GET /streams/forever HTTP/1.1\r\nHost: localhost\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_a_thousand_aborted_streams_leave_no_slot_held(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    key = new_key(gw, "streamer", "x")
    for _ in range(334):  # 3 at a time (the route's concurrency): 1,002 streams in all
        socks = [_open_stream(gw, key) for _ in range(3)]
        for sock in socks:
            sock.close()  # the client goes away mid-stream
    with closing(client(gw, key, timeout=10)) as c:
        statuses = [c.get("/streams/x").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    deadline = time.monotonic() + 5
    while metric(gw, "garrison_limit_slots_held") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gw, "garrison_limit_slots_held") == 0


def test_concurrency_queues_then_refuses(gw: GatewayProcess) -> None:
    key = new_key(gw, "queued", "x")
    socks = [_open_stream(gw, key) for _ in range(3)]
    try:
        with closing(client(gw, key)) as c:
            started = time.monotonic()
            refused = c.get("/streams/x")
            waited = time.monotonic() - started
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_concurrent"
        assert waited >= 1.5  # it queued for queue_timeout (2 s) before giving up
        socks[0].close()
        with closing(client(gw, key)) as c:
            assert c.get("/streams/x").status_code == 200  # the freed slot is usable
    finally:
        for sock in socks:
            sock.close()


def test_fair_gpu_slots(gw: GatewayProcess) -> None:
    """One slot; a flood of 20 slow requests from one key; the other key's single request
    is served after about one request's service time, not after the flood."""
    flood_key = new_key(gw, "flood", "x")
    polite_key = new_key(gw, "polite", "x")
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()

    def call(key: str, who: str) -> None:
        with closing(client(gw, key, timeout=60)) as c:
            resp = c.get("/gpu/slow", params={"delay": "0.2"})
        assert resp.status_code == 200, resp.text
        with lock:
            finished.append((who, time.monotonic()))

    threads = [threading.Thread(target=call, args=(flood_key, "flood")) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the flood is queued
    polite = threading.Thread(target=call, args=(polite_key, "polite"))
    polite.start()
    for thread in [*threads, polite]:
        thread.join(timeout=60)
    order = [who for who, _ in sorted(finished, key=lambda item: item[1])]
    assert len(order) == 21
    assert order.index("polite") <= 5, order  # FIFO would put it last (index 20)


def _chat(c: httpx.Client, stream: bool, include_usage: bool | None = None) -> httpx.Response:
    body: dict[str, object] = {
        "model": "demo",
        "messages": [{"role": "user", "content": "one two three"}],
        "stream": stream,
    }
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return c.post("/v1/chat/completions", json=body)


def _events(text: str) -> list[dict[str, object] | str]:
    out: list[dict[str, object] | str] = []
    for block in re.split(r"\r?\n\r?\n", text):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_token_budget_counts_json_and_streams(gw: GatewayProcess) -> None:
    key = new_key(gw, "tokens", "x")
    with closing(client(gw, key)) as c:
        plain = _chat(c, stream=False)
        assert plain.status_code == 200
        used = plain.json()["usage"]["total_tokens"]
        assert used > 0
        # The client did not ask for usage: Garrison asked for it and strips it again.
        streamed = _chat(c, stream=True)
        assert streamed.status_code == 200
        events = _events(streamed.text)
        assert events[-1] == "[DONE]"
        # (chunks may carry "usage": null, as with include_usage; the usage event is gone)
        assert all(isinstance(e, str) or not e.get("usage") for e in events), events
        assert any(isinstance(e, dict) and e.get("choices") for e in events)
        asked = _chat(c, stream=True, include_usage=True)
        asked_events = _events(asked.text)
        assert any(isinstance(e, dict) and e.get("usage") for e in asked_events)
        statuses = []
        for _ in range(10):
            statuses.append(_chat(c, stream=False).status_code)
            if statuses[-1] == 429:
                break
        # 20 tokens per minute: the budget runs out after a few requests of `used` tokens
        # each, counting the streamed ones too; never more than one request's worth over.
        assert statuses[-1] == 429, statuses
        passed_total = used * (3 + statuses.count(200))
        assert passed_total - 20 <= used
        refused = _chat(c, stream=False)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "token_budget_exhausted"


def test_limits_show(gw: GatewayProcess) -> None:
    key = new_key(gw, "shown", "x")
    with closing(client(gw, key)) as c:
        assert c.get("/rated/x").status_code == 200
    out = cli(gw.data_dir, "limits", "show", "--url", gw.url, f"key:{key[3:15]}")
    assert "rate" in out and f"key:{key[3:15]}" in out, out


def test_key_override(gw: GatewayProcess, tmp_path: Path) -> None:
    out = cli(gw.data_dir, "key", "create", "vip", "--scope", "x", "--rate", "8/minute")
    key = out.strip()
    with closing(client(gw, key)) as c:
        statuses = [c.get("/rated/x").status_code for _ in range(9)]
    assert statuses == [200] * 8 + [429]


def test_user_override(gw: GatewayProcess) -> None:
    cli(gw.data_dir, "user", "add", "slowpoke", "--password-stdin", stdin="slowpoke-pass-1\n")
    cli(gw.data_dir, "user", "limits", "slowpoke", "--rate", "2/minute")
    with closing(client(gw)) as c:
        token = c.post(
            "/.garrison/token",
            data={"grant_type": "password", "username": "slowpoke", "password": "slowpoke-pass-1"},
        ).json()["access_token"]
    with closing(client(gw, token)) as c:
        statuses = [c.get("/rated/x").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the user's own 2/minute, not the route's 5/minute

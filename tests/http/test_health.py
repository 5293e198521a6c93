"""Upstream health from real connections: a listening loopback server, then the same port
closed. Up, down and back up, logged once per change, probed only when idle, and exported as
`garrison_upstream_up` only once something is known."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import pytest

from garrison.http import health
from garrison.http.upstream import UpstreamError, UpstreamPool
from garrison.observe import metrics


def _scrape_line(name: str) -> str | None:
    text = metrics.render().decode()
    wanted = f'garrison_upstream_up{{upstream="{name}"}} '
    return next((line for line in text.splitlines() if line.startswith(wanted)), None)


def test_probe_connect_and_failure_set_the_state(caplog: pytest.LogCaptureFixture) -> None:
    name = f"app-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        accepted: list[bytes] = []

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(await reader.read())  # b"": the probe closes without a byte
            writer.close()

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = UpstreamPool(name, "127.0.0.1", port, 2.0, 4)
        assert pool.health.up is None and _scrape_line(name) is None  # not known: no sample
        assert pool.health.stale(time.monotonic())  # never tried
        await pool.probe()
        assert pool.health.up is True and not pool.health.probing
        assert not pool.health.stale(time.monotonic())  # just checked
        for _ in range(50):
            if accepted:
                break
            await asyncio.sleep(0.02)
        assert accepted == [b""]
        assert _scrape_line(name) == f'garrison_upstream_up{{upstream="{name}"}} 1.0'
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamError, match="cannot connect"):
            await pool.connect()  # a request's connect is a signal too
        assert pool.health.up is False and "cannot connect" in pool.health.reason
        await pool.probe()  # still down: no second warning
        assert _scrape_line(name) == f'garrison_upstream_up{{upstream="{name}"}} 0.0'
        # Back: a new server on the same port.
        again = await asyncio.start_server(on_client, "127.0.0.1", port)
        conn = await pool.connect()
        assert pool.health.up is True
        pool.forget(conn)
        assert conn.transport is not None
        conn.transport.close()
        again.close()
        await again.wait_closed()

    with caplog.at_level(logging.WARNING, logger="garrison"):
        asyncio.run(scenario())
    changes = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(changes) == 2, changes
    assert "is down: cannot connect" in changes[0] and changes[1].endswith("is up again")


def test_a_reload_keeps_what_is_known() -> None:
    name = f"kept-{uuid.uuid4().hex[:8]}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first = UpstreamPool(name, "127.0.0.1", port, 1.0, 4)
    first.health.failed("cannot connect")
    second = UpstreamPool(name, "127.0.0.1", port, 1.0, 4)  # the same upstream after a reload
    assert second.health is first.health and second.health.up is False
    moved = UpstreamPool(name, "127.0.0.1", port + 1 if port < 65535 else port - 1, 1.0, 4)
    assert moved.health is not first.health and moved.health.up is None


def test_no_probe_while_one_runs_or_after_recent_traffic() -> None:
    record = health.UpstreamHealth("x")
    assert record.stale(0.0 + health.PROBE_AFTER)
    record.ok()
    assert not record.stale(record.checked + health.PROBE_AFTER - 1)
    assert record.stale(record.checked + health.PROBE_AFTER)
    record.probing = True
    assert not record.stale(record.checked + 10 * health.PROBE_AFTER)

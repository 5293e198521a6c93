"""WebSocket frames are bridged both ways, and closing either side closes the other."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.e2e.fixtures_stream import (
    ControlUpstream,
    access_lines,
    client_context,
    fetch,
    running_gateway,
    tls_socket,
    upstream_connections,
    wait_until,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[ControlUpstream]:
    with ControlUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, ws_upstream: ControlUpstream
) -> Iterator[GatewayProcess]:
    routes = f"""
[[upstream]]
name = "wsctl"
url = "{ws_upstream.url}"

[[route]]
path = "/ctl/"
auth = ["none"]
upstream = "wsctl"
strip_prefix = true
"""
    with running_gateway(tmp_path_factory.mktemp("gw-ws"), upstream.url, routes=routes) as gw:
        yield gw


def _wss(gw: GatewayProcess, path: str) -> str:
    return f"wss://127.0.0.1:{gw.port}{path}"


def _run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_text_and_binary_frames_are_echoed(gateway: GatewayProcess) -> None:
    ctx = client_context(gateway)

    async def go() -> list[object]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(_wss(gateway, "/ws"), ssl=ctx, autoping=False) as ws,
        ):
            got: list[object] = []
            for text in ("hello", "second message", "ü ✓ unicode"):
                await ws.send_str(text)
                got.append(await ws.receive_str())
            for blob in (b"\x00\x01\x02\xff", os.urandom(200_000)):
                await ws.send_bytes(blob)
                got.append((await ws.receive_bytes()) == blob)
            return got

    got = _run(go())
    assert got == ["echo:hello", "echo:second message", "echo:ü ✓ unicode", True, True]


def test_large_frames_cross_the_tunnel_both_ways(
    gateway: GatewayProcess, ws_upstream: ControlUpstream
) -> None:
    ctx = client_context(gateway)
    blob = os.urandom(8 * 1024 * 1024)

    async def go() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                _wss(gateway, "/ctl/ws?tag=big"), ssl=ctx, max_msg_size=16 * 1024 * 1024
            ) as ws,
        ):
            ok = True
            for _ in range(3):
                await ws.send_bytes(blob)
                ok = ok and (await ws.receive_bytes()) == blob
            return ok

    assert _run(go()) is True


def test_client_close_closes_the_upstream_side(
    gateway: GatewayProcess, ws_upstream: ControlUpstream
) -> None:
    ctx = client_context(gateway)
    tag = f"client-close-{time.monotonic_ns()}"

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(_wss(gateway, f"/ctl/ws?tag={tag}"), ssl=ctx)
            await ws.send_str("ping")
            assert await ws.receive_str() == "echo:ping"
            await ws.close(code=4321, message=b"client done")

    _run(go())
    assert wait_until(lambda: ws_upstream.closed(tag) is not None, timeout=10)
    closure = ws_upstream.closed(tag)
    assert closure is not None and closure.close_code == 4321
    assert wait_until(
        lambda: upstream_connections(gateway.proc.pid, ws_upstream.port) == 0, timeout=10
    ), "the gateway kept its upstream WebSocket connection open"


def test_upstream_close_closes_the_client_side(
    gateway: GatewayProcess, ws_upstream: ControlUpstream
) -> None:
    ctx = client_context(gateway)
    tag = f"server-close-{time.monotonic_ns()}"

    async def go() -> tuple[aiohttp.WSMsgType, int | None, bool]:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(_wss(gateway, f"/ctl/ws?tag={tag}"), ssl=ctx)
            await ws.send_str("close:4001")
            msg = await ws.receive(timeout=10)
            # aiohttp answers the close frame; then the connection must end.
            for _ in range(50):
                if ws.closed:
                    break
                await asyncio.sleep(0.05)
            return msg.type, ws.close_code, ws.closed

    kind, code, closed = _run(go())  # type: ignore[misc]
    assert kind == aiohttp.WSMsgType.CLOSE
    assert code == 4001
    assert closed
    assert wait_until(lambda: ws_upstream.closed(tag) is not None, timeout=10)
    assert wait_until(
        lambda: upstream_connections(gateway.proc.pid, ws_upstream.port) == 0, timeout=10
    )


def test_upstream_close_ends_the_client_tcp_connection(
    gateway: GatewayProcess, ws_upstream: ControlUpstream
) -> None:
    """At the byte level: after the upstream's close frame, the gateway closes the client."""
    tag = f"raw-close-{time.monotonic_ns()}"
    sock = tls_socket(gateway)
    try:
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        sock.sendall(
            (
                f"GET /ctl/ws?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(4096)
            assert piece, head
            head += piece
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        # A masked text frame "close:4002".
        payload = b"close:4002"
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        rest = head.split(b"\r\n\r\n", 1)[1]
        for _ in range(100):
            if len(rest) >= 4:
                break
            piece = sock.recv(4096)
            assert piece, "connection closed before the close frame arrived"
            rest += piece
        assert rest[:1] == b"\x88", rest[:20]  # the upstream's close frame came through
        assert int.from_bytes(rest[2:4], "big") == 4002
        # Answer the close (masked, same code), as RFC 6455 asks; then the gateway must hang up.
        reply = rest[2:4]
        sock.sendall(b"\x88\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(reply)))
        for _ in range(100):
            if not sock.recv(4096):
                break
        else:
            pytest.fail("the gateway never closed the client connection")
    except (ConnectionResetError, TimeoutError) as exc:
        pytest.fail(f"expected a clean close, got {exc!r}")
    finally:
        sock.close()
    assert wait_until(lambda: ws_upstream.closed(tag) is not None, timeout=10)


def test_abrupt_client_disconnect_closes_the_upstream_side(
    gateway: GatewayProcess, ws_upstream: ControlUpstream
) -> None:
    tag = f"reset-{time.monotonic_ns()}"
    sock = tls_socket(gateway)
    sock.sendall(
        (
            f"GET /ctl/ws?tag={tag} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    assert wait_until(lambda: upstream_connections(gateway.proc.pid, ws_upstream.port) >= 1)
    raw = socket.socket(fileno=sock.detach())
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()  # RST, no close frame
    assert wait_until(lambda: ws_upstream.closed(tag) is not None, timeout=10), (
        "the upstream WebSocket stayed open after the client vanished"
    )
    assert wait_until(
        lambda: upstream_connections(gateway.proc.pid, ws_upstream.port) == 0, timeout=10
    )
    assert wait_until(
        lambda: any(
            r.get("path") == "/ctl/ws" and r.get("status") == 101 for r in access_lines(gateway)
        ),
        timeout=5,
    ), "no access-log line for the WebSocket"


def test_non_websocket_upgrade_is_not_tunnelled(
    gateway: GatewayProcess, upstream: FakeUpstream
) -> None:
    result = fetch(
        gateway, "/plain", headers={"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings"}
    )
    assert result.status == 200
    seen = upstream.requests[-1]
    assert seen.raw_path == "/plain"
    assert "upgrade" not in seen.headers
    assert "http2-settings" not in seen.headers

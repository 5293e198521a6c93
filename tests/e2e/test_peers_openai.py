"""`garrison up --demo` driven by real clients: the openai SDK, curl, aiohttp (upload, WebSocket).

Every client verifies the gateway's certificate against the CA it printed; nothing uses -k or
verify=False. `--demo` protects `/` by default, so every client sends an API key made with
`garrison key create`; a wrong key and no key are refused. The demo app's test knobs
(`x_delay_ms`, `x_tokens`) make timing-dependent behaviour (an SSE event flushed before the next
one exists) observable without clocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from tests.e2e.conftest import ca_file, trust
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _client(gw: GatewayProcess, http: httpx.Client, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=api_key, http_client=http, max_retries=0, timeout=60
    )


@pytest.fixture(scope="module")
def oai(demo_gateway: GatewayProcess, demo_key: str) -> Iterator[openai.OpenAI]:
    http = httpx.Client(verify=trust(demo_gateway))
    client = _client(demo_gateway, http, demo_key)
    try:
        yield client
    finally:
        client.close()
        http.close()


@pytest.fixture(scope="module")
def tls(demo_gateway: GatewayProcess) -> ssl.SSLContext:
    return trust(demo_gateway)


@pytest.fixture(scope="module")
def auth(demo_key: str) -> dict[str, str]:
    """The header every non-SDK client here sends."""
    return {"Authorization": f"Bearer {demo_key}"}


def test_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["garrison-demo"]


def _wrong_keys(key: str) -> list[str]:
    """The real key's id with another secret (well-formed), and something not a key at all."""
    secret = key[16:]
    other = ("A" if secret[0] != "A" else "B") + secret[1:]
    return [f"{key[:16]}{other}", "sk-not-a-garrison-key"]


def test_wrong_key_and_no_key_are_refused(
    oai: openai.OpenAI, demo_gateway: GatewayProcess, demo_key: str
) -> None:
    messages: Any = [{"role": "user", "content": "let me in"}]
    assert oai.chat.completions.create(model="garrison-demo", messages=messages).choices
    with httpx.Client(verify=trust(demo_gateway)) as http:
        for wrong in _wrong_keys(demo_key):
            bad = _client(demo_gateway, http, wrong)
            with pytest.raises(openai.AuthenticationError) as refused:
                bad.chat.completions.create(model="garrison-demo", messages=messages)
            assert refused.value.status_code == 401
            assert refused.value.code == "invalid_token", refused.value.body
            challenge = refused.value.response.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="garrison"')
            assert 'error="invalid_token"' in challenge
        anonymous = http.post(
            demo_gateway.url + "/v1/chat/completions",
            json={"model": "garrison-demo", "messages": messages},
        )
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["code"] == "authentication_required"
    assert anonymous.headers["www-authenticate"].startswith('Bearer realm="garrison"')


def test_chat_non_stream(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(
        model="garrison-demo", messages=[{"role": "user", "content": "through the gateway"}]
    )
    assert done.choices[0].message.content == "You said: through the gateway"
    assert done.usage is not None
    assert done.usage.completion_tokens == 5
    assert done.usage.total_tokens == done.usage.prompt_tokens + 5


def test_chat_stream_with_usage_chunk(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="garrison-demo",
        messages=[{"role": "user", "content": "stream via garrison"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"x_delay_ms": 5},
    )
    pieces: list[str] = []
    usages = []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    assert pieces == ["You", " said:", " stream", " via", " garrison"]
    assert len(usages) == 1
    assert usages[0].completion_tokens == 5
    assert usages[0].total_tokens == usages[0].prompt_tokens + 5


def _stats(http: httpx.Client, base: str) -> dict[str, int]:
    resp = http.get(base + "/x/stats")
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_sse_is_not_buffered_and_disconnect_cancels_upstream(
    demo_gateway: GatewayProcess, auth: dict[str, str]
) -> None:
    """The next token is ten minutes away: the first must still arrive, and leaving must
    stop the app's stream (the GPU would otherwise keep generating for nobody)."""
    body = {
        "model": "garrison-demo",
        "messages": [{"role": "user", "content": "slow"}],
        "stream": True,
        "x_delay_ms": 600_000,
    }
    timeout = httpx.Timeout(60.0)
    with httpx.Client(verify=trust(demo_gateway), timeout=timeout, headers=auth) as http:
        before = _stats(http, demo_gateway.url)
        first = ""
        with http.stream("POST", demo_gateway.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert "content-encoding" not in resp.headers
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        first = delta["content"]
                        break
        assert first == "You"
        after = before
        for _ in range(150):  # up to ~15 s for the gateway to notice and cancel
            after = _stats(http, demo_gateway.url)
            if after["streams_cancelled"] > before["streams_cancelled"]:
                break
            time.sleep(0.1)
    assert after["streams_cancelled"] == before["streams_cancelled"] + 1, (before, after)
    assert after["streams_active"] == 0


def test_upload_streams_through(
    demo_gateway: GatewayProcess, tls: ssl.SSLContext, auth: dict[str, str]
) -> None:
    data = hashlib.sha256(b"upload").digest() * (6 * 1024 * 1024 // 32)
    want = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    async def go() -> tuple[object, object]:
        async def chunks():  # chunked transfer encoding, no Content-Length
            for i in range(0, len(data), 128 * 1024):
                yield data[i : i + 128 * 1024]

        conn = aiohttp.TCPConnector(ssl=tls)
        async with aiohttp.ClientSession(connector=conn, headers=auth) as session:
            async with session.post(demo_gateway.url + "/upload", data=chunks()) as resp:
                assert resp.status == 200, await resp.text()
                raw = await resp.json()
            form = aiohttp.FormData()
            form.add_field("file", data, filename="big.bin")
            async with session.post(demo_gateway.url + "/upload", data=form) as resp:
                assert resp.status == 200, await resp.text()
                multi = await resp.json()
        return raw, multi

    raw, multi = asyncio.run(go())
    assert raw == want
    assert multi == want


def test_websocket_echo_through(
    demo_gateway: GatewayProcess, tls: ssl.SSLContext, auth: dict[str, str]
) -> None:
    async def go() -> list[object]:
        conn = aiohttp.TCPConnector(ssl=tls)
        async with (
            aiohttp.ClientSession(connector=conn, headers=auth) as session,
            session.ws_connect(demo_gateway.url.replace("https", "wss") + "/ws") as ws,
        ):
            got = []
            for msg in ("ping", "ünïcode " * 1000):
                await ws.send_str(msg)
                got.append((await ws.receive(timeout=30)).data)
            await ws.send_bytes(bytes(range(256)) * 300)
            got.append((await ws.receive(timeout=30)).data)
            await ws.close()
            return got

    assert asyncio.run(go()) == ["ping", "ünïcode " * 1000, bytes(range(256)) * 300]


def _curl(curl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_curl_trusts_the_printed_ca(
    curl: str, demo_gateway: GatewayProcess, auth: dict[str, str]
) -> None:
    ca = str(ca_file(demo_gateway))
    port = demo_gateway.port
    header = "Authorization: " + auth["Authorization"]
    by_ip = _curl(curl, "--cacert", ca, "-H", header, f"https://127.0.0.1:{port}/healthz")
    assert by_ip.returncode == 0, by_ip.stderr
    assert json.loads(by_ip.stdout) == {"ok": True}
    by_name = _curl(
        curl,
        "--cacert",
        ca,
        "-H",
        header,
        "--resolve",
        f"localhost:{port}:127.0.0.1",
        f"https://localhost:{port}/",
    )
    assert by_name.returncode == 0, by_name.stderr
    assert "Garrison demo AI app" in by_name.stdout


def test_curl_without_the_ca_refuses(curl: str, demo_gateway: GatewayProcess) -> None:
    """The check above means something only if verification is really on."""
    result = _curl(curl, f"https://127.0.0.1:{demo_gateway.port}/")  # system trust store only
    assert result.returncode == 60, (result.returncode, result.stderr)  # peer cert not trusted

"""The bundled demo app, started as `python -m garrison.demo` and driven by real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import httpx
import openai
import pytest

ANNOUNCE = re.compile(r"^demo app listening on http://127\.0\.0\.1:(\d+)$")


class DemoApp:
    """A running demo app subprocess and its base URL."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "garrison.demo", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().rstrip("\n")
        match = ANNOUNCE.match(line)
        if not match:
            self.stop()
            pytest.fail(f"unexpected first line {line!r}; stderr:\n{self.proc.stderr.read()}")
        self.base = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoApp]:
    app = DemoApp()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def oai(demo: DemoApp) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=demo.base + "/v1", api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        client.close()


def test_announces_one_line_and_exits_zero_on_sigterm() -> None:
    app = DemoApp()
    assert httpx.get(app.base + "/healthz").json() == {"ok": True}
    assert app.stop() == 0
    assert app.proc.stdout is not None
    assert app.proc.stdout.read() == ""  # exactly one line was printed


def test_sigint_also_exits_zero() -> None:
    app = DemoApp()
    app.proc.send_signal(signal.SIGINT)
    assert app.proc.wait(timeout=15) == 0


def test_healthz(demo: DemoApp) -> None:
    resp = httpx.get(demo.base + "/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"ok": True}


def test_index_page_is_self_contained_and_uses_relative_urls(demo: DemoApp) -> None:
    resp = httpx.get(demo.base + "/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    for url in ("./v1/chat/completions", "./upload", "./healthz"):
        assert f'"{url}"' in html
    # No external resources: nothing is loaded from another origin or an absolute path.
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|/)""", html)
    assert "@import" not in html
    assert "getReader()" in html  # tokens are rendered from the stream as they arrive


def test_models_list(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids == ["garrison-demo"]


def test_chat_non_stream_with_usage(oai: openai.OpenAI) -> None:
    done = oai.chat.completions.create(
        model="garrison-demo",
        messages=[
            {"role": "system", "content": "be terse"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "You said: first"},
            {"role": "user", "content": "hello   brave new world"},
        ],
    )
    assert done.object == "chat.completion"
    assert done.model == "garrison-demo"
    assert done.choices[0].message.content == "You said: hello brave new world"
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None
    assert done.usage.completion_tokens == 6
    assert done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 6


def test_chat_stream_tokens_and_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="garrison-demo",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"x_delay_ms": 1},
    )
    pieces: list[str] = []
    usage = None
    finish = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
    assert pieces == ["You", " said:", " stream", " me", " please"]
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + 5


def test_chat_stream_without_usage_option_has_no_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="garrison-demo",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_body={"x_delay_ms": 0},
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "You said: x"


def test_raw_sse_framing_and_x_tokens(demo: DemoApp) -> None:
    body = {
        "model": "garrison-demo",
        "messages": [{"role": "user", "content": "a b"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "x_tokens": 7,
        "x_delay_ms": 0,
    }
    with httpx.stream("POST", demo.base + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event is terminated by a blank line
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    tokens = [t for t in contents if t]
    assert tokens == ["You", " said:", " a", " b", "You", " said:", " a"]
    assert chunks[-1]["usage"]["completion_tokens"] == 7


def test_each_sse_event_is_flushed_before_the_next_token(demo: DemoApp) -> None:
    """With a 10-minute gap between tokens, the first token must still arrive now."""

    async def first_token() -> tuple[str, dict[str, int]]:
        body = {
            "messages": [{"role": "user", "content": "slow"}],
            "stream": True,
            "x_delay_ms": 600_000,
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(demo.base + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                got = ""
                while not got:
                    line = (await resp.content.readline()).decode()
                    assert line, "stream ended early"
                    if line.startswith("data: "):
                        got = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            # Leaving the block closed the connection: the app must cancel the stream.
            for _ in range(200):
                async with session.get(demo.base + "/x/stats") as s:
                    stats = await s.json()
                if stats["streams_active"] == 0:
                    break
                await asyncio.sleep(0.05)
            return got, stats

    token, stats = asyncio.run(asyncio.wait_for(first_token(), timeout=60))
    assert token == "You"
    assert stats["streams_active"] == 0
    assert stats["streams_cancelled"] >= 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "x_tokens": -1}', "x_tokens"),
    ],
)
def test_bad_requests_get_openai_error_objects(
    demo: DemoApp, payload: bytes, fragment: str
) -> None:
    resp = httpx.post(
        demo.base + "/v1/chat/completions",
        content=payload,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert fragment in err["message"]


def test_openai_sdk_raises_bad_request_on_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="garrison-demo", messages=[])


def _payload(size: int) -> bytes:
    block = hashlib.sha256(b"garrison").digest() * 2048  # 64 KiB, not all one byte
    return (block * (size // len(block) + 1))[:size]


def test_upload_raw_and_multipart_hash_streamed_bodies(demo: DemoApp) -> None:
    data = _payload(5 * 1024 * 1024 + 123)
    want = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    async def go() -> tuple[dict[str, object], dict[str, object]]:
        async def gen():  # chunked transfer: the app cannot know the length up front
            for i in range(0, len(data), 256 * 1024):
                yield data[i : i + 256 * 1024]

        async with aiohttp.ClientSession() as session:
            async with session.post(demo.base + "/upload", data=gen()) as resp:
                assert resp.status == 200
                raw = await resp.json()
            form = aiohttp.FormData()
            form.add_field("note", "ignored text field")
            form.add_field("file", data, filename="blob.bin")
            async with session.post(demo.base + "/upload", data=form) as resp:
                assert resp.status == 200
                multi = await resp.json()
        return raw, multi

    raw, multi = asyncio.run(go())
    assert raw == want
    assert multi == want


def test_upload_empty_body(demo: DemoApp) -> None:
    resp = httpx.post(demo.base + "/upload", content=b"")
    assert resp.json() == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_websocket_echo_text_and_binary(demo: DemoApp) -> None:
    async def go() -> list[object]:
        got: list[object] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(demo.base + "/ws") as ws,
        ):
            await ws.send_str("héllo")
            got.append((await ws.receive(timeout=30)).data)
            await ws.send_bytes(b"\x00\x01" * 40_000)
            got.append((await ws.receive(timeout=30)).data)
            await ws.close()
        return got

    text, binary = asyncio.run(go())
    assert text == "héllo"
    assert binary == b"\x00\x01" * 40_000

"""A tiny OpenAI-compatible AI app that `garrison up --demo` puts behind the gateway.

It exists so a newcomer sees every kind of traffic Garrison must carry work end to end:
a browser page, SSE token streaming, a streamed upload, a WebSocket and a health check.
Everything is deterministic so tests can assert exact content.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from importlib import resources
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

MODEL = "garrison-demo"
DEFAULT_DELAY_MS = 30
MAX_TOKENS = 10_000
MAX_DELAY_MS = 3_600_000
CHUNK = 64 * 1024
STATS = web.AppKey("stats", dict[str, int])


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    """Errors shaped like OpenAI's, so SDKs raise their usual exception types."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


def _content_text(content: Any) -> str:
    """Message content may be a string or a list of typed parts (vision-style)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def reply_for(messages: list[Any]) -> str:
    """The deterministic answer: echo the last user message."""
    last = ""
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "user":
            last = _content_text(msg.get("content"))
    last = " ".join(last.split())
    return f"You said: {last}" if last else "You said nothing."


def tokens_for(reply: str, count: int | None) -> list[str]:
    """Split the reply into word tokens (leading space kept, like real BPE pieces)."""
    words = reply.split(" ")
    toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if count is None:
        return toks
    return [toks[i % len(toks)] for i in range(count)]


def _prompt_tokens(messages: list[Any]) -> int:
    return sum(
        len(_content_text(m.get("content")).split()) + 1 for m in messages if isinstance(m, dict)
    )


async def _read_json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "Request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(400, "Request body must be a JSON object.")
    return body


def _int_knob(body: dict[str, Any], key: str, default: int | None, top: int) -> int | None:
    """Test knobs: bounded non-negative integers, anything else is a client error."""
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise ValueError(f"{key} must be an integer in 0..{top}")
    return value


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions: JSON or an SSE stream of chunks, one event per token."""
    body = await _read_json(request)
    if isinstance(body, web.Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty array.")
    try:
        count = _int_knob(body, "x_tokens", None, MAX_TOKENS)
        delay = (_int_knob(body, "x_delay_ms", DEFAULT_DELAY_MS, MAX_DELAY_MS) or 0) / 1000
    except ValueError as exc:
        return _error(400, str(exc))
    toks = tokens_for(reply_for(messages), count)
    usage = {
        "prompt_tokens": _prompt_tokens(messages),
        "completion_tokens": len(toks),
        "total_tokens": _prompt_tokens(messages) + len(toks),
    }
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.get("stream"):
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(toks)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None, with_usage: bool = False) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = usage if with_usage else None
        if with_usage:
            obj["choices"] = []
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    stats = request.app[STATS]
    stats["streams_active"] += 1
    try:
        await resp.write(chunk({"role": "assistant", "content": ""}, None))
        for i, tok in enumerate(toks):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(chunk({"content": tok}, None))
        await resp.write(chunk({}, "stop"))
        if include_usage:
            await resp.write(chunk({}, None, with_usage=True))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionError):
        stats["streams_cancelled"] += 1
        raise
    else:
        stats["streams_completed"] += 1
    finally:
        stats["streams_active"] -= 1
    return resp


async def models(_request: web.Request) -> web.Response:
    entry = {"id": MODEL, "object": "model", "created": 0, "owned_by": "garrison"}
    return web.json_response({"object": "list", "data": [entry]})


async def upload(request: web.Request) -> web.Response:
    """Hash the upload while it streams in; never hold the whole body in memory."""
    digest = hashlib.sha256()
    size = 0
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.filename is None:
                await part.release()
                continue
            while data := await part.read_chunk(CHUNK):
                digest.update(data)
                size += len(data)
            break
        else:
            return _error(400, "multipart body has no file part")
    else:
        async for data in request.content.iter_chunked(CHUNK):
            digest.update(data)
            size += len(data)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Echo every text and binary frame back."""
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def stats(request: web.Request) -> web.Response:
    """Stream counters, so gateway tests can see that a client disconnect reached the app."""
    return web.json_response(request.app[STATS])


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def index(_request: web.Request) -> web.Response:
    html = resources.files("garrison.demo").joinpath("static/index.html").read_text("utf-8")
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


def make_app() -> web.Application:
    """Build the demo application (no background tasks; safe to create many)."""
    app = web.Application(client_max_size=1024**2)
    app.router.add_get("/", index)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/upload", upload)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/x/stats", stats)
    app[STATS] = {"streams_active": 0, "streams_completed": 0, "streams_cancelled": 0}
    return app

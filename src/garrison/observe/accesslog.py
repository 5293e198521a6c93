"""The JSON access log: one line per request, buffered, never a secret in it.

Only the normalised path is logged, never the query string (tokens travel there), headers,
cookies or bodies. Lines are buffered and written at most every 200 ms or every 64 KiB so the hot
path pays for a dict and a json.dumps, not for a system call. This is the operational log;
security decisions and changes go to the audit log (observe/audit.py, `[audit]`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from garrison.http.relay import InFlight
    from garrison.pipeline.exchange import Exchange, Reply
    from garrison.runtime import Runtime

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.2


class AccessLog:
    """Writes JSON lines to stderr, stdout or a file (reopened on reload, for log rotation)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._stream: IO[str] | None = None
        self._buffer: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self.open()

    def open(self) -> None:
        if self.target == "off":
            self._stream = None
        elif self.target == "stderr":
            self._stream = sys.stderr
        elif self.target == "stdout":
            self._stream = sys.stdout
        else:
            path = os.path.abspath(self.target)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - long-lived

    def reopen(self) -> None:
        self.flush()
        if self._stream is not None and self._stream not in (sys.stderr, sys.stdout):
            self._stream.close()
        self.open()

    def response(self, inflight: InFlight, error: str = "") -> None:
        """A proxied request ended (whole, or cut short by `error`)."""
        if self._stream is None:
            return
        ex = inflight.ex
        route = ex.route
        upstream_ms = (
            f"{(inflight.upstream_headers_at - inflight.upstream_started) * 1000:.3f}"
            if inflight.upstream_headers_at
            else "null"
        )
        tail = f',"error":"{error}","stage":"{ex.stage or "upstream"}"}}\n' if error else "}\n"
        # Formatted by hand: json.dumps of a dict costs more than the rest of the request's
        # Python work. Only free-form strings go through _json_str.
        self._append(
            f'{{"time":"{_now_iso()}","client_ip":"{ex.client_ip or ex.peer_ip}",'
            f'"method":{_cached_json(ex.method)},"path":{_json_str(ex.path)},'
            f'"status":{inflight.status},"bytes":{inflight.bytes_out},'
            f'"duration_ms":{(time.monotonic() - ex.started) * 1000:.3f},'
            f'"upstream_ms":{upstream_ms},'
            f'"route":{_cached_json(route.path) if route else "null"},'
            f'"upstream":{_cached_json(route.upstream) if route else "null"}{tail}'
        )

    def reply(self, ex: Exchange, reply: Reply, runtime: Runtime | None = None) -> None:
        """The gateway answered itself (an error, a redirect, a gateway endpoint)."""
        if self._stream is None:
            return
        record = {
            "time": _now_iso(),
            "client_ip": ex.client_ip or ex.peer_ip,
            "method": ex.method,
            "path": ex.path or None,
            "status": reply.status,
            "bytes": len(reply.body),
            "duration_ms": round((time.monotonic() - ex.started) * 1000, 3),
            "upstream_ms": None,
            "route": ex.route.path if ex.route else None,
            "stage": ex.stage or None,
        }
        self._write(record)

    def _write(self, record: dict[str, object]) -> None:
        self._append(json.dumps(record, separators=(",", ":")) + "\n")

    def _append(self, line: str) -> None:
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._stream is None:
            self._buffer.clear()
            self._size = 0
            return
        data = "".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError:
            pass  # a full disk must not take the gateway down; metrics will say it (later)


def _json_str(text: str | None) -> str:
    """A JSON string literal; the common plain-ASCII case without json.dumps."""
    if text is None:
        return "null"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


_JSON_CACHE: dict[str, str] = {}


def _cached_json(text: str) -> str:
    """JSON for the few strings that repeat on every line (methods, route paths, names)."""
    found = _JSON_CACHE.get(text)
    if found is None:
        found = _json_str(text)
        if len(_JSON_CACHE) < 1024:
            _JSON_CACHE[text] = found
    return found


_last_second = 0
_last_text = ""


def _now_iso() -> str:
    """UTC time with milliseconds; the second part is cached (formatting is not free)."""
    global _last_second, _last_text
    now = time.time()
    second = int(now)
    if second != _last_second:
        _last_second = second
        _last_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_text}.{int((now - second) * 1000):03d}Z"

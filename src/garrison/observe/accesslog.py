"""The JSON access log: one line per request, buffered, never a secret in it.

The line is the one observe/outcome.py formats for the audit log too (the normalised path, never
the query string, headers, cookies or bodies). Lines are buffered and written at most every
200 ms or every 64 KiB so the hot path pays for a string, not for a system call. This is the
operational log (stderr by default); the audit log (`[audit]`) is the security record.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import IO

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
        self.enabled = False
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
        self.enabled = self._stream is not None

    def reopen(self) -> None:
        self.flush()
        if self._stream is not None and self._stream not in (sys.stderr, sys.stdout):
            self._stream.close()
        self.open()

    def append(self, line: str) -> None:
        """One whole line (observe/outcome.py formats it); written in the next batch."""
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

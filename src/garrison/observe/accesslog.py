"""The JSON access log: one line per request, buffered, never a secret in it.

The line is the one observe/outcome.py formats for the audit log too (the normalised path, never
the query string, headers, cookies or bodies). Lines are buffered and written at most every
200 ms or every 64 KiB so the hot path pays for a string, not for a system call. This is the
operational log (stderr by default); the audit log (`[audit]`) is the security record.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from garrison.observe.batching import LineBatch


class AccessLog(LineBatch):
    """Writes JSON lines to stderr, stdout or a file (reopened on reload, for log rotation)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self._stream: IO[str] | None = None
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

    def _write_batch(self, data: str) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError:
            pass  # a full disk must not take the gateway down; metrics will say it (later)

"""Lines kept in memory and written as one batch: every FLUSH_SECONDS or FLUSH_BYTES.

The access log and the audit log both log every request; a system call per line would cost
more than the line. Outside an event loop (commands, tests) there is nothing to flush later,
so a line is written at once.
"""

from __future__ import annotations

import asyncio

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.2


class LineBatch:
    """Subclasses write a batch in `_write_batch` (whole lines, joined)."""

    def __init__(self) -> None:
        self._buffer: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def append(self, line: str) -> None:
        """One whole line, newline included; written with the next batch."""
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
        """Write what is buffered now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = "".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        self._write_batch(data)

    def _write_batch(self, data: str) -> None:
        raise NotImplementedError

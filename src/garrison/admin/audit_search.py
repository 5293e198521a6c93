"""Search the audit file sink, newest first, with bounded work (run it in a thread).

The file and its rotations (`audit.log`, `audit.log.1`, ...) are read backwards in blocks, so
the newest lines are found first and a search stops after `MAX_SCAN_LINES` lines or
`MAX_SCAN_BYTES` bytes, whatever the files' size. A line that does not parse (a torn tail
after a `kill -9`) is skipped. Matching is exact per field, on fields the audit log itself
wrote, so no search term is ever evaluated as a pattern.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BLOCK = 256 * 1024
MAX_SCAN_LINES = 200_000
MAX_SCAN_BYTES = 64 * 1024 * 1024
MAX_RESULTS = 1000
MAX_LINE = 64 * 1024  # longer lines (bodies = "full") are skipped, not parsed


@dataclass(frozen=True, slots=True)
class AuditQuery:
    identity: str | None = None  # identity, user, by or key_id (exact)
    route: str | None = None  # route (exact) or, failing that, path prefix
    status: int | None = None
    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive
    event: str | None = None
    limit: int = 100

    def matches(self, record: dict[str, object]) -> bool:
        if self.event is not None and record.get("event") != self.event:
            return False
        if self.status is not None and record.get("status") != self.status:
            return False
        if self.identity is not None and self.identity not in (
            record.get("identity"),
            record.get("user"),
            record.get("by"),
            record.get("key_id"),  # a key's requests, allowed or refused, and its changes
        ):
            return False
        if self.route is not None and record.get("route") != self.route:
            path = record.get("path")
            if not (isinstance(path, str) and path.startswith(self.route)):
                return False
        if self.since is not None or self.until is not None:
            ts = _epoch(record.get("ts"))
            if ts is None:
                return False
            if self.since is not None and ts < self.since:
                return False
            if self.until is not None and ts >= self.until:
                return False
        return True


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def audit_files(path: Path, keep: int) -> list[Path]:
    """The current file, then its rotations newest to oldest (numbered without gaps)."""
    files = [path]
    for index in range(1, keep + 1):
        rotated = path.with_name(f"{path.name}.{index}")
        if not rotated.exists():
            break
        files.append(rotated)
    return files


def _lines_backwards(path: Path, budget: list[int]) -> Iterator[bytes]:
    """Lines of one file, last first; `budget[0]` bytes may still be read (shared)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        position = os.fstat(fd).st_size
        tail = b""
        while position > 0 and budget[0] > 0:
            size = min(BLOCK, position, budget[0])
            position -= size
            budget[0] -= size
            block = os.pread(fd, size, position) + tail
            lines = block.split(b"\n")
            tail = lines[0]  # may continue in the previous block
            for line in reversed(lines[1:]):
                if line:
                    yield line
            if len(tail) > MAX_LINE:
                tail = b""  # an overlong line: skipped (its start is read as a fragment)
        if tail and position == 0:
            yield tail
    finally:
        os.close(fd)


def search(files: list[Path], query: AuditQuery) -> list[dict[str, object]]:
    """Matching records, newest first, at most `query.limit` (itself at most MAX_RESULTS)."""
    limit = max(1, min(query.limit, MAX_RESULTS))
    found: list[dict[str, object]] = []
    budget = [MAX_SCAN_BYTES]
    scanned = 0
    for path in files:
        for line in _lines_backwards(path, budget):
            scanned += 1
            if scanned > MAX_SCAN_LINES:
                return found
            if len(line) > MAX_LINE:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and query.matches(record):
                record.pop("body_b64", None)  # bodies = "full": the file has it, pages need not
                found.append(record)
                if len(found) >= limit:
                    return found
        if budget[0] <= 0:
            break
    return found

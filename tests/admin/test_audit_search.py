"""Searching the audit files backwards: newest first across rotations and block boundaries,
torn and overlong lines skipped, and the work bounded whatever the files hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garrison.admin import audit_search
from garrison.admin.audit_search import AuditQuery, audit_files, search


def write(path: Path, records: list[dict[str, object]], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_newest_first_across_rotations_and_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_search, "BLOCK", 97)  # lines straddle many block edges
    log = tmp_path / "audit.log"
    write(log.with_name("audit.log.2"), [{"event": "e", "n": i} for i in range(0, 50)])
    write(log.with_name("audit.log.1"), [{"event": "e", "n": i} for i in range(50, 100)])
    write(log, [{"event": "e", "n": i} for i in range(100, 150)], tail=b'{"event":"e","n":')
    files = audit_files(log, keep=10)
    assert files == [log, log.with_name("audit.log.1"), log.with_name("audit.log.2")]
    found = search(files, AuditQuery(limit=1000))
    assert [r["n"] for r in found] == list(range(149, -1, -1))  # the torn tail is skipped


def test_filters(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    write(
        log,
        [
            {"ts": "2026-01-01T00:00:00.000Z", "event": "request", "status": 401, "route": "/v1/"},
            {"ts": "2026-01-02T00:00:00.000Z", "event": "request", "status": 200, "path": "/v1/x"},
            {"ts": "2026-01-03T00:00:00.000Z", "event": "key_revoked", "by": "admin:root"},
            {"ts": "2026-01-04T00:00:00.000Z", "event": "login_ok", "user": "carol"},
            {"ts": "bad", "event": "request", "identity": "carol", "body_b64": "c2VjcmV0"},
            {"ts": "2026-01-05T00:00:00.000Z", "event": "request", "key_id": "k3y1d"},
        ],
    )
    files = [log]

    def events(**query: object) -> list[object]:
        return [r.get("ts") for r in search(files, AuditQuery(**query))]  # type: ignore[arg-type]

    assert events(status=401) == ["2026-01-01T00:00:00.000Z"]
    assert events(route="/v1/") == ["2026-01-02T00:00:00.000Z", "2026-01-01T00:00:00.000Z"]
    assert events(identity="admin:root") == ["2026-01-03T00:00:00.000Z"]
    assert events(identity="carol") == ["bad", "2026-01-04T00:00:00.000Z"]
    assert events(since=1767312000.0, until=1767484800.0) == [  # Jan 2 <= ts < Jan 4
        "2026-01-03T00:00:00.000Z",
        "2026-01-02T00:00:00.000Z",
    ]
    assert events(identity="k3y1d") == ["2026-01-05T00:00:00.000Z"]  # a refused key's line
    assert events(event="request", limit=1) == ["2026-01-05T00:00:00.000Z"]
    assert "body_b64" not in search(files, AuditQuery(identity="carol"))[0]


def test_work_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "audit.log"
    write(log, [{"event": "e", "n": i} for i in range(1000)])
    monkeypatch.setattr(audit_search, "MAX_SCAN_LINES", 100)
    assert len(search([log], AuditQuery(event="nothing", limit=1000))) == 0
    assert len(search([log], AuditQuery(limit=1000))) == 100
    monkeypatch.setattr(audit_search, "MAX_SCAN_LINES", 10**9)
    monkeypatch.setattr(audit_search, "MAX_SCAN_BYTES", 2000)
    found = search([log], AuditQuery(limit=1000))
    assert 50 < len(found) < 200 and found[0]["n"] == 999
    assert search([tmp_path / "missing.log"], AuditQuery()) == []


def test_overlong_lines_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_search, "MAX_LINE", 200)
    monkeypatch.setattr(audit_search, "BLOCK", 64)
    log = tmp_path / "audit.log"
    write(log, [{"event": "a"}, {"event": "big", "x": "y" * 1000}, {"event": "b"}])
    assert [r["event"] for r in search([log], AuditQuery())] == ["b", "a"]

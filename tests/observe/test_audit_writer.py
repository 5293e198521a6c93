"""The audit writer on its own: known fields only, whole lines, rotation with several writer
processes, fsync policies, body digests and the syslog sink (a real datagram socket)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from garrison.config import AuditConfig, ConfigError, validate
from garrison.observe.audit import FULL_BODY_MAX, AuditLog, BodyDigest
from garrison.observe.audit_sink import FileSink
from garrison.pipeline.exchange import Exchange
from garrison.pipeline.limits import TokenMeter


def lines_of(directory: Path, name: str = "audit.log") -> list[str]:
    """Every line of the audit file and its rotated siblings (oldest first)."""
    files = sorted(
        (p for p in directory.glob(name + "*") if not p.name.endswith(".lock")),
        key=lambda p: -int(p.name.rsplit(".", 1)[1]) if p.name != name else 0,
    )
    out: list[str] = []
    for path in files:
        data = path.read_text()
        assert data == "" or data.endswith("\n"), f"{path} ends inside a line"
        out += data.splitlines()
    return out


def test_only_known_fields_of_the_declared_type(tmp_path: Path) -> None:
    audit = AuditLog(AuditConfig(fsync="always"), tmp_path)
    for secret_field in ("password", "authorization", "cookie", "token", "api_key", "headers"):
        with pytest.raises(TypeError, match="not an audit field"):
            audit.event("login_ok", {secret_field: "x"})
    with pytest.raises(TypeError, match="does not take"):
        audit.event("login_ok", {"user": b"bytes are not text"})
    with pytest.raises(TypeError, match="does not take"):
        audit.event("login_ok", {"status": "200"})
    audit.event("login_ok", {"user": "a" * 5000, "scopes": [f"s{i}" for i in range(100)]})
    audit.close()
    (line,) = lines_of(tmp_path)
    record = json.loads(line)
    assert record["event"] == "login_ok" and len(record["user"]) == 256
    assert len(record["scopes"]) == 32
    assert set(record) == {"ts", "event", "user", "scopes"}


def test_always_is_on_disk_at_once_and_batched_modes_wait_for_flush(tmp_path: Path) -> None:
    always = AuditLog(AuditConfig(fsync="always", path=tmp_path / "a.log"), tmp_path)
    always.event("key_revoked", {"key_id": "k1"})
    assert json.loads((tmp_path / "a.log").read_text())["key_id"] == "k1"  # no flush needed
    always.close()

    async def in_the_loop() -> str:  # inside the gateway's loop, lines wait for a batch
        batched = AuditLog(AuditConfig(fsync="never", path=tmp_path / "b.log"), tmp_path)
        for index in range(3):
            batched.event("key_revoked", {"key_id": f"k{index}"})
        before = (tmp_path / "b.log").read_text()
        batched.close()
        return before

    assert asyncio.run(in_the_loop()) == ""  # buffered: no system call per line
    assert [json.loads(x)["key_id"] for x in lines_of(tmp_path, "b.log")] == ["k0", "k1", "k2"]


def test_file_is_private(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "sub" / "audit.log", 0, 1)
    sink.write(b"{}\n")
    sink.close()
    assert (tmp_path / "sub" / "audit.log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sub").stat().st_mode & 0o777 == 0o700


def test_rotation_keeps_keep_files_of_whole_lines(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "audit.log", 4096, 3)
    line = json.dumps({"n": 0, "pad": "x" * 90}) + "\n"
    for n in range(400):
        sink.write(line.replace('"n": 0', f'"n": {n}').encode())
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    numbers = [json.loads(x)["n"] for x in lines_of(tmp_path)]
    assert numbers == list(range(numbers[0], 400))  # the newest, in order, none missing
    assert numbers[0] > 0  # the oldest files were dropped (keep = 3)
    for path in tmp_path.glob("audit.log.*"):
        if not path.name.endswith(".lock"):
            assert path.stat().st_size >= 4096


def test_a_line_torn_by_a_killed_writer_is_cut_before_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"n":1}\n{"n":2}\n{"n":3,"tr')  # what a kill inside write() leaves
    sink = FileSink(path, 0, 1)
    sink.write(b'{"n":4}\n')
    sink.write(b'{"n":5}\n')
    sink.close()
    assert [json.loads(x)["n"] for x in lines_of(tmp_path)] == [1, 2, 4, 5]
    path.write_bytes(b'{"only":"part')
    sink = FileSink(path, 0, 1)
    sink.write(b'{"n":6}\n')
    sink.close()
    assert path.read_bytes() == b'{"n":6}\n'


def _writer(path: Path, tag: int, count: int) -> None:
    sink = FileSink(path, 8192, 10_000)
    for n in range(count):
        sink.write(json.dumps({"w": tag, "n": n, "pad": "y" * (n % 200)}).encode() + b"\n")
    sink.close()


def test_several_processes_rotating_one_file_lose_no_line(tmp_path: Path) -> None:
    """Workers are processes: each appends and rotates on its own; every line survives once."""
    path = tmp_path / "audit.log"
    writers, count = 4, 1500
    pids = []
    for tag in range(writers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _writer(path, tag, count)
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    records = [json.loads(x) for x in lines_of(tmp_path)]  # every line parses
    seen = {(r["w"], r["n"]) for r in records}
    assert len(records) == writers * count == len(seen)
    rotated = [p for p in tmp_path.glob("audit.log.*") if not p.name.endswith(".lock")]
    assert len(rotated) > 10
    for tag in range(writers):  # each writer's lines, every one of them
        mine = [r["n"] for r in records if r["w"] == tag]
        assert sorted(mine) == list(range(count))


def test_body_digest_streams(tmp_path: Path) -> None:
    body = os.urandom(300_000)
    digest = BodyDigest()
    for start in range(0, len(body), 7_777):
        digest.update(body[start : start + 7_777])
    fields = json.loads("{" + digest.fields()[1:] + "}")
    assert fields == {"body_sha256": hashlib.sha256(body).hexdigest(), "body_size": len(body)}
    full = BodyDigest(FULL_BODY_MAX)
    full.update(body[:1000])
    full.update(body[1000:])
    kept = json.loads("{" + full.fields()[1:] + "}")
    import base64

    assert base64.b64decode(kept["body_b64"]) == body[:FULL_BODY_MAX]
    assert kept["body_truncated"] is True


def test_hash_is_off_by_default(tmp_path: Path) -> None:
    assert AuditLog(AuditConfig(), tmp_path).body_digest() is None
    assert AuditLog(AuditConfig(bodies="hash"), tmp_path).body_digest() is not None
    assert AuditLog(AuditConfig(bodies="hash", requests="none"), tmp_path).body_digest() is None


def _exchange(path: str) -> Exchange:
    ex = Exchange("POST", path.encode(), "1.1", [], "127.0.0.1", path=path)
    ex.stage = "authorise"
    return ex


def test_request_lines_parse_and_refused_mode_filters(tmp_path: Path) -> None:
    audit = AuditLog(AuditConfig(fsync="always", requests="refused"), tmp_path)
    ex = _exchange('/odd "path"\\with\u00e9')
    audit.request(ex, 403, refused=True, reason="forbidden_role")
    allowed = _exchange("/fine")
    allowed.stage = ""
    audit.request(allowed, 200, refused=False, bytes_out=10)
    audit.close()
    (line,) = lines_of(tmp_path)
    record = json.loads(line)
    assert record["decision"] == "refused" and record["reason"] == "forbidden_role"
    assert record["stage"] == "authorise" and record["status"] == 403
    assert record["path"] == '/odd "path"\\with\u00e9'


def test_request_lines_carry_the_tokens_a_budget_counted(tmp_path: Path) -> None:
    meter = TokenMeter(strip=False)
    meter.begin(b"application/json")
    body = b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
    assert meter.feed(body) == body
    meter.end()
    audit = AuditLog(AuditConfig(fsync="always"), tmp_path)
    ex = _exchange("/v1/chat/completions")
    ex.stage = ""
    ex.response_observer = meter
    audit.request(ex, 200, refused=False, bytes_out=len(body))
    audit.request(ex, 200, refused=False)  # written at the head (always): not counted yet
    audit.close()
    first, second = (json.loads(x) for x in lines_of(tmp_path))
    assert first["tokens"] == 12 and first["bytes"] == len(body)
    assert "tokens" not in second and "bytes" not in second


def test_syslog_sink_sends_one_datagram_per_line(tmp_path: Path) -> None:
    address = tmp_path / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(address))
    server.settimeout(5)
    try:
        audit = AuditLog(AuditConfig(sink="syslog", syslog_address=str(address)), tmp_path)
        audit.event("user_disabled", {"user": "bob"})
        audit.event("user_enabled", {"user": "bob"})
        audit.flush()
        got = [server.recv(65536) for _ in range(2)]
        audit.close()
    finally:
        server.close()
    for data, event in zip(got, ("user_disabled", "user_enabled"), strict=True):
        prefix, _, payload = data.partition(b": ")
        assert prefix.startswith(b"<86>garrison-audit[")
        assert json.loads(payload)["event"] == event


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"fsync": "sometimes"}, "audit.fsync: Input should be 'never', 'interval' or 'always'"),
        ({"sink": "stdout", "fsync": "always"}, 'fsync = "always" needs sink = "file"'),
        ({"sink": "syslog", "path": "/tmp/x"}, 'path is for sink = "file"'),
        ({"max_size": "1KiB"}, "audit.max_size: at least 4KiB"),
        ({"bodies": "some"}, "audit.bodies: Input should be 'none', 'hash' or 'full'"),
        ({"keep": 0}, "audit.keep: Input should be greater than or equal to 1"),
        ({"rotate": "daily"}, "audit.rotate: unknown option"),
    ],
)
def test_config_errors_are_clear(section: dict[str, object], expected: str) -> None:
    data = {
        "upstream": [{"name": "a", "url": "http://127.0.0.1:1"}],
        "route": [{"path": "/", "upstream": "a"}],
        "audit": section,
    }
    with pytest.raises(ConfigError) as caught:
        validate(data)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems

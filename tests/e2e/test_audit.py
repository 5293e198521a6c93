"""The audit log end to end (issue 7): a real `garrison up`, the real CLI and real clients.

- secrets fed through login, token, key create/rotate, cert issue, headers, query and body
  appear nowhere in the audit files, while every decision does;
- `bodies = "hash"` records the SHA-256 of an uploaded body; `"full"` warns at start;
- size rotation under load with two workers keeps every line, and every line parses;
- `kill -9` under load: every complete line parses, a torn tail is cut by the next writer,
  and with `fsync = "always"` every answer a client received has its line;
- configuration mistakes are one clear line each, never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from garrison.observe.audit_sink import FileSink
from tests.e2e.fixtures_core import OPEN, client, gateway_config, route_toml, toml_table
from tests.e2e.fixtures_stream import https, wait_until
from tests.e2e.test_auth import cli
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

ALICE_PASSWORD = "SECRETpw-alice-0001"
WRONG_PASSWORD = "SECRETpw-wrong-0002"
TYPED_AS_USER = "SECRETpw-typed-into-user-0003"
P12_PASSWORD = "SECRETp12-pass-0004"
QUERY_SECRET = "SECRETquery-0005"
BODY_SECRET = b"SECRETbody-prompt-0006"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
LOAD_THREADS = 4
MAX_REQUESTS_PER_THREAD = 400


def config(upstream_url: str, audit: str, extra_routes: str = "") -> str:
    return gateway_config(
        upstream_url,
        toml_table("[audit]", audit),
        route_toml("/v1/", "app", 'auth = ["api_key", "jwt"]', 'token_alias = "/v1/token"'),
        route_toml("/limited/", "app", OPEN, 'rate = ["1/minute"]'),
        route_toml("/public/", "app", OPEN),
        extra_routes,
        route_toml("/"),
        server='access_log = "off"',
    )


def start(tmp: Path, text: str, *args: str) -> GatewayProcess:
    return GatewayProcess(list(args), tmp / "data", config_text=text)


def garrison(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m garrison ARGS`, as an operator would run it; it may fail."""
    return subprocess.run(
        [sys.executable, "-m", "garrison", *args], capture_output=True, text=True, timeout=60
    )


def audit_files(data_dir: Path) -> list[Path]:
    """audit.log and its rotated siblings, oldest first."""
    files = [p for p in data_dir.glob("audit.log*") if not p.name.endswith(".lock")]
    return sorted(files, key=lambda p: -int(p.suffix[1:]) if p.name != "audit.log" else 0)


def audit_records(data_dir: Path, *, allow_torn_tail: bool = False) -> list[dict[str, object]]:
    """Every audit line parsed (strictly: a line that does not parse fails the test). With
    `allow_torn_tail`, a file may end in one unterminated fragment (a kill inside write())."""
    records = []
    for path in audit_files(data_dir):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        assert not tail or allow_torn_tail, f"{path} ends inside a line: {tail[-200:]!r}"
        for line in lines:
            records.append(json.loads(line))
    return records


def events(data_dir: Path, name: str) -> list[dict[str, object]]:
    return [r for r in audit_records(data_dir) if r["event"] == name]


def login(c: httpx.Client, gw: GatewayProcess, user: str, password: str) -> int:
    form = c.get("/.garrison/login", params={"next": "/"})
    csrf = CSRF_RE.search(form.text)
    assert csrf, form.text
    resp = c.post(
        "/.garrison/login",
        data={"username": user, "password": password, "csrf": csrf.group(1), "next": "/"},
        headers={"Origin": gw.url},
    )
    return resp.status_code


def test_decisions_are_recorded_and_no_secret_is(tmp_path: Path, upstream: FakeUpstream) -> None:
    gw = start(tmp_path, config(upstream.url, 'bodies = "hash"\nfsync = "interval"'))
    data = gw.data_dir
    secrets: list[str] = [
        ALICE_PASSWORD,
        WRONG_PASSWORD,
        TYPED_AS_USER,
        P12_PASSWORD,
        QUERY_SECRET,
        BODY_SECRET.decode(),
    ]
    body = os.urandom(3 * 1024 * 1024) + BODY_SECRET
    try:
        cli(data, "user", "add", "alice", "--role", "staff", "--password-stdin",
            stdin=ALICE_PASSWORD + "\n")  # fmt: skip
        key = cli(data, "key", "create", "bot", "--scope", "chat", "--owner", "alice").strip()
        (created,) = events(data, "key_created")
        rotated = cli(data, "key", "rotate", str(created["key_id"]), "--grace", "1h").strip()
        p12_file = tmp_path / "p12.txt"
        p12_file.write_text(P12_PASSWORD + "\n")
        out = tmp_path / "certs"
        cli(data, "cert", "issue", "carol", "--role", "ops", "--out", str(out),
            "--p12-password-file", str(p12_file))  # fmt: skip
        secrets += [key, rotated, (out / "carol.key").read_text().splitlines()[1]]

        with client(gw) as c:
            assert login(c, gw, "alice", WRONG_PASSWORD) == 401
            assert login(c, gw, TYPED_AS_USER, ALICE_PASSWORD) == 401
            assert login(c, gw, "alice", ALICE_PASSWORD) == 303
            session = c.cookies.get("__Host-garrison")
            assert session
            secrets.append(session)
            assert c.get("/page").status_code == 200
            token = c.post(
                "/.garrison/token",
                data={"grant_type": "password", "username": "alice", "password": ALICE_PASSWORD},
            ).json()["access_token"]
            client_token = c.post(
                "/v1/token", data={"grant_type": "client_credentials", "client_secret": rotated}
            ).json()["access_token"]
            secrets += [token, client_token]
            logout = c.post("/.garrison/logout", headers={"Origin": gw.url})
            assert logout.status_code == 303
        with client(gw) as c:
            bearer = {"Authorization": f"Bearer {rotated}"}
            assert c.get("/v1/models", headers=bearer).status_code == 200
            assert c.get("/v1/jwt", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            bad = c.get("/v1/x", headers={"Authorization": "Bearer gk_SECRETbad0007_x"})
            assert bad.status_code == 401
            assert c.get(f"/chat?token={QUERY_SECRET}").status_code == 401
            assert c.get("/limited/a").status_code == 200
            assert c.get("/limited/b").status_code == 429
            upload = c.post("/public/upload", content=body)
            assert upload.status_code == 200 and upload.json()["body_bytes"] == len(body)
        secrets.append("gk_SECRETbad0007_x")
    finally:
        assert gw.stop() == 0  # a clean stop flushes the audit buffer

    text = "".join(p.read_text() for p in audit_files(data))
    for secret in secrets:
        assert secret not in text, f"a secret reached the audit log: {secret[:12]}..."
    assert "PRIVATE KEY" not in text
    for marker in ("secret", "authorization", "cookie", "bearer"):
        assert marker not in text.lower(), marker

    records = audit_records(data)
    by_event: dict[str, list[dict[str, object]]] = {}
    for record in records:
        by_event.setdefault(str(record["event"]), []).append(record)
    (added,) = by_event["user_added"]
    assert added["user"] == "alice" and str(added["by"]).startswith("cli:")
    assert by_event["key_rotated"][0]["key_id"] == created["key_id"]
    (issued,) = by_event["cert_issued"]
    assert issued["name"] == "carol" and issued["roles"] == ["ops"]
    failed = by_event["login_failed"]
    assert [f["user"] for f in failed] == ["alice", None]  # a typed non-account is not kept
    assert all(f["client_ip"] == "127.0.0.1" for f in failed)
    assert by_event["login_ok"][0]["user"] == "alice"
    grants = {(t["grant"], t["identity"]) for t in by_event["token_issued"]}
    assert grants == {("password", "alice"), ("client_credentials", "alice")}
    assert by_event["logout"][0]["user"] == "alice"

    requests = by_event["request"]

    def one(path: str) -> dict[str, object]:
        found = [r for r in requests if r["path"] == path]
        assert len(found) == 1, (path, found)
        return found[0]

    models = one("/v1/models")
    assert models["decision"] == "allowed" and models["status"] == 200
    assert models["identity"] == "alice" and models["auth"] == "api_key"
    assert models["key_id"] == created["key_id"] and models["route"] == "/v1/"
    assert isinstance(models["bytes"], int) and models["bytes"] > 0
    assert one("/v1/jwt")["auth"] == "jwt"
    assert one("/page")["auth"] == "session"
    refused = one("/v1/x")
    assert (refused["decision"], refused["status"], refused["stage"], refused["reason"]) == (
        "refused",
        401,
        "authorise",
        "invalid_token",
    )
    anonymous = one("/chat")
    assert (anonymous["reason"], anonymous["status"]) == ("authentication_required", 401)
    limited = one("/limited/b")
    assert (limited["stage"], limited["status"]) == ("limits", 429)
    assert limited["reason"] == "rate_limited (rate 1/minute)"
    uploaded = one("/public/upload")
    assert uploaded["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert uploaded["body_size"] == len(body)
    assert all("body_sha256" not in r for r in requests if r["method"] == "GET")


def test_full_bodies_warn_at_start_and_are_kept(tmp_path: Path, upstream: FakeUpstream) -> None:
    gw = start(tmp_path, config(upstream.url, 'bodies = "full"\nfsync = "always"'))
    try:
        assert any('WARNING: [audit] bodies = "full"' in line for line in gw.lines), gw.output()
        with client(gw) as c:
            assert c.post("/public/p", content=b'{"prompt":"hello"}').status_code == 200
        (line,) = [r for r in events(gw.data_dir, "request") if r["path"] == "/public/p"]
        assert base64.b64decode(str(line["body_b64"])) == b'{"prompt":"hello"}'
        assert line["body_truncated"] is False
    finally:
        gw.stop()


class Load:
    """Threads sending requests on keep-alive connections until stopped (bounded)."""

    def __init__(self, gw: GatewayProcess, prefix: str) -> None:
        self.gw = gw
        self.prefix = prefix
        self.answered: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(LOAD_THREADS)
        ]

    def _run(self, n: int) -> None:
        conn: http.client.HTTPSConnection | None = None
        for i in range(MAX_REQUESTS_PER_THREAD):
            if self.stop.is_set():
                break
            path = f"{self.prefix}t{n}-{i}"
            try:
                if conn is None:
                    conn = https(self.gw, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
                if self.stop.is_set() or self.gw.proc.poll() is not None:
                    break
                continue
            self.answered.append(path)  # the client saw the whole answer
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def test_rotation_under_load_keeps_every_line(tmp_path: Path, upstream: FakeUpstream) -> None:
    audit = 'max_size = "16KiB"\nkeep = 1000\nfsync = "never"'
    gw = start(tmp_path, config(upstream.url, audit), "--workers", "2")
    try:
        with Load(gw, "/public/r/") as load:
            for thread in load.threads:
                thread.join(120)
        answered = list(load.answered)
        assert len(answered) == LOAD_THREADS * MAX_REQUESTS_PER_THREAD
    finally:
        assert gw.stop() == 0
    records = audit_records(gw.data_dir)  # every line of every file parses
    logged = [r["path"] for r in records if r["event"] == "request"]
    assert sorted(logged) == sorted(answered)  # each exactly once
    assert len(audit_files(gw.data_dir)) > 5  # it did rotate, several times
    for path in audit_files(gw.data_dir)[:-1]:
        assert path.stat().st_size >= 16 * 1024


def dead(proc: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaped yet (a container's init may not): it writes nothing."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_kill_9_under_load(tmp_path: Path, upstream: FakeUpstream, fsync: str) -> None:
    audit = f'max_size = "64KiB"\nkeep = 1000\nfsync = "{fsync}"'
    gw = start(tmp_path, config(upstream.url, audit, route_toml("/closed/")), "--workers", "2")
    try:
        processes = [psutil.Process(gw.proc.pid), *psutil.Process(gw.proc.pid).children()]
        with Load(gw, "/public/k/") as load, Load(gw, "/closed/k/") as refused:
            assert wait_until(lambda: len(load.answered) >= 300, timeout=120)
            for proc in processes:  # the supervisor and each worker, by pid
                proc.send_signal(signal.SIGKILL)
            gw.proc.wait(timeout=30)
        assert wait_until(lambda: all(dead(p) for p in processes), timeout=30)
    finally:
        gw.stop()
    answered = set(load.answered) | set(refused.answered)
    assert any(p.startswith("/closed/") for p in answered)
    records = audit_records(gw.data_dir, allow_torn_tail=True)  # complete lines all parse
    logged = {r["path"] for r in records if r["event"] == "request"}
    if fsync == "always":
        missing = answered - logged
        assert not missing, f"{len(missing)} answered requests have no audit line"
    # The next writer (a worker, the CLI) cuts a torn tail before it appends.
    sink = FileSink(gw.data_dir / "audit.log", 64 * 1024, 1000)
    sink.write(b'{"event":"after_restart"}\n')
    sink.close()
    assert audit_records(gw.data_dir)[-1] == {"event": "after_restart"}


def test_config_mistakes_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[audit]\nfsync = "sometimes"\nsink = "stdout"\nmax_size = "1KiB"\n'
        '[[upstream]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'
        '[[route]]\npath = "/"\nupstream = "a"\n'
    )
    result = garrison("check", "--config", str(bad))
    assert result.returncode == 1
    assert "audit.fsync: Input should be 'never', 'interval' or 'always'" in result.stderr
    assert "audit.max_size: at least 4KiB" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout

    full = tmp_path / "full.toml"
    full.write_text(bad.read_text().replace('fsync = "sometimes"', 'bodies = "full"')
                    .replace('max_size = "1KiB"', ""))  # fmt: skip
    result = garrison("check", "--config", str(full))
    assert result.returncode == 0, result.stderr
    assert 'WARNING: [audit] bodies = "full"' in result.stderr

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    unusable = tmp_path / "unusable.toml"
    unusable.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[audit]\npath = "{blocker}/audit.log"\n'
        '[[upstream]]\nname = "a"\nurl = "http://127.0.0.1:9"\n'
        '[[route]]\npath = "/"\nupstream = "a"\n'
    )
    result = garrison("up", "--config", str(unusable), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert f"cannot open the audit log {blocker}/audit.log" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_reload_moves_the_audit_log_and_refuses_an_unusable_one(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    gw = start(tmp_path, config(upstream.url, ""))
    moved = tmp_path / "moved" / "audit.log"
    try:
        with client(gw) as c:
            assert c.get("/public/before").status_code == 200
            gw.config_path.write_text(config(upstream.url, f'path = "{moved}"\nfsync = "always"'))
            gw.signal(signal.SIGHUP)
            gw.wait_for_line("configuration reloaded")
            assert c.get("/public/after").status_code == 200
            assert [r["path"] for r in audit_records(moved.parent) if "path" in r] == [
                "/public/after"
            ]  # at once: fsync = "always" now
            blocker = tmp_path / "file"
            blocker.write_text("")
            gw.config_path.write_text(config(upstream.url, f'path = "{blocker}/audit.log"'))
            gw.signal(signal.SIGHUP)
            gw.wait_for_line("reload refused, cannot open the audit log")
            assert c.get("/public/still").status_code == 200
    finally:
        assert gw.stop() == 0
    old = [r["path"] for r in audit_records(gw.data_dir) if r["event"] == "request"]
    assert old == ["/public/before"]
    assert [r["path"] for r in audit_records(moved.parent)] == ["/public/after", "/public/still"]

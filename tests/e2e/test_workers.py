"""`--workers 2`: one port (also port 0) served by both workers; SIGHUP reaches them; SIGTERM
stops them all with exit 0; a killed worker is restarted; a key revoked with the CLI is refused
by every worker within a bounded wait."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import create_key, revoke_key
from tests.e2e.fixtures_stream import (
    count_lines,
    fetch,
    https,
    running_gateway,
    tls_socket,
    wait_until,
    write_config,
)
from tests.support.gateway import CA_RE, LISTEN_RE, GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

WORKERS = ("--workers", "2")
ALT_NAME = "alt.garrison.test"
HELD_CONNECTIONS = 24  # the chance that the kernel puts them all on one worker is 2**-23
REVOKE_WAIT_S = 2.0  # workers poll the store's change feed every 0.25 s
PROBE = "/revoke-probe"


def workers(gw: GatewayProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(gw.proc.pid).children() if p.is_running()]


def listening(proc: psutil.Process, port: int) -> bool:
    try:
        conns = proc.net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def established(proc: psutil.Process, port: int) -> int:
    conns = proc.net_connections(kind="tcp")
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def keyed_round(gw: GatewayProcess, key: str) -> tuple[list[int], set[int | None]]:
    """HELD_CONNECTIONS fresh connections held open at once, one keyed request on each.

    Returns the statuses and the pids of the workers that accepted the connections (read from
    the workers' sockets once every TLS handshake is done, so each connection has an owner)."""
    conns: list[http.client.HTTPSConnection] = []
    try:
        for _ in range(HELD_CONNECTIONS):
            conns.append(https(gw))
            conns[-1].connect()
        owner: dict[int, int] = {}
        for kid in workers(gw):
            for c in kid.net_connections(kind="tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == gw.port and c.raddr:
                    owner[c.raddr.port] = kid.pid
        pids = {owner.get(conn.sock.getsockname()[1]) for conn in conns}
        statuses = []
        for conn in conns:
            conn.request("GET", PROBE, headers={"X-API-Key": key})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    finally:
        for conn in conns:
            conn.close()
    return statuses, pids


@contextlib.contextmanager
def protected_gateway(
    tmp_path: Path, upstream: FakeUpstream, key_name: str
) -> Iterator[tuple[GatewayProcess, str]]:
    """`garrison up --upstream URL --workers 2` (route `/` needs a credential by default) with
    an API key created by the CLI in its data dir before the start."""
    data = tmp_path / "data"
    key = create_key(data, key_name)
    gw = GatewayProcess(["--upstream", upstream.url, *WORKERS], data)
    try:
        yield gw, key
    finally:
        gw.stop()


def two_live_workers(gw: GatewayProcess) -> bool:
    kids = workers(gw)
    return len(kids) == 2 and all(listening(k, gw.port) for k in kids)


def hsts_of_new_connections(gw: GatewayProcess, n: int = 20) -> set[str | None]:
    return {
        fetch(gw, "/.garrison/healthz").headers.get("strict-transport-security") for _ in range(n)
    }


def test_two_workers_share_one_port_and_both_serve(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        assert gw.port != 0  # asked for port 0; one real port was announced
        assert any("ready (2 workers)" in line for line in gw.lines)
        kids = workers(gw)
        assert len(kids) == 2
        for kid in kids:
            assert listening(kid, gw.port), f"worker {kid.pid} is not listening on {gw.port}"
        assert not listening(psutil.Process(gw.proc.pid), gw.port), "the supervisor accepts too"

        # Many new connections, held open so that we can see which worker has each.
        conns: list[http.client.HTTPSConnection] = []
        try:
            for i in range(HELD_CONNECTIONS):
                conn = https(gw)
                conns.append(conn)
                conn.request("GET", f"/.garrison/healthz?n={i}")
                resp = conn.getresponse()
                assert resp.status == 200
                assert resp.read()
            per_worker = {kid.pid: established(kid, gw.port) for kid in kids}
        finally:
            for conn in conns:
                conn.close()
        assert sum(per_worker.values()) == HELD_CONNECTIONS, per_worker
        assert all(n > 0 for n in per_worker.values()), f"one worker took nothing: {per_worker}"
        assert gw.stop() == 0


def test_sighup_reaches_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        assert hsts_of_new_connections(gw) == {"max-age=31536000"}
        write_config(gw, upstream.url, server='hsts_max_age = "2h"')
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: count_lines(gw, "configuration reloaded") == 2, timeout=10), (
            gw.output()
        )
        assert hsts_of_new_connections(gw, 30) == {"max-age=7200"}
        assert len(workers(gw)) == 2
        assert gw.stop() == 0


def test_sighup_new_certificate_names_reach_every_worker(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """One worker reissues the certificate; the other must load it too, even when the new one
    has the same expiry second as the old (a reload right after start)."""
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        write_config(gw, upstream.url, server=f'hostnames = ["{ALT_NAME}"]')
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: count_lines(gw, "configuration reloaded") == 2, timeout=10)
        failures = 0
        for _ in range(HELD_CONNECTIONS):
            try:
                tls_socket(gw, server_hostname=ALT_NAME).close()
            except ssl.SSLCertVerificationError:
                failures += 1
        assert failures == 0, f"{failures}/{HELD_CONNECTIONS} handshakes got the old certificate"
        assert gw.stop() == 0


def test_sigterm_stops_all_workers_and_the_supervisor_exits_zero(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        kids = workers(gw)
        assert len(kids) == 2
        assert fetch(gw, "/x").status == 200
        gw.signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"workers still running: {[p.pid for p in alive]}"


def test_a_killed_worker_is_restarted(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        before = {p.pid for p in workers(gw)}
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: two_live_workers(gw) and victim not in {p.pid for p in workers(gw)},
            timeout=15,
        ), gw.output()
        after = {p.pid for p in workers(gw)}
        assert len(after - before) == 1 and (before - after) == {victim}
        assert any("exited with -9; restarting" in line for line in gw.lines)
        for _ in range(20):
            assert fetch(gw, "/.garrison/healthz").status == 200
        assert gw.stop() == 0


def test_a_restarted_worker_serves_the_reloaded_config(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A worker restarted after a reload must not come back with the config from start-up."""
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        write_config(gw, upstream.url, server='hsts_max_age = "2h"')
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: count_lines(gw, "configuration reloaded") == 2, timeout=10)
        victim = min(p.pid for p in workers(gw))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: two_live_workers(gw) and victim not in {p.pid for p in workers(gw)},
            timeout=15,
        ), gw.output()
        assert hsts_of_new_connections(gw, 30) == {"max-age=7200"}
        assert gw.stop() == 0


def test_sigterm_right_after_a_worker_died_still_exits(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The supervisor must not restart a worker once it was told to stop."""
    with running_gateway(tmp_path, upstream.url, args=WORKERS) as gw:
        kids = workers(gw)
        os.kill(kids[0].pid, signal.SIGKILL)
        assert wait_until(lambda: any("restarting" in line for line in gw.lines), timeout=10)
        gw.signal(signal.SIGTERM)  # during the supervisor's back-off before the restart
        try:
            code = gw.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            leftovers = psutil.Process(gw.proc.pid).children()
            for proc in leftovers:  # the gateway's own workers: do not leave them behind
                proc.kill()
            pytest.fail(
                f"supervisor hangs after SIGTERM; workers left: {[p.pid for p in leftovers]}"
            )
        assert code == 0
        assert not [p for p in kids[1:] if p.is_running() and p.status() != "zombie"]


def test_a_worker_that_dies_during_start_up_is_replaced(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A worker killed before it reported ready: the supervisor must not wait for it forever
    (it did, deaf even to SIGTERM); it starts another and becomes ready, and serves the
    protected route to a key made with the CLI before the start."""
    key = create_key(tmp_path / "data", "startup")
    cmd = [sys.executable, "-m", "garrison", "up", "--data-dir", str(tmp_path / "data")]
    cmd += ["--upstream", upstream.url, "--listen", "127.0.0.1:0", *WORKERS]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    supervisor = psutil.Process(proc.pid)
    try:
        victim = 0
        deadline = time.monotonic() + 30
        while not victim and time.monotonic() < deadline and proc.poll() is None:
            kids = supervisor.children()
            if kids:
                victim = kids[0].pid
                os.kill(victim, signal.SIGKILL)
            else:
                time.sleep(0.001)
        assert victim, "no worker appeared"
        assert wait_until(lambda: any("ready (2 workers)" in ln for ln in lines), timeout=20), (
            "\n".join(lines)
        )
        port = next(int(m.group(2)) for ln in lines if (m := LISTEN_RE.search(ln)))
        ca = next(m.group(1) for ln in lines if (m := CA_RE.search(ln)))
        kids = supervisor.children()
        assert len(kids) == 2 and victim not in {k.pid for k in kids}
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=ssl.create_default_context(cafile=ca), timeout=10
        )
        try:
            conn.request("GET", "/.garrison/healthz")
            health = conn.getresponse()
            health.read()
            assert health.status == 200
            conn.request("GET", "/x", headers={"Authorization": f"Bearer {key}"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # stop what we started: the supervisor and its workers
            for kid in supervisor.children():
                kid.kill()
            proc.kill()
            proc.wait(timeout=10)


def test_the_upstream_route_needs_a_key_on_every_worker(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """`--upstream` protects `/` by default: no key is refused, the CLI-made key passes on both
    workers and reaches the app as the key's identity, without the key itself."""
    with protected_gateway(tmp_path, upstream, "workers-pass") as (gw, key):
        assert wait_until(lambda: two_live_workers(gw), timeout=15), gw.output()
        anonymous = fetch(gw, PROBE)
        assert anonymous.status == 401, anonymous.body
        before = upstream.count(PROBE)
        statuses, pids = keyed_round(gw, key)
        assert statuses == [200] * HELD_CONNECTIONS
        assert pids == {p.pid for p in workers(gw)}, pids
        seen = upstream.requests[-HELD_CONNECTIONS:]
        assert upstream.count(PROBE) == before + HELD_CONNECTIONS
        assert {r.headers.get("x-forwarded-user") for r in seen} == {"key:workers-pass"}
        assert not any("x-api-key" in r.headers or "authorization" in r.headers for r in seen)
        assert gw.stop() == 0


def test_a_revoked_key_is_refused_by_every_worker(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Both workers have the key cached; `garrison key revoke` must reach both through the
    store's change feed: within REVOKE_WAIT_S a whole round of fresh connections, spread over
    both workers, is refused and none of it reaches the upstream."""
    with protected_gateway(tmp_path, upstream, "workers-revoke") as (gw, key):
        assert wait_until(lambda: two_live_workers(gw), timeout=15), gw.output()
        kids = {p.pid for p in workers(gw)}
        before = upstream.count(PROBE)
        statuses, pids = keyed_round(gw, key)  # fills both workers' key caches
        assert statuses == [200] * HELD_CONNECTIONS and pids == kids, (statuses, pids)
        assert upstream.count(PROBE) == before + HELD_CONNECTIONS

        revoke_key(gw.data_dir, key)
        deadline = time.monotonic() + REVOKE_WAIT_S
        rounds: list[tuple[list[int], set[int | None], int]] = []
        while True:
            before = upstream.count(PROBE)
            statuses, pids = keyed_round(gw, key)
            rounds.append((statuses, pids, upstream.count(PROBE) - before))
            if (set(statuses) == {401} and pids == kids) or time.monotonic() >= deadline:
                break
        statuses, pids, reached = rounds[-1]
        assert set(statuses) == {401}, f"still accepted after {REVOKE_WAIT_S} s: {rounds}"
        assert pids == kids, pids
        assert reached == 0, rounds
        refused = fetch(gw, PROBE, headers={"Authorization": f"Bearer {key}"})
        assert refused.status == 401
        body = refused.json()
        assert isinstance(body, dict) and body["error"]["code"] == "invalid_token", body
        assert gw.stop() == 0

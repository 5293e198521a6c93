"""`--workers 2`: one port (also port 0) served by both workers; SIGHUP reaches them; SIGTERM
stops them all with exit 0; a killed worker is restarted."""

from __future__ import annotations

import http.client
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

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
    (it did, deaf even to SIGTERM); it starts another and becomes ready."""
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

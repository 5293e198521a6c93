"""Start the real `garrison` command as a subprocess on ephemeral ports and talk to it."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTEN_RE = re.compile(r"listening on https://(\S+):(\d+)")
REDIRECT_RE = re.compile(r"redirect listener on http://(\S+):(\d+)")
CA_RE = re.compile(r"CA certificate \(trust this\): (\S+)")
ADMIN_PASSWORD = "test-admin-password-0123456789"
"""The first admin's password in test gateways (given by env, as an operator would)."""


class GatewayProcess:
    """A running `garrison up`; lines of its output are kept in `lines`."""

    def __init__(
        self,
        args: list[str],
        data_dir: Path,
        *,
        config_text: str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "garrison", "up", "--data-dir", str(data_dir)]
        if config_text is not None:
            self.config_path = data_dir.parent / f"{data_dir.name}.toml"
            self.config_path.write_text(config_text)
            cmd += ["--config", str(self.config_path)]
        explicit_listen = any(a.startswith("--listen") for a in args)
        if not explicit_listen and (config_text is None or "listen" not in config_text):
            cmd += ["--listen", "127.0.0.1:0"]
        cmd += args
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GARRISON_ADMIN_PASSWORD": ADMIN_PASSWORD,
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.host = ""
        self.port = 0
        self.http_port: int | None = None
        self.ca_path: Path | None = None
        self._wait_ready(startup_timeout)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError("garrison exited before it was ready:\n" + self.output())
            if m := CA_RE.search(line):
                self.ca_path = Path(m.group(1))
            if m := REDIRECT_RE.search(line):
                self.http_port = int(m.group(2))
            if m := LISTEN_RE.search(line):
                self.host, self.port = m.group(1), int(m.group(2))
            if "ready" in line and self.port:
                return
        self.stop()
        raise RuntimeError("garrison did not become ready in time:\n" + self.output())

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until an output line matches `pattern` (regex); return it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if regex.search(line):
                    return line
            seen = len(self.lines)
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; kill if it does not exit. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def client_context(gw: GatewayProcess) -> ssl.SSLContext:
    """Trusts only the gateway's own CA; hostname checks stay on."""
    assert gw.ca_path is not None and gw.ca_path.is_file(), gw.output()
    return ssl.create_default_context(cafile=str(gw.ca_path))


def tls_socket(
    gw: GatewayProcess,
    server_hostname: str = "localhost",
    host: str = "127.0.0.1",
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """A raw TLS socket to the gateway, verified against its CA (for byte-exact requests)."""
    raw = socket.create_connection((host, gw.port), timeout=timeout)
    try:
        return client_context(gw).wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise

"""Real peers for the end-to-end tests: a Gradio app, the demo app, the gateway, Chromium.

Everything is session-scoped: Gradio takes seconds to import and Chromium to start, and the
peer modules share them. Each fixture stops only the process it started, in its teardown.
"""

from __future__ import annotations

import base64
import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
APPS = Path(__file__).resolve().parent / "apps"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_TIMEOUT_S = 90.0
LOGIN_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """A recording fake upstream, one per test module (tests assert on what reached it)."""
    with FakeUpstream() as up:
        yield up


def missing(reason: str) -> None:
    """A missing tool fails loudly in CI and skips (with the reason) on a dev machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A port free right now, for peers (Gradio) that cannot bind port 0 and report it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Peer:
    """A subprocess that announces readiness with one line of output."""

    def __init__(self, cmd: list[str], ready: re.Pattern[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.match = self._wait(ready)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def _wait(self, ready: re.Pattern[str]) -> re.Match[str] | None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                return None
            if m := ready.search(line):
                return m
        return None

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class GradioApp(Peer):
    """tests/e2e/apps/gradio_app.py on a free port, optionally with a root_path."""

    def __init__(self, root_path: str | None) -> None:
        self.port = free_port()
        cmd = [sys.executable, str(APPS / "gradio_app.py"), "--port", str(self.port)]
        if root_path:
            cmd += ["--root-path", root_path]
        env = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        super().__init__(cmd, re.compile(r"gradio app ready on \d+"), env)
        self.url = f"http://127.0.0.1:{self.port}"


def _start_gradio(root_path: str | None) -> GradioApp:
    try:
        import gradio  # noqa: F401  (only to learn whether it is installed)
    except ImportError:
        missing("the gradio package is not installed in this environment")
    for _ in range(3):  # the free port may be taken by someone else before Gradio binds it
        app = GradioApp(root_path)
        if app.match:
            return app
        app.stop()
        out = app.output().lower()
        if "empty port" not in out and "address already in use" not in out:
            break
    raise RuntimeError(f"gradio app did not start:\n{app.output()}")


@pytest.fixture(scope="session")
def gradio_root() -> Iterator[GradioApp]:
    """Gradio served at the gateway root: needs no root_path."""
    app = _start_gradio(None)
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def gradio_sub() -> Iterator[GradioApp]:
    """Gradio served under /app/: Gradio ignores X-Forwarded-Prefix, so it needs root_path."""
    app = _start_gradio("/app")
    try:
        yield app
    finally:
        app.stop()


class DemoApp(Peer):
    """`python -m garrison.demo` on an ephemeral port, for routes the gateway does not start."""

    def __init__(self) -> None:
        cmd = [sys.executable, "-m", "garrison.demo", "--host", "127.0.0.1", "--port", "0"]
        super().__init__(cmd, re.compile(r"^demo app listening on (http://\S+)$"), {})
        if self.match is None:
            self.stop()
            raise RuntimeError(f"demo app did not start:\n{self.output()}")
        self.url = self.match.group(1)


@pytest.fixture(scope="session")
def demo_app() -> Iterator[DemoApp]:
    app = DemoApp()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def routed_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    gradio_root: GradioApp,
    gradio_sub: GradioApp,
    demo_app: DemoApp,
) -> Iterator[GatewayProcess]:
    """One gateway, three routes: `/` to the root Gradio, `/app/` to the sub-path Gradio and
    `/demo/` to the demo app, both with the prefix stripped."""
    config = f"""
[server]
listen = "127.0.0.1:0"

[[upstream]]
name = "root"
url = "{gradio_root.url}"

[[upstream]]
name = "ui"
url = "{gradio_sub.url}"

[[upstream]]
name = "demo"
url = "{demo_app.url}"

[[route]]
path = "/app/"
auth = ["none"]
upstream = "ui"
strip_prefix = true

[[route]]
path = "/demo/"
auth = ["none"]
upstream = "demo"
strip_prefix = true

[[route]]
path = "/"
auth = ["none"]
upstream = "root"
"""
    gw = GatewayProcess([], tmp_path_factory.mktemp("gw-routed") / "data", config_text=config)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def demo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """`garrison up --demo`: the gateway starts the bundled demo app itself."""
    gw = GatewayProcess(["--demo"], tmp_path_factory.mktemp("gw-demo") / "data")
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def demo_key(demo_gateway: GatewayProcess) -> str:
    """An API key for `demo_gateway`, made with the CLI as an operator would."""
    return create_key(demo_gateway.data_dir, "demo-peers", owner="admin")


def garrison_cli(*args: str, data_dir: Path, stdin: str | None = None) -> str:
    """Run `python -m garrison ARGS --data-dir DIR`; it must succeed. Returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "garrison", *args, "--data-dir", str(data_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"garrison {' '.join(args)}: {done.stderr}"
    return done.stdout


def create_key(
    data_dir: Path, name: str, scopes: tuple[str, ...] = ("chat",), owner: str | None = None
) -> str:
    """`garrison key create`: the key, as printed alone on stdout (`gk_<id>_<secret>`)."""
    args = ["key", "create", name, *(a for s in scopes for a in ("--scope", s))]
    if owner is not None:
        args += ["--owner", owner]
    key = garrison_cli(*args, data_dir=data_dir).strip()
    assert re.fullmatch(r"gk_[A-Za-z0-9]{12}_\S+", key), key
    return key


def revoke_key(data_dir: Path, key: str) -> None:
    """`garrison key revoke ID`, ID being the 12 characters after `gk_`."""
    garrison_cli("key", "revoke", key[3:15], data_dir=data_dir)


def log_in(page: Any, gw: GatewayProcess, path: str) -> None:
    """Open `path` unauthenticated, land on the real login page, sign in as admin through the
    form, and come back to `path` (which is then loaded)."""
    page.goto(gw.url + path, wait_until="load")
    login = f"{gw.url}/.garrison/login?next={quote(path, safe='')}"
    assert page.url == login, f"not sent to the login page: {page.url}"
    page.fill("#username", "admin")
    page.fill("#password", ADMIN_PASSWORD)
    with page.expect_navigation(url=gw.url + path, wait_until="load", timeout=LOGIN_TIMEOUT_MS):
        page.click("button[type=submit]")
    assert page.url == gw.url + path
    cookies = [c for c in page.context.cookies(gw.url) if c["name"] == "__Host-garrison"]
    assert len(cookies) == 1 and cookies[0]["secure"] and cookies[0]["httpOnly"], cookies


def ca_file(gw: GatewayProcess) -> Path:
    """The CA the gateway told us to trust; it must exist."""
    assert gw.ca_path is not None, f"no 'CA certificate (trust this)' line:\n{gw.output()}"
    assert gw.ca_path.is_file(), gw.ca_path
    return gw.ca_path


def trust(gw: GatewayProcess) -> ssl.SSLContext:
    """A client TLS context that trusts only the gateway's CA."""
    return ssl.create_default_context(cafile=str(ca_file(gw)))


def spki_hash(gw: GatewayProcess) -> str:
    """base64(sha256(SPKI)) of the certificate the gateway serves, for Chromium's allow-list.

    Chromium ignores SSL_CERT_FILE; pinning the served key is the no-root way to make it accept
    our private CA's server certificate without turning certificate checks off.
    """
    pem = ssl.get_server_certificate(("127.0.0.1", gw.port))
    spki = (
        x509.load_pem_x509_certificate(pem.encode())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[object]:
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread, which
    would break asyncio.run() in every later test if it lived for the whole session."""
    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed in this environment")
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        missing("curl not found on PATH (apt-get install curl)")
    assert path is not None
    return path

"""Real clients with client certificates (issue 4, acceptance 4).

One gateway with `[client_certs] mode = "required"` in front of the real Gradio app, `/` open
to a certificate alone (`auth = ["client_cert"]`). Certificates come from `garrison cert issue`
(PEM pair and the AES PKCS#12 bundle). curl (PEM and P12), `openssl s_client`, Python's `ssl`
and Chromium driven by Playwright (PEM and .p12) all get through and use Gradio; Chromium
without a certificate gets the gateway's readable 403 page, not a connection error.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, GradioApp, ca_file, missing, spki_hash
from tests.e2e.fixtures_core import running_gateway
from tests.e2e.test_mtls import CertFiles, issue
from tests.e2e.test_peers_browser import (
    LAST_TEXT_IS,
    STEP_TIMEOUT_MS,
    WATCH_LAST_BOT,
    Traffic,
    assert_streamed,
)
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

P12_PASSWORD = "p12-passphrase-for-tests"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, gradio_root: GradioApp
) -> Iterator[GatewayProcess]:
    """Gradio at `/`, reachable with a client certificate from the internal CA and nothing else."""
    config = f"""
[server]
listen = "127.0.0.1:0"

[client_certs]
mode = "required"

[[upstream]]
name = "gradio"
url = "{gradio_root.url}"

[[route]]
path = "/"
upstream = "gradio"
auth = ["client_cert"]
"""
    with running_gateway(tmp_path_factory.mktemp("mtls-peers"), config) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def cert(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """PEM pair and PKCS#12 for "browser-user", made with the CLI."""
    out = tmp_path_factory.mktemp("mtls-peer-certs")
    files = issue(gw, "browser-user", out, email="b@example.test", p12_password=P12_PASSWORD)
    assert files.p12 is not None and files.p12.is_file()
    return files


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found on PATH")
    assert path is not None
    return path


def run(cmd: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=60)


def http_status(raw: bytes) -> int:
    """The status code of the first HTTP/1.x status line in `raw`."""
    start = raw.find(b"HTTP/1.")
    assert start >= 0, raw[-500:]
    return int(raw[start:].split(b" ", 2)[1])


def curl_config(gw: GatewayProcess, curl_args: list[str]) -> tuple[int, bytes]:
    """curl GET /config with `curl_args`; (HTTP status, body). TLS verified against our CA."""
    done = run(
        [
            tool("curl"),
            "--silent",
            "--show-error",
            "--cacert",
            str(ca_file(gw)),
            "--write-out",
            "\n%{http_code}",
            *curl_args,
            gw.url + "/config",
        ]
    )
    assert done.returncode == 0, done.stderr.decode()
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


def assert_gradio_config(body: bytes, gw: GatewayProcess) -> None:
    config = json.loads(body)
    assert config["root"] == gw.url, config.get("root")


def test_curl_with_pem_files(gw: GatewayProcess, cert: CertFiles) -> None:
    status, body = curl_config(gw, ["--cert", str(cert.crt), "--key", str(cert.key)])
    assert status == 200, body[:300]
    assert_gradio_config(body, gw)


def test_curl_with_p12(gw: GatewayProcess, cert: CertFiles) -> None:
    assert cert.p12 is not None
    status, body = curl_config(gw, ["--cert-type", "P12", "--cert", f"{cert.p12}:{P12_PASSWORD}"])
    assert status == 200, body[:300]
    assert_gradio_config(body, gw)


def test_curl_without_certificate_gets_403(gw: GatewayProcess) -> None:
    status, body = curl_config(gw, [])
    assert status == 403, body[:300]
    assert json.loads(body)["error"]["code"] == "client_cert_required"


def test_openssl_s_client(gw: GatewayProcess, cert: CertFiles) -> None:
    done = run(
        [
            tool("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{gw.port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(ca_file(gw)),
            "-verify_return_error",
            "-cert",
            str(cert.crt),
            "-key",
            str(cert.key),
            "-quiet",
            "-ign_eof",
        ],
        stdin=f"GET /config HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert http_status(done.stdout) == 200, done.stdout[:500]
    assert f'"root":"{gw.url}"'.encode() in done.stdout, done.stdout[-500:]


def test_python_ssl_load_cert_chain(gw: GatewayProcess, cert: CertFiles) -> None:
    ctx = ssl.create_default_context(cafile=str(ca_file(gw)))
    ctx.load_cert_chain(cert.crt, cert.key)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=30)
    try:
        conn.request("GET", "/config")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body[:300]
        assert_gradio_config(body, gw)
        conn.request("GET", "/config")  # the same connection, kept alive
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["root"] == gw.url
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mtls_driver(gw: GatewayProcess) -> Iterator[Any]:
    """Playwright whose driver trusts the gateway's CA: with client certificates, Playwright's
    driver (Node) makes the TLS connection to the gateway itself and checks it there."""
    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed in this environment")
    saved = os.environ.get("NODE_EXTRA_CA_CERTS")
    os.environ["NODE_EXTRA_CA_CERTS"] = str(ca_file(gw))
    try:
        with sync_playwright() as pw:
            yield pw
    finally:
        if saved is None:
            os.environ.pop("NODE_EXTRA_CA_CERTS", None)
        else:
            os.environ["NODE_EXTRA_CA_CERTS"] = saved


@pytest.fixture(scope="module")
def browser(mtls_driver: Any, gw: GatewayProcess) -> Iterator[Any]:
    """Chromium that accepts exactly this gateway's key (see conftest.spki_hash)."""
    browser = mtls_driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(gw)}"],
    )
    try:
        yield browser
    finally:
        browser.close()


def use_gradio(page: Any, gw: GatewayProcess, shot: Path) -> list[str]:
    """Open Gradio at `/`, reverse a text, chat and watch the answer stream; screenshot."""
    resp = page.goto(gw.url + "/", wait_until="load")
    assert resp is not None and resp.status == 200, resp and resp.status
    page.locator("#rev-in textarea").fill("hello mtls")
    page.locator("#rev-box").get_by_role("button", name="Submit").click()
    page.wait_for_function(
        "() => document.querySelector('#rev-out textarea')?.value === 'sltm olleh'",
        timeout=STEP_TIMEOUT_MS,
    )
    bot = "#chatbot [data-testid='bot']"
    page.evaluate(WATCH_LAST_BOT, ["#chatbot", "[data-testid='bot']"])
    page.locator("#chat-in textarea").fill("one two three four five six")
    page.locator("#chat-in textarea").press("Enter")
    final = "Echo: one two three four five six"
    page.wait_for_function(LAST_TEXT_IS, arg=[bot, final], timeout=STEP_TIMEOUT_MS)
    seen = [t for t in page.evaluate("window.__seen") if t]
    page.screenshot(path=str(shot), full_page=True)
    assert_streamed(seen, final)
    return seen


@pytest.mark.parametrize("form", ["pem", "p12"])
def test_chromium_with_client_certificate_uses_gradio(
    browser: Any, gw: GatewayProcess, cert: CertFiles, artifacts: Path, form: str
) -> None:
    if form == "pem":
        client_cert: dict[str, Any] = {"certPath": cert.crt, "keyPath": cert.key}
    else:
        client_cert = {"pfxPath": cert.p12, "passphrase": P12_PASSWORD}
    context = browser.new_context(
        ignore_https_errors=False, client_certificates=[{"origin": gw.url, **client_cert}]
    )
    page = context.new_page()
    traffic = Traffic(page)
    try:
        use_gradio(page, gw, artifacts / f"gradio_mtls_{form}.png")
    finally:
        context.close()
    assert traffic.errors == []
    assert traffic.outside(gw.url + "/") == []


def test_chromium_without_certificate_gets_readable_page(
    browser: Any, gw: GatewayProcess, artifacts: Path
) -> None:
    context = browser.new_context(ignore_https_errors=False)
    page = context.new_page()
    try:
        resp = page.goto(gw.url + "/", wait_until="load")
        assert resp is not None and resp.status == 403, resp and resp.status
        assert resp.headers["content-type"].startswith("text/html")
        text = page.locator("body").inner_text()
        page.screenshot(path=str(artifacts / "mtls_no_certificate.png"), full_page=True)
    finally:
        context.close()
    assert "needs a client certificate" in text, text
    assert ".p12" in text, text

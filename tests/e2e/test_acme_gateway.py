"""`garrison up` with [tls] source = "acme" against a real Pebble (issue 6).

A fresh data dir gets a certificate chaining to Pebble's root before "ready"; HTTP-01 is
answered on the redirect listener; a renewal (by the CLI, or by the gateway's own schedule)
swaps the certificate while a stream stays open; a failed validation or an unreachable CA is
logged, counted, alerted through the webhook, and the gateway keeps serving.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.acme_client.test_issue_pebble import wrong_responder
from tests.e2e.fixtures_core import config, running_gateway
from tests.support.gateway import GatewayProcess
from tests.support.pebble import Pebble, pebble_or_skip
from tests.support.upstream import FakeUpstream
from tests.support.webhook import WebhookReceiver

pytestmark = pytest.mark.e2e

NAMES = ["chat.example.com", "api.example.com"]
READ_TIMEOUT = 30.0


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    work = tmp_path / "pebble"
    work.mkdir()
    server = pebble_or_skip(work)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as hook:
        yield hook


def acme_gateway_config(
    upstream: FakeUpstream,
    pebble: Pebble,
    webhook: WebhookReceiver,
    *,
    http_port: int = 0,
    acme: str = "",
) -> str:
    return config(
        upstream.url,
        server=f'http_listen = "127.0.0.1:{http_port or pebble.http_port}"\nhsts_max_age = "5m"\n',
        upstreams=f"""
[tls]
source = "acme"
[tls.acme]
directory = "{pebble.directory}"
email = "ops@example.com"
names = {NAMES!r}
ca_bundle = "{pebble.listener_ca}"
alert_webhook = "{webhook.hook_url}"
retry_min = "1s"
retry_max = "4s"
{acme}
""",
    )


def pebble_context(pebble: Pebble) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pebble.root_pem().decode())
    return ctx


def served_cert(gw: GatewayProcess, ctx: ssl.SSLContext, name: str) -> x509.Certificate:
    """The leaf the gateway serves for SNI `name`, verified by `ctx` (hostname included)."""
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=READ_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def https_get(gw: GatewayProcess, ctx: ssl.SSLContext, path: str, name: str = NAMES[0]) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=READ_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


def plain_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: chat.example.com\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def wait_for_audit(gw: GatewayProcess, pattern: str) -> None:
    """A line of the gateway's audit file (its data dir's audit.log) matches `pattern`."""
    path = gw.data_dir / "audit.log"
    regex = re.compile(pattern)
    wait_until(
        lambda: path.exists() and any(regex.search(x) for x in path.read_text().splitlines()),
        f"an audit line matching {pattern!r}",
        timeout=10.0,
    )


def wait_until(check, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def acme_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison", "acme", *args, "--config", str(gw.config_path),
         "--data-dir", str(gw.data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_fresh_data_dir_serves_a_pebble_certificate_for_both_names(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    text = acme_gateway_config(upstream, pebble, webhook)
    with running_gateway(tmp_path, text) as gw:
        ctx = pebble_context(pebble)
        for name in NAMES:
            leaf = served_cert(gw, ctx, name)  # verification against Pebble's root succeeds
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(NAMES)
        answer = https_get(gw, ctx, "/hello")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"strict-transport-security: max-age=300" in answer.lower()
        # The challenge path is answered (404 for an unknown token), never redirected.
        assert gw.http_port == pebble.http_port
        unknown = plain_get(pebble.http_port, "/.well-known/acme-challenge/" + "x" * 43)
        assert unknown.startswith(b"HTTP/1.1 404"), unknown[:200]
        assert plain_get(pebble.http_port, "/page").startswith(b"HTTP/1.1 301")
        status = acme_cli(gw, "status")
        assert status.returncode == 0, status.stderr
        assert "chat.example.com, api.example.com" in status.stdout
        assert "last error:   -" in status.stdout
        assert webhook.received == []
        # The start-up hint names the ACME host, not the private CA meant for client certs.
        assert f"open https://{NAMES[0]}:{gw.port}/ (certificate from ACME)" in gw.output()
        assert "trusts the CA above" not in gw.output()


def test_renewal_swaps_the_certificate_while_a_stream_stays_open(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    text = acme_gateway_config(upstream, pebble, webhook)
    with running_gateway(tmp_path, text) as gw:
        ctx = pebble_context(pebble)
        before = served_cert(gw, ctx, NAMES[0])
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=READ_TIMEOUT)
        with ctx.wrap_socket(raw, server_hostname=NAMES[0]) as stream:
            stream.sendall(b"GET /forever?tag=renewal HTTP/1.1\r\nHost: chat.example.com\r\n\r\n")
            received = b""
            while received.count(b"data: ") < 3:
                received += stream.recv(65536)
            # The running gateway owns the HTTP port: the CLI only writes the token.
            renewal = acme_cli(gw, "renew", "--force")
            assert renewal.returncode == 0, renewal.stdout + renewal.stderr
            assert "is in use; assuming the running gateway" in renewal.stdout
            gw.wait_for_line(r"server certificate loaded from \S+fullchain\.pem", timeout=30)
            wait_until(
                lambda: served_cert(gw, ctx, NAMES[0]).serial_number != before.serial_number,
                "the renewed certificate on new connections",
            )
            # The stream opened before the swap keeps flowing on its original session.
            seen = received.count(b"data: ")
            more = b""
            while more.count(b"data: ") < 5:
                chunk = stream.recv(65536)
                assert chunk, "the stream was cut by the renewal"
                more += chunk
            assert seen >= 3
            peer = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True) or b"")
            assert peer.serial_number == before.serial_number
        assert gw.proc.poll() is None
        assert webhook.received == []


def _metric(gw: GatewayProcess, ctx: ssl.SSLContext, name: str, labels: str) -> float:
    body = https_get(gw, ctx, "/.garrison/metrics").decode(errors="replace")
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


def test_background_renewal_then_ca_down_alerts_and_keeps_serving(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    # renew_before longer than the lifetime: always due, so the gateway renews on its own
    # (at most once per retry_min).
    text = acme_gateway_config(upstream, pebble, webhook, acme='renew_before = "3650d"')
    with running_gateway(tmp_path, text) as gw:
        ctx = pebble_context(pebble)
        first = served_cert(gw, ctx, NAMES[0])
        wait_until(
            lambda: served_cert(gw, ctx, NAMES[0]).serial_number != first.serial_number,
            "a renewal by the gateway's own schedule",
        )
        pebble.stop()
        alert = webhook.wait(1)[0]
        assert alert["event"] == "acme_failure" and alert["reason"] == "connection"
        assert "connection failed" in alert["error"] and alert["current_not_after"]
        gw.wait_for_line(r"ACME renewal for .* failed .*the current certificate keeps serving")
        webhook.wait(2)  # retried (with backoff) and alerted again
        assert _metric(gw, ctx, "garrison_acme_failures_total", 'reason="connection"') >= 2
        assert _metric(gw, ctx, "garrison_acme_attempts_total", 'result="success"') >= 1
        served_cert(gw, ctx, NAMES[1])  # still a valid Pebble certificate, still serving
        assert gw.proc.poll() is None
        assert "Traceback" not in gw.output()


def test_failed_validation_at_start_serves_internal_cert_and_alerts(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    """Port 80 (Pebble's http_port) answered by something else: validation fails."""
    from tests.support.pebble import free_port

    text = acme_gateway_config(upstream, pebble, webhook, http_port=free_port())
    with wrong_responder(pebble.http_port), running_gateway(tmp_path, text) as gw:
        line = gw.wait_for_line(r"ACME issuance for .* failed")
        assert "HTTP-01 validation failed" in line and "chat.example.com" in line
        assert "Traceback" not in gw.output()
        alert = webhook.wait(1)[0]
        assert alert["reason"] == "validation" and alert["current_not_after"] == ""
        # Up regardless, on the internal certificate, until a retry succeeds.
        assert gw.ca_path is not None
        internal = ssl.create_default_context(cafile=str(gw.ca_path))
        assert served_cert(gw, internal, "localhost") is not None
        status = acme_cli(gw, "status")
        assert "HTTP-01 validation failed" in status.stdout
        assert "certificate:  none yet" in status.stdout


def test_two_workers_place_one_order_and_both_serve_it(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    """Each worker starts the issuance; the lock makes the second find the first's result."""
    text = acme_gateway_config(upstream, pebble, webhook)
    gw = GatewayProcess(["--workers", "2"], tmp_path / "data", config_text=text)
    try:
        ctx = pebble_context(pebble)
        serials = {served_cert(gw, ctx, NAMES[i % 2]).serial_number for i in range(8)}
        assert len(serials) == 1
        assert (pebble.workdir / "pebble.log").read_text().count("POST /order-plz") == 1
        wait_for_audit(gw, r'"event":"acme_certificate".*"stage":"issuance"')
    finally:
        gw.stop()
    assert webhook.received == []


def test_ca_down_at_start_then_back_swaps_the_public_certificate_in(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble, webhook: WebhookReceiver
) -> None:
    """No certificate and no CA at start: up on the internal certificate, alert, retry with
    backoff; once the CA answers, the public certificate is served without a restart."""
    pebble.stop()
    text = acme_gateway_config(upstream, pebble, webhook)
    with running_gateway(tmp_path, text) as gw:
        alert = webhook.wait(1)[0]
        assert alert["stage"] == "issuance" and alert["reason"] == "connection"
        assert gw.ca_path is not None
        internal = ssl.create_default_context(cafile=str(gw.ca_path))
        served_cert(gw, internal, "localhost")  # up, on the internal CA
        pebble.start()  # a new root: read it after the start
        ctx = pebble_context(pebble)

        def public() -> bool:
            try:
                served_cert(gw, ctx, NAMES[0])
            except ssl.SSLCertVerificationError:
                return False
            return True

        wait_until(public, "the public certificate after the CA came back")
        wait_for_audit(gw, r'"event":"acme_certificate".*"stage":"renewal"')
        assert gw.proc.poll() is None and "Traceback" not in gw.output()

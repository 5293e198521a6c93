"""The ACME client against a real Pebble: issuance for two names, account reuse, renewal,
revocation, failed validation and an unreachable CA (each: a clear error, an alert, no crash,
and the current certificate left in place)."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from garrison.acme.account import AcmeError, account_dir, open_account
from garrison.acme.issue import obtain, revoke
from garrison.acme.manager import AcmeManager
from garrison.acme.responder import standalone_responder
from garrison.acme.storage import san_names
from garrison.observe import metrics
from tests.acme_client.conftest import NAMES, acme_config
from tests.support.pebble import Pebble, pebble_or_skip
from tests.support.webhook import WebhookReceiver


def _responder(pebble: Pebble, manager: AcmeManager):  # type: ignore[no-untyped-def]
    return standalone_responder(f"127.0.0.1:{pebble.http_port}", manager.challenges)


def _verify_chain(pebble: Pebble, chain: Path) -> None:
    """The stored chain verifies up to Pebble's root for each name (OpenSSL does the check)."""
    leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    store = x509.verification.Store(x509.load_pem_x509_certificates(pebble.root_pem()))
    intermediates = x509.load_pem_x509_certificates(chain.read_bytes())[1:]
    for name in NAMES:
        verifier = (
            x509.verification.PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(leaf, intermediates)


def _failures(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("garrison_acme_failures_total", {"reason": reason})
    return value or 0.0


def test_issue_two_names_then_reuse_account_and_renew(pebble: Pebble, manager: AcmeManager) -> None:
    with _responder(pebble, manager) as own:
        assert own
        first = manager.ensure(source="issuance")
    assert first.renewed and not first.error
    leaf = manager.live.leaf()
    assert leaf is not None and san_names(leaf) == sorted(NAMES)
    _verify_chain(pebble, manager.live.chain_path)
    for path in (manager.live.key_path, manager.live.chain_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    folder = account_dir(manager.data_dir, pebble.directory)
    key_file = folder / "account.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_before, uri_before = (
        key_file.read_bytes(),
        json.loads((folder / "account.json").read_text()),
    )
    # Not due: nothing happens, no order is placed.
    skipped = manager.ensure()
    assert not skipped.renewed and not skipped.error and skipped.next_check is not None
    # Forced renewal: a new certificate and a new key, the same account.
    with _responder(pebble, manager):
        again = manager.ensure(force=True)
    assert again.renewed
    renewed = manager.live.leaf()
    assert renewed is not None and renewed.serial_number != leaf.serial_number
    assert renewed.public_key() != leaf.public_key()
    assert key_file.read_bytes() == key_before
    assert json.loads((folder / "account.json").read_text()) == uri_before
    state = manager.live.read_state()
    assert (
        state.failures == 0
        and state.last_error == ""
        and state.serial == f"{renewed.serial_number:x}"
    )


def test_account_per_directory_url(tmp_path: Path, pebble: Pebble) -> None:
    data = tmp_path / "data"
    first = open_account(data, pebble.directory, "ops@example.com", str(pebble.listener_ca))
    same = open_account(data, pebble.directory, "ops@example.com", str(pebble.listener_ca))
    assert first.created and not same.created and first.uri == same.uri
    # The same server under another directory URL is another CA as far as we know.
    other_url = pebble.directory.replace("127.0.0.1", "localhost")
    other = open_account(data, other_url, "", str(pebble.listener_ca))
    assert other.created and other.uri != first.uri
    assert account_dir(data, other_url) != account_dir(data, pebble.directory)


def test_dry_run_stores_nothing(tmp_path: Path, pebble: Pebble) -> None:
    data = tmp_path / "data"
    manager = AcmeManager(data, acme_config(pebble))
    with _responder(pebble, manager):
        account = open_account(data, pebble.directory, "", str(pebble.listener_ca), store=False)
        issued = obtain(account, NAMES, manager.challenges)
    assert san_names(issued.leaf) == sorted(NAMES)
    assert not (data / "acme" / "accounts").exists()
    assert not manager.live.chain_path.exists()
    assert list(manager.challenges.directory.iterdir()) == []  # tokens cleaned up


def test_revoke(pebble: Pebble, manager: AcmeManager) -> None:
    with _responder(pebble, manager):
        assert manager.ensure().renewed
    leaf = manager.live.leaf()
    assert leaf is not None
    cfg = manager.config
    account = open_account(manager.data_dir, cfg.directory, cfg.email, cfg.ca_bundle)
    revoke(account, leaf)
    with pytest.raises(AcmeError, match=r"\(alreadyRevoked\)"):
        revoke(account, leaf)


class WrongResponder(http.server.BaseHTTPRequestHandler):
    """Answers every challenge with a wrong key authorization (a misrouted port 80)."""

    def do_GET(self) -> None:
        body = b"not-the-key-authorization"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def wrong_responder(port: int) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), WrongResponder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_failed_validation_is_clear_alerted_and_counted(
    pebble: Pebble, manager: AcmeManager, webhook: WebhookReceiver
) -> None:
    before = _failures("validation")
    with wrong_responder(pebble.http_port):
        outcome = manager.ensure(source="issuance")
    assert not outcome.renewed
    assert "HTTP-01 validation failed" in outcome.error
    assert any(name in outcome.error for name in NAMES), outcome.error
    assert "not-the-key-authorization" in outcome.error or "unauthorized" in outcome.error
    state = manager.live.read_state()
    assert state.failures == 1 and state.last_error == outcome.error and state.retry_at
    assert _failures("validation") == before + 1
    alert = webhook.wait(1)[0]
    assert alert["event"] == "acme_failure" and alert["reason"] == "validation"
    assert alert["names"] == NAMES and alert["error"] == outcome.error
    # Backed off: not retried before retry_at, even though there is no certificate.
    assert manager.ensure().error == "" and manager.live.read_state().failures == 1


def test_ca_down_keeps_the_certificate_and_backs_off(
    pebble: Pebble, manager: AcmeManager, webhook: WebhookReceiver
) -> None:
    with _responder(pebble, manager):
        assert manager.ensure().renewed
    serving = manager.live.chain_path.read_bytes()
    pebble.stop()
    before = _failures("connection")
    first = manager.ensure(force=True)
    second = manager.ensure(force=True)
    assert not first.renewed and "connection failed" in first.error, first.error
    assert "Traceback" not in first.error
    assert _failures("connection") == before + 2
    state = manager.live.read_state()
    assert state.failures == 2
    assert first.next_check is not None and second.next_check is not None
    # Doubling backoff: the second retry is scheduled further out than the first.
    assert (second.next_check - first.next_check).total_seconds() > 1
    assert manager.live.chain_path.read_bytes() == serving  # still the old, valid one
    assert manager.usable() is not None
    alerts = webhook.wait(2)
    assert [a["failures"] for a in alerts[:2]] == [1, 2]
    assert alerts[0]["current_not_after"]  # the alert says a certificate is still serving


def test_renewal_information_moves_renewal_earlier(pebble: Pebble, manager: AcmeManager) -> None:
    """Pebble 2.4 offers no renewalInfo: the check records that (and when to ask again) and
    the schedule stays ours; a suggested window (as Let's Encrypt sends) moves it earlier."""
    with _responder(pebble, manager):
        assert manager.ensure().renewed
    own = manager.due()
    manager.check_ari()
    state = manager.live.read_state()
    assert state.ari_renewal == "" and state.ari_checked_until
    assert manager.due() == own
    suggested = own - dt.timedelta(days=100)
    state.ari_renewal = suggested.isoformat()
    manager.live.write_state(state)
    assert manager.due() == suggested
    later = own + dt.timedelta(days=1)  # ARI never delays a renewal past our own schedule
    state.ari_renewal = later.isoformat()
    manager.live.write_state(state)
    assert manager.due() == own


def test_rejected_nonces_are_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A CA may answer any request with badNonce (RFC 8555 §6.5): with Pebble rejecting half
    of all good nonces, an order still goes through."""
    work = tmp_path / "pebble-nonces"
    work.mkdir()
    server = pebble_or_skip(work, nonce_reject=50)
    try:
        manager = AcmeManager(tmp_path / "data", acme_config(server))
        caplog.set_level(logging.DEBUG, logger="garrison")
        with _responder(server, manager):
            outcome = manager.ensure()
        assert outcome.renewed, outcome.error
        assert "badNonce" not in outcome.error
        # Pebble rejected some (about one per successful POST: P(none) < 0.1%), each retried.
        assert sum("rejected a nonce" in r.getMessage() for r in caplog.records) >= 1
    finally:
        server.close()

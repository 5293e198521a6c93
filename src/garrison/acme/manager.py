"""One renewal decision and attempt, shared by `garrison up` (in a thread) and the CLI.

Everything that must hold whoever runs it lives here: one attempt at a time per data dir
(FileLock, so workers and the CLI never place two orders), the decision re-made under the lock
(another process may have renewed already), the certificate stored before the state says so,
and on failure: the old certificate left in place, the error in the state file, the log,
the metric and the webhook.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from garrison.acme.account import AcmeError, directory, open_account
from garrison.acme.alert import send_alert
from garrison.acme.challenges import ChallengeStore
from garrison.acme.issue import Issued, obtain
from garrison.acme.schedule import backoff, renewal_due
from garrison.acme.storage import AcmeState, LiveStore, iso, parse_iso, san_names
from garrison.config import AcmeConfig
from garrison.fsutil import FileLock
from garrison.observe import metrics

log = logging.getLogger("garrison")
ARI_DEFAULT_RECHECK = dt.timedelta(hours=6)


@dataclass(frozen=True)
class Outcome:
    """What one call did: renewed (new files), skipped (still valid) or failed (`error`)."""

    renewed: bool
    error: str = ""
    next_check: dt.datetime | None = None


class AcmeManager:
    def __init__(self, data_dir: Path, config: AcmeConfig) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.live = LiveStore(self.data_dir)
        self.challenges = ChallengeStore(self.data_dir)

    # -- decisions -------------------------------------------------------------------------

    def usable(self) -> x509.Certificate | None:
        """The stored leaf when it is for our names and directory and not expired/revoked."""
        leaf = self.live.leaf()
        if leaf is None:
            return None
        state = self.live.read_state()
        if san_names(leaf) != sorted(self.config.names) or state.revoked:
            return None
        if state.directory and state.directory != self.config.directory:
            return None
        if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            return None
        return leaf

    def due(self, now: dt.datetime | None = None) -> dt.datetime:
        """When the next attempt should happen (now, if there is no usable certificate)."""
        now = now or dt.datetime.now(dt.UTC)
        leaf = self.usable()
        state = self.live.read_state()
        retry_at = parse_iso(state.retry_at)
        if leaf is None:
            return max(now, retry_at) if retry_at else now
        due = renewal_due(leaf, self.config.renew_before, parse_iso(state.ari_renewal))
        if retry_at and state.failures:
            due = max(due, retry_at)
        return due

    # -- the attempt -----------------------------------------------------------------------

    def ensure(self, *, force: bool = False, source: str = "renewal") -> Outcome:
        """Renew when due (or forced); otherwise do nothing. Never raises AcmeError."""
        self.live.ensure()
        with FileLock(self.live.lock_path):
            now = dt.datetime.now(dt.UTC)
            if not force:
                due = self.due(now)
                if due > now:
                    return Outcome(False, next_check=due)
            state = self.live.read_state()
            state.last_attempt = iso(now)
            try:
                issued = self._issue()
            except AcmeError as exc:
                return self._failed(state, exc, now, source)
            self.live.write_pair(issued.chain_pem, issued.key_pem)
            self._succeeded(state, issued, now)
            metrics.acme_attempts.labels(result="success").inc()
            log.info(
                "ACME certificate for %s obtained, valid until %s",
                ", ".join(self.config.names),
                issued.leaf.not_valid_after_utc.isoformat(),
            )
            return Outcome(True, next_check=parse_iso(state.next_renewal))

    def _issue(self) -> Issued:
        cfg = self.config
        account = open_account(self.data_dir, cfg.directory, cfg.email, cfg.ca_bundle)
        return obtain(account, list(cfg.names), self.challenges)

    def _succeeded(self, state: AcmeState, issued: Issued, now: dt.datetime) -> None:
        leaf = issued.leaf
        state.names = list(self.config.names)
        state.directory = self.config.directory
        state.not_before = iso(leaf.not_valid_before_utc)
        state.not_after = iso(leaf.not_valid_after_utc)
        metrics.set_certificate_expiry("acme", leaf.not_valid_after_utc)
        state.serial = format(leaf.serial_number, "x")
        state.last_success = iso(now)
        state.last_error = ""
        state.failures = 0
        state.retry_at = ""
        state.revoked = False
        state.ari_renewal = ""
        state.ari_checked_until = ""
        state.next_renewal = iso(renewal_due(leaf, self.config.renew_before))
        self.live.write_state(state)

    def _failed(self, state: AcmeState, exc: AcmeError, now: dt.datetime, source: str) -> Outcome:
        state.failures += 1
        delay = backoff(state.failures, self.config.retry_min, self.config.retry_max)
        retry = now + dt.timedelta(seconds=delay)
        state.last_error = str(exc)
        state.retry_at = iso(retry)
        self.live.write_state(state)
        metrics.acme_attempts.labels(result="failure").inc()
        metrics.acme_failures.labels(reason=exc.reason).inc()
        serving = self.live.leaf()
        log.error(
            "ACME %s for %s failed (attempt %d, next try in %ds; %s): %s",
            source,
            ", ".join(self.config.names),
            state.failures,
            int(delay),
            "the current certificate keeps serving" if serving else "no ACME certificate yet",
            exc,
        )
        send_alert(
            self.config.alert_webhook,
            {
                "event": "acme_failure",
                "stage": source,
                "names": list(self.config.names),
                "directory": self.config.directory,
                "error": str(exc),
                "reason": exc.reason,
                "failures": state.failures,
                "retry_at": state.retry_at,
                "current_not_after": iso(serving.not_valid_after_utc) if serving else "",
                "host": socket.gethostname(),
            },
        )
        return Outcome(False, error=str(exc), next_check=retry)

    def check_ari(self, now: dt.datetime | None = None) -> None:
        """RFC 9773: ask the CA when to renew, at most once per its Retry-After (6 h when it
        offers no ARI). Errors are ignored: ARI only ever moves a renewal earlier than our
        own schedule, so without it we renew on time anyway."""
        now = now or dt.datetime.now(dt.UTC)
        state = self.live.read_state()
        until = parse_iso(state.ari_checked_until)
        if (until is not None and until > now) or self.usable() is None:
            return
        self.live.ensure()
        with FileLock(self.live.lock_path):
            try:
                acme = directory(self.config.directory, self.config.ca_bundle)
                if "renewalInfo" in acme.directory:
                    suggested, recheck = acme.renewal_time(self.live.chain_path.read_bytes())
                else:
                    suggested, recheck = None, now + ARI_DEFAULT_RECHECK
            except Exception as exc:  # the CA down: retried at the next check, not before
                log.debug("ACME renewal information unavailable: %s", exc)
                suggested, recheck = None, now + ARI_DEFAULT_RECHECK
            state = self.live.read_state()
            state.ari_renewal = iso(suggested.astimezone(dt.UTC)) if suggested else ""
            state.ari_checked_until = iso(recheck.astimezone(dt.UTC))
            self.live.write_state(state)

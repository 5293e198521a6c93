"""The audit log: one JSON line per decision that matters, with no secret in it by construction.

Two kinds of lines. `event(name, fields)` records logins, tokens, key/user/certificate changes,
certificate refusals and ACME outcomes; it accepts only the field names in `FIELDS` (each with
its type), so a header, cookie, password, token or key cannot be passed in by mistake: an
unknown name raises at once (and the tests pass every secret through the real endpoints and
look for it in the file). `request(...)` records a request's outcome (allowed or refused, the
stage and reason, identity, client IP, route, status, duration, bytes); it is formatted by hand
from known fields, because json.dumps of a dict per request costs more than the rest of it.

Bodies: never by default. `bodies = "hash"` keeps a SHA-256 and the size of the request body,
computed chunk by chunk as the relay streams it (no buffering); `"full"` also keeps the first
`FULL_BODY_MAX` bytes, base64 — personal data, so the gateway warns loudly at start.

Durability: lines are buffered and written in batches (200 ms or 64 KiB: no system call per
request), fsynced at most every `fsync_interval` with `fsync = "interval"`. With
`fsync = "always"` each line is written and fsynced at once, before the caller sends the
answer, so the client never sees a decision the disk does not hold — at the price of one
write and one fsync on the event loop per request (throughput is then bounded by the disk's
fsync latency; meant for low-volume, compliance-bound deployments).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from garrison.config import AuditConfig
from garrison.observe.audit_sink import FileSink, Sink, StdoutSink, SyslogSink
from garrison.observe.batching import LineBatch
from garrison.observe.outcome import MAX_TEXT, now_iso, request_fields

if TYPE_CHECKING:
    from garrison.pipeline.exchange import Exchange

log = logging.getLogger("garrison.audit")

FULL_BODY_MAX = 64 * 1024
MAX_ITEMS = 32

AuditHook = Callable[[str, dict[str, object]], None]

# Every field an event line may carry. Nothing here can hold a credential: names, ids, serials,
# addresses, reasons chosen by our code, counts. Values are cut at MAX_TEXT characters.
_STR, _INT, _LIST = (str,), (int, float), (list, tuple)
FIELDS: dict[str, tuple[type, ...]] = {
    "user": _STR,  # an account name (never what a failed login typed, unless it is an account)
    "identity": _STR,
    "auth": _STR,  # session, api_key, jwt, client_cert
    "key_id": _STR,
    "key_name": _STR,
    "owner": _STR,
    "scopes": _LIST,
    "roles": _LIST,
    "email": _STR,
    "expires": _INT,
    "grace_s": _INT,
    "grant": _STR,
    "everywhere": (bool,),
    "rate": _LIST,
    "tokens": _STR,
    "client_ip": _STR,
    "path": _STR,
    "route": _STR,
    "method": _STR,
    "status": _INT,
    "stage": _STR,
    "reason": _STR,
    "error": _STR,
    "by": _STR,  # who made a change: "cli:<os user>"
    "name": _STR,
    "serial": _STR,
    "subject": _STR,
    "issuer": _STR,
    "certificate": _STR,
    "names": _LIST,
    "until": _INT + _STR,
    "wait_s": _INT,
}


class BodyDigest:
    """SHA-256 and size of a request body, fed chunk by chunk while it streams through."""

    __slots__ = ("_hash", "_keep", "_kept", "size")

    def __init__(self, keep: int = 0) -> None:
        self._hash = hashlib.sha256()
        self.size = 0
        self._keep = keep
        self._kept: list[bytes] = []

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        if self._keep and self.size < self._keep:
            self._kept.append(data[: self._keep - self.size])
        self.size += len(data)

    def fields(self) -> str:
        """The JSON members this digest adds to a request line (leading comma included)."""
        text = f',"body_sha256":"{self._hash.hexdigest()}","body_size":{self.size}'
        if self._keep:
            body = base64.b64encode(b"".join(self._kept)).decode("ascii")
            text += f',"body_b64":"{body}","body_truncated":{_bool(self.size > self._keep)}'
        return text


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _clean(name: str, value: object) -> object:
    """A field value of the declared type, cut to size; TypeError for anything else."""
    allowed = FIELDS.get(name)
    if allowed is None:
        raise TypeError(f"{name!r} is not an audit field (audit lines take known fields only)")
    if value is None:
        return None
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise TypeError(f"audit field {name!r} does not take {type(value).__name__}")
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list | tuple):
        return [str(item)[:MAX_TEXT] for item in list(value)[:MAX_ITEMS]]
    return value


def open_sink(config: AuditConfig, data_dir: Path) -> Sink | None:
    """The configured sink; None for "off"."""
    if config.sink == "off":
        return None
    if config.sink == "stdout":
        return StdoutSink()
    if config.sink == "syslog":
        return SyslogSink(config.syslog_address)
    return FileSink(audit_path(config, data_dir), config.max_size, config.keep)


def audit_path(config: AuditConfig, data_dir: Path) -> Path:
    return Path(config.path) if config.path is not None else Path(data_dir) / "audit.log"


class AuditLog(LineBatch):
    """One per process; `event` and `request` are safe to call from the event loop."""

    def __init__(self, config: AuditConfig, data_dir: Path) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.sink = open_sink(config, data_dir)
        self._settings(config)
        self._sync_timer: asyncio.TimerHandle | None = None
        self._last_sync = 0.0
        self._dirty = False
        self._failed = False

    def _settings(self, config: AuditConfig) -> None:
        self.config = config
        self.always = config.fsync == "always"
        self.interval = config.fsync == "interval"
        self.requests_all = config.requests == "all" and self.sink is not None
        self.requests_refused = config.requests != "none" and self.sink is not None
        self._digest_keep = FULL_BODY_MAX if config.bodies == "full" else 0
        self.hash_bodies = config.bodies != "none" and self.requests_refused

    def configure(self, config: AuditConfig) -> None:
        """A reload changed [audit]: open the new sink first (OSError: the old one stays)."""
        sink = open_sink(config, self.data_dir)
        self.flush()
        self.sync()
        old, self.sink = self.sink, sink
        self._settings(config)
        if old is not None:
            old.close()

    @classmethod
    def disabled(cls) -> AuditLog:
        return cls(AuditConfig(sink="off"), Path("."))

    # -- events ---------------------------------------------------------------------------------
    def event(self, name: str, fields: dict[str, object]) -> None:
        """A decision or change worth keeping; `fields` must be names from FIELDS."""
        record: dict[str, object] = {"ts": now_iso(), "event": name}
        for key, value in fields.items():
            record[key] = _clean(key, value)
        if self.sink is None:
            return
        self._append(json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n")

    __call__ = event  # an AuditHook: audit("client_cert_refused", {...})

    # -- requests -------------------------------------------------------------------------------
    def body_digest(self) -> BodyDigest | None:
        """A digest to feed the request body into, or None (bodies = "none": zero cost)."""
        return BodyDigest(self._digest_keep) if self.hash_bodies else None

    def request(
        self,
        ex: Exchange,
        status: int,
        *,
        refused: bool,
        reason: str = "",
        bytes_out: int | None = None,
        digest: BodyDigest | None = None,
        error: str = "",
    ) -> None:
        """A request's outcome. `bytes_out` None: written when the answer started (always).

        The hot path goes through observe/outcome.py, which formats the line once for both
        logs; this is for the `fsync = "always"` line at the response head, and for tests."""
        if not (self.requests_all or (refused and self.requests_refused)):
            return
        line = request_fields(
            ex, status, refused=refused, reason=reason, bytes_out=bytes_out, error=error
        )
        self.append_request(line, digest)

    def append_request(self, fields: str, digest: BodyDigest | None) -> None:
        """A request line from `request_fields`: the body digest (if any) and the brace added."""
        self._append(fields + (digest.fields() if digest is not None else "") + "}\n")

    # -- writing --------------------------------------------------------------------------------
    def _append(self, line: str) -> None:
        if self.always:
            self._write(line.encode("utf-8"), sync=True)
        else:
            self.append(line)

    def _write_batch(self, data: str) -> None:
        self._write(data.encode("utf-8"), sync=False)
        if self.interval:
            self._dirty = True
            self._maybe_sync()

    def _maybe_sync(self) -> None:
        """fsync now if the last one is `fsync_interval` old, else once that much has passed."""
        now = time.monotonic()
        wait = self._last_sync + self.config.fsync_interval - now
        if wait <= 0:
            self.sync()
            return
        if self._sync_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.sync()
                return
            self._sync_timer = loop.call_later(wait, self.sync)

    def sync(self) -> None:
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self._last_sync = time.monotonic()
        if self._dirty and self.sink is not None:
            self._dirty = False
            try:
                self.sink.sync()
            except OSError as exc:
                self._failure(exc)

    def _write(self, data: bytes, sync: bool) -> None:
        if self.sink is None:
            return
        try:
            self.sink.write(data)
            if sync:
                self.sink.sync()
        except OSError as exc:
            self._failure(exc)

    def _failure(self, exc: OSError) -> None:
        """A full disk must not take the gateway down, but it must be said (once per outage)."""
        if not self._failed:
            self._failed = True
            log.error("audit log write failed (lines are being lost): %s", exc)

    def reopen(self) -> None:
        self.flush()
        if self.sink is not None:
            try:
                self.sink.reopen()
            except OSError as exc:
                self._failure(exc)

    def close(self) -> None:
        self.flush()
        if self._dirty:
            self.sync()
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self.sink is not None:
            self.sink.close()


def warn_full_bodies(config: AuditConfig, say: Callable[[str], None]) -> None:
    """The loud start-up warning `bodies = "full"` deserves."""
    if config.bodies == "full":
        say(
            'WARNING: [audit] bodies = "full" writes request bodies (prompts, uploads: personal '
            'data) into the audit log; use "hash" unless a regulation requires the content'
        )


def cli_event(
    data_dir: Path, name: str, fields: dict[str, object], config: AuditConfig | None = None
) -> None:
    """An administrative change made by a `garrison` command: appended (one write, fsynced)
    to the configured audit file when the command has the config and it names a file, else
    to the data dir's audit file, which is also `garrison up`'s default."""
    record = {**fields, "by": f"cli:{_os_user()}"}
    if config is not None and config.sink == "off":
        return
    if config is None or config.sink != "file":
        config = AuditConfig()
    try:
        writer = AuditLog(config.model_copy(update={"fsync": "always"}), data_dir)
    except OSError as exc:  # the change is made; say loudly that its record is not
        print(f"garrison: WARNING: cannot write the audit log: {exc}", file=sys.stderr)
        return
    try:
        writer.event(name, record)
    finally:
        writer.close()


def _os_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())

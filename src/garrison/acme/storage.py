"""The live ACME certificate (chain + key) and its state file, under data_dir/acme/live.

The chain and key are written atomically, key first, so the TLS watcher that sees a new chain
always finds its key in place. state.json records what `garrison acme status` shows and what
the renewer needs across restarts: names, directory, expiry, next renewal, failures, last error.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from garrison.fsutil import atomic_write, ensure_private_dir


@dataclass
class AcmeState:
    names: list[str] = field(default_factory=list)
    directory: str = ""
    not_before: str = ""
    not_after: str = ""
    serial: str = ""
    next_renewal: str = ""
    last_success: str = ""
    last_attempt: str = ""
    last_error: str = ""
    failures: int = 0
    retry_at: str = ""
    revoked: bool = False
    ari_checked_until: str = ""
    ari_renewal: str = ""


class LiveStore:
    """Paths of the live certificate and reads/writes of its state."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = Path(data_dir) / "acme" / "live"
        self.chain_path = self.folder / "fullchain.pem"
        self.key_path = self.folder / "privkey.pem"
        self.state_path = self.folder / "state.json"
        self.lock_path = Path(data_dir) / "acme" / ".renew.lock"

    def ensure(self) -> None:
        ensure_private_dir(self.folder.parent)
        ensure_private_dir(self.folder)

    def write_pair(self, chain_pem: bytes, key_pem: bytes) -> None:
        self.ensure()
        atomic_write(self.key_path, key_pem, 0o600)
        atomic_write(self.chain_path, chain_pem, 0o600)

    def read_state(self) -> AcmeState:
        try:
            raw = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return AcmeState()
        if not isinstance(raw, dict):
            return AcmeState()
        known = {k: v for k, v in raw.items() if k in AcmeState.__dataclass_fields__}
        try:
            return AcmeState(**known)
        except TypeError:
            return AcmeState()

    def write_state(self, state: AcmeState) -> None:
        self.ensure()
        atomic_write(self.state_path, json.dumps(asdict(state), indent=2).encode(), 0o600)

    def leaf(self) -> x509.Certificate | None:
        """The stored leaf if chain and key are readable and belong together; else None."""
        try:
            certs = x509.load_pem_x509_certificates(self.chain_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError):
            return None
        if key.public_key() != certs[0].public_key():
            return None
        return certs[0]


def san_names(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return sorted(str(name).lower() for name in ext.value.get_values_for_type(x509.DNSName))


def iso(moment: dt.datetime | None) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds") if moment else ""


def parse_iso(text: str) -> dt.datetime | None:
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

"""Which client certificates are revoked, held in memory for the request path.

Internal CA: read from the store's `client_certs` table when a `cert` notice arrives (so a
`garrison cert revoke` reaches every worker and every open connection within a poll) and when
a revocation scheduled for later (renewal grace) comes due. External CA: a CRL file or URL,
re-read every `crl_refresh`; a CRL that cannot be loaded or is past its nextUpdate makes every
certificate fail ("revocation status unknown") rather than letting revoked ones through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
from cryptography import x509
from sqlalchemy import Engine, select

from garrison.config import ClientCertsConfig
from garrison.observe import metrics
from garrison.pki.crl import revoked_serials_from_crl
from garrison.store.db import client_certs

log = logging.getLogger("garrison.pki")
MAX_CRL_BYTES = 16 * 1024 * 1024


class Revocation:
    """The revoked serials (ints) and whether the list can be trusted right now."""

    def __init__(self, engine: Engine, config: ClientCertsConfig) -> None:
        self.engine = engine
        self.config = config
        self.revoked: frozenset[int] = frozenset()
        self.known = config.ca == "internal"  # external: unknown until a CRL loads
        self.next_due = float("inf")
        self.version = 0  # bumped when the revoked set changes (the served CRL is rebuilt)
        self._issuers: list[x509.Certificate] = []
        self._next_crl = 0.0
        if config.ca != "internal":
            self._issuers = x509.load_pem_x509_certificates(Path(config.ca).read_bytes())
            if config.crl is None:
                self.known = True  # no CRL configured: nothing is revoked by definition

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    def refresh_internal(self, now: float | None = None) -> None:
        """Reload from the store (a thread's job: it is a query)."""
        if self.config.ca != "internal" or not self.enabled:
            return
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    client_certs.c.serial,
                    client_certs.c.name,
                    client_certs.c.not_after,
                    client_certs.c.revoked_at,
                )
            ).all()
        revoked = set()
        next_due = float("inf")
        live: list[tuple[str, str, float]] = []
        for row in rows:
            if row.revoked_at is not None and row.revoked_at <= now:
                revoked.add(int(row.serial, 16))
                continue
            if row.revoked_at is not None:
                next_due = min(next_due, row.revoked_at)
            live.append((row.name, row.serial, row.not_after))
        if frozenset(revoked) != self.revoked:
            self.version += 1
        self.revoked = frozenset(revoked)
        self.next_due = next_due
        metrics.set_client_cert_expiries(live, now)

    async def refresh_crl(self, now: float | None = None) -> None:
        """External CA: load the CRL when it is due (called from the background loop)."""
        source = self.config.crl
        now = time.time() if now is None else now
        if source is None or not self.enabled or now < self._next_crl:
            return
        self._next_crl = now + self.config.crl_refresh
        try:
            data = await _fetch(source)
            self.revoked = revoked_serials_from_crl(data, self._issuers, now)
            self.known = True
        except Exception as exc:
            self.known = False
            log.error("client certificate CRL %s unusable, refusing certificates: %s", source, exc)

    def problem(self, serial: int) -> str | None:
        if not self.known:
            return "revocation status unknown"
        return "revoked" if serial in self.revoked else None


async def _fetch(source: str) -> bytes:
    if source.startswith(("https://", "http://")):
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(source, allow_redirects=False) as resp,
        ):
            resp.raise_for_status()
            data = await resp.content.read(MAX_CRL_BYTES + 1)
        if len(data) > MAX_CRL_BYTES:
            raise ValueError("CRL too large")
        return data
    return await asyncio.to_thread(Path(source).read_bytes)

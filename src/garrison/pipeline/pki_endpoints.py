"""Gateway endpoints for operators and other software: the CRL (metrics: metrics_endpoint)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from garrison.netaddr import address
from garrison.pipeline.endpoints import GatewayEndpoints
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import StageResult
from garrison.pki.revocation import Revocation

CRL_MAX_AGE = 3600.0


class PkiEndpoints:
    """`/.garrison/crl.pem` (internal CA)."""

    def __init__(self, revocation: Revocation, build_crl: Callable[[], bytes] | None) -> None:
        self.revocation = revocation
        self.build_crl = build_crl
        self._crl: tuple[int, float, bytes] | None = None

    def register(self, endpoints: GatewayEndpoints) -> None:
        if self.build_crl is not None:
            endpoints.add("/.garrison/crl.pem", self.crl)

    def crl(self, ex: Exchange) -> StageResult:
        if ex.method not in ("GET", "HEAD"):
            return error_reply(405, "method_not_allowed", "GET only", html=ex.wants_html())
        cached = self._crl
        now = time.time()
        if (
            cached is not None
            and cached[0] == self.revocation.version
            and now - cached[1] < CRL_MAX_AGE
        ):
            return _crl_reply(cached[2])
        return self._rebuild(now)

    async def _rebuild(self, now: float) -> Reply:
        assert self.build_crl is not None
        version = self.revocation.version
        pem = await asyncio.to_thread(self.build_crl)
        self._crl = (version, now, pem)
        return _crl_reply(pem)


def _crl_reply(pem: bytes) -> Reply:
    return Reply(200, pem, b"application/pkix-crl")


def _loopback(ip: str) -> bool:
    parsed = address(ip)
    return parsed is not None and parsed.is_loopback

"""Stage: the client certificate of the connection (mutual TLS), checked on every request.

The chain was verified at the handshake; here: validity dates and revocation (an in-memory set,
so a revocation reaches keep-alive connections that are already open), the identity the
certificate names, the nginx-compatible headers for the upstream, and with `mode = "required"`
a readable refusal — an HTML page for a browser, JSON for an API client — instead of a reset.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from garrison.auth.identity import Identity
from garrison.config import ClientCertsConfig
from garrison.observe import metrics
from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.pipeline import Stage
from garrison.pki.revocation import Revocation

AuditHook = Callable[[str, dict[str, object]], None]

_NEEDED = (
    "This site needs a client certificate. Install the certificate (.p12 file) your "
    "administrator gave you in your browser or system, then reload this page."
)


class ClientCertCheck(Stage):
    name = "client_cert"

    def __init__(self, config: ClientCertsConfig, revocation: Revocation, audit: AuditHook) -> None:
        self.required = config.mode == "required"
        self.forward_cert = config.forward_cert
        self.revocation = revocation
        self.audit = audit
        self._identities: dict[int, Identity] = {}

    def __call__(self, ex: Exchange) -> Reply | None:
        peer = ex.peer_cert
        extra = ex.upstream_headers
        if peer is None:
            extra.append((b"x-ssl-client-verify", b"NONE"))
            if self.required:
                return self._refuse(ex, "none", "no client certificate was sent")
            return None
        problem = self.revocation.problem(peer.serial)
        if problem is None:
            now = time.time()
            if now >= peer.not_after:
                problem = "expired"
            elif now < peer.not_before:
                problem = "not yet valid"
        extra.append(
            (
                b"x-ssl-client-verify",
                b"SUCCESS" if problem is None else b"FAILED:" + problem.encode(),
            )
        )
        extra.append((b"x-ssl-client-dn", peer.dn))
        extra.append((b"x-ssl-client-serial", b"%X" % peer.serial))
        extra.append((b"x-ssl-client-fingerprint", peer.fingerprint.encode()))
        if self.forward_cert:
            extra.append((b"x-ssl-client-cert", peer.pem_quoted()))
        if problem is not None:
            metrics.client_cert_checks.labels(result=problem.replace(" ", "_")).inc()
            if self.required:
                return self._refuse(ex, problem, f"the client certificate is {problem}")
            return None
        if peer.identity is not None:
            ex.cert_identity = self._identity(peer.serial, peer.identity)
        return None

    def _identity(self, serial: int, cert: object) -> Identity:
        found = self._identities.get(serial)
        if found is None:
            found = Identity(
                method="client_cert",
                name=cert.name,  # type: ignore[attr-defined]
                email=cert.email,  # type: ignore[attr-defined]
                roles=tuple(cert.roles),  # type: ignore[attr-defined]
            )
            if len(self._identities) > 10_000:
                self._identities.clear()
            self._identities[serial] = found
        return found

    def _refuse(self, ex: Exchange, result: str, message: str) -> Reply:
        peer = ex.peer_cert
        fields: dict[str, object] = {
            "reason": result,
            "stage": "http",
            "client_ip": ex.client_ip or ex.peer_ip,
            "path": ex.path,
        }
        if peer is not None:
            fields["subject"] = peer.dn.decode("ascii")
            fields["serial"] = format(peer.serial, "x")
        self.audit("client_cert_refused", fields)
        if result == "none":
            metrics.client_cert_checks.labels(result="none").inc()
            text = _NEEDED
        else:
            text = message + ". Ask your administrator for a new certificate."
        code = "client_cert_required" if result == "none" else "client_cert_invalid"
        return error_reply(403, code, text, html=ex.wants_html())

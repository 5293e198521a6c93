"""A trace for client certificates refused during the TLS handshake.

OpenSSL checks the chain at the handshake; when it fails, asyncio closes the connection without
telling the application anything. The context's message callback sees the TLS messages
themselves: the client's Certificate message (kept, unparsed, per connection) and the fatal
alert we send back. Each refusal becomes an audit line (with the certificate's subject and
serial when one was sent) and a metric. The peer address is not known at this layer.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from cryptography import x509

from garrison.observe import metrics

ALERTS = {
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    49: "access_denied",
    116: "certificate_required",
}
MAX_PENDING = 512

AuditHook = Callable[[str, dict[str, object]], None]


class HandshakeTracer:
    """Install with `install(ctx)`; `audit(event, fields)` is called for every refusal."""

    def __init__(self, audit: AuditHook) -> None:
        self.audit = audit
        self._certs: dict[int, bytes] = {}

    def install(self, ctx: ssl.SSLContext) -> None:
        ctx._msg_callback = self._on_message  # type: ignore[attr-defined]

    def _on_message(
        self, conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: bytes
    ) -> None:
        if content_type == 22 and msg_type == 11 and direction == "read":  # Certificate
            if len(self._certs) >= MAX_PENDING:
                self._certs.clear()
            self._certs[id(conn)] = bytes(data)
            return
        if content_type != 21 or direction != "write" or len(data) < 2 or data[0] != 2:
            return  # only fatal alerts we send
        raw = self._certs.pop(id(conn), None)
        reason = ALERTS.get(data[1], f"alert_{data[1]}")
        metrics.client_cert_checks.labels(result=f"handshake_{reason}").inc()
        fields: dict[str, object] = {"reason": reason, "stage": "tls_handshake"}
        fields.update(_first_cert(raw))
        self.audit("client_cert_refused", fields)


def _first_cert(message: bytes | None) -> dict[str, object]:
    """Subject and serial of the first certificate in a Certificate message (TLS 1.2 or 1.3)."""
    if not message or len(message) <= 7:
        return {"certificate": "none"}
    message = message[4:]  # the handshake header: type (11) and a 3-byte length
    for offset in (_tls13_offset(message), 3):
        if offset is None or len(message) < offset + 3:
            continue
        length = int.from_bytes(message[offset : offset + 3], "big")
        der = message[offset + 3 : offset + 3 + length]
        try:
            cert = x509.load_der_x509_certificate(der)
            return {
                "subject": cert.subject.rfc4514_string()[:256],
                "serial": format(cert.serial_number, "x"),
                "issuer": cert.issuer.rfc4514_string()[:256],
            }
        except ValueError:
            continue
    return {"certificate": "unparsable"}


def _tls13_offset(message: bytes) -> int | None:
    """TLS 1.3: a request context (length byte + bytes) precedes the 3-byte list length."""
    if not message:
        return None
    return 1 + message[0] + 3

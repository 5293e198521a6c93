"""Client certificates from the admin service: list, issue (with a .p12), revoke, renew.

Issuing and renewing sign with the internal CA whose key this gateway process loaded at
start; the store row (with its change notice) is committed before the PKCS#12 file exists,
as with `garrison cert`, and revocations reach every worker's list and the CRL through the
same notices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from garrison.admin.base import ServiceBase
from garrison.admin.errors import AdminError, cert_days, p12_secret
from garrison.admin.views import CertView
from garrison.auth.identity import Identity
from garrison.pki.client_certs import ClientCerts, IssuedCert, P12Error, export_p12, parse_serial


def _cert_view(cert: IssuedCert, now: float) -> CertView:
    return CertView(
        serial=cert.serial_hex,
        name=cert.name,
        roles=list(cert.roles),
        not_before=cert.not_before,
        not_after=cert.not_after,
        status=cert.status(now),
        fingerprint=cert.fingerprint,
        email=cert.email,
        revoked_at=cert.revoked_at,
        revoke_reason=cert.revoke_reason,
        replaced_by=cert.replaced_by,
    )


class CertAdmin(ServiceBase):
    """The certificate half of AdminService."""

    def _certs(self) -> ClientCerts:
        return ClientCerts(self.auth.engine, self.ca)  # type: ignore[arg-type]  # reads only

    def _issuer(self) -> ClientCerts:
        if not self.ca_usable:
            raise AdminError(
                409,
                "ca_unavailable",
                "client certificates cannot be issued here: [client_certs] uses an external "
                "CA; issue them with that CA",
            )
        return ClientCerts(self.auth.engine, self.ca)  # type: ignore[arg-type]

    # -- client certificates --------------------------------------------------------------------
    async def list_certs(self) -> list[CertView]:
        certs = await self._run(lambda: self._certs().list())
        now = time.time()
        return [_cert_view(c, now) for c in certs]

    async def issue_cert(
        self,
        actor: Identity,
        name: str,
        roles: Sequence[str] = (),
        days: int | None = None,
        p12_password: str = "",
        email: str | None = None,
    ) -> tuple[CertView, bytes]:
        """A new certificate and its PKCS#12 file (AES-256, with the CA), handed out once."""
        issuer = self._issuer()
        password = p12_secret(p12_password)
        lifetime = cert_days(days)

        def issue() -> tuple[IssuedCert, bytes]:
            record, cert_pem, key_pem = issuer.issue(name, email=email, roles=roles, days=lifetime)
            return record, _bundle(issuer, name, cert_pem, key_pem, password)

        record, p12 = await self._run(issue)
        self._cert_event(actor, "cert_issued", record)
        return _cert_view(record, time.time()), p12

    async def revoke_cert(
        self, actor: Identity, serial: str, reason: str = "unspecified"
    ) -> CertView:
        """Revoke one certificate by serial; the CRL and every worker's list follow."""
        certs = self._certs()

        def revoke() -> tuple[IssuedCert, list[IssuedCert]]:
            record = _by_serial(certs, serial)
            if certs.get(record.serial_hex).name == record.serial_hex:
                # ClientCerts.revoke reads a name first: one spelled like this serial would
                # be revoked instead. Refuse rather than guess.
                raise AdminError(
                    409, "ambiguous", "a certificate is named like this serial: use the CLI"
                )
            return record, certs.revoke(record.serial_hex, reason)

        record, changed = await self._run(revoke)
        for cert in changed:
            self._cert_event(actor, "cert_revoked", cert, reason=reason)
        current = changed[0] if changed else record
        return _cert_view(current, time.time())

    async def renew_cert(
        self, actor: Identity, serial: str, p12_password: str, days: int | None = None
    ) -> tuple[CertView, bytes]:
        """A new certificate with the same identity; the old one is revoked (superseded)."""
        issuer = self._issuer()
        password = p12_secret(p12_password)
        lifetime = cert_days(days)

        def renew() -> tuple[IssuedCert, bytes]:
            old = _by_serial(issuer, serial)
            if issuer.get(old.name).serial != old.serial:
                raise AdminError(409, "cert_not_newest", "renew the newest certificate of a name")
            record, cert_pem, key_pem = issuer.renew(old.name, days=lifetime)
            return record, _bundle(issuer, old.name, cert_pem, key_pem, password)

        record, p12 = await self._run(renew)
        self._cert_event(actor, "cert_renewed", record, grace_s=0)
        return _cert_view(record, time.time()), p12

    def _cert_event(self, actor: Identity, event: str, record: IssuedCert, **extra: object) -> None:
        fields: dict[str, object] = {
            "name": record.name,
            "serial": record.serial_hex,
            "roles": list(record.roles),
            "email": record.email,
            "until": int(record.not_after),
            **extra,
        }
        self._event(actor, event, fields)


def _by_serial(certs: ClientCerts, serial: str) -> IssuedCert:
    number = parse_serial(serial)
    record = certs.known(number) if number is not None else None
    if record is None:
        raise AdminError(404, "cert_not_found", f"no client certificate with serial {serial!r}")
    return record


def _bundle(
    certs: ClientCerts, name: str, cert_pem: bytes, key_pem: bytes, password: bytes
) -> bytes:
    try:
        return export_p12(cert_pem, key_pem, password, name, certs.ca.cert_pem())
    except P12Error as exc:
        raise AdminError(422, "invalid", str(exc)) from None

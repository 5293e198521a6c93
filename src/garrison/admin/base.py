"""The admin service's plumbing: what it is built from, store calls in a thread, audit events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from garrison.admin.errors import cert_error, key_error, user_error
from garrison.auth.apikeys import ApiKeyError
from garrison.auth.identity import Identity
from garrison.auth.service import AuthService
from garrison.auth.users import UserError
from garrison.config import Config
from garrison.observe.audit import AuditLog
from garrison.pki.ca import CertificateAuthority
from garrison.pki.client_certs import CertError

T = TypeVar("T")


class ServiceBase:
    """One per runtime generation; holds no state of its own beyond what it was built from."""

    def __init__(
        self,
        auth: AuthService,
        audit: AuditLog,
        config: Config,
        ca: CertificateAuthority | None = None,
    ) -> None:
        self.auth = auth
        self.audit = audit
        self.config = config
        self.ca = ca
        # Issuing needs the internal CA's key, loaded in this process; with an external CA
        # for client certificates, certificates from ours would not be accepted anyway.
        self.ca_usable = ca is not None and config.client_certs.ca == "internal"

    # -- plumbing -------------------------------------------------------------------------------
    @staticmethod
    async def _run(call: Callable[[], T]) -> T:
        """Store work in a thread; the stores' refusals become AdminErrors."""
        try:
            return await asyncio.to_thread(call)
        except UserError as exc:
            raise user_error(exc) from None
        except ApiKeyError as exc:
            raise key_error(exc) from None
        except CertError as exc:
            raise cert_error(exc) from None

    def _event(self, actor: Identity, name: str, fields: dict[str, object]) -> None:
        self.audit.event(name, {**fields, "by": f"admin:{actor.name}", "auth": actor.method})

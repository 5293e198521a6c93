"""One ACME order, from a fresh certificate key to the downloaded chain (RFC 8555 §7.4).

Runs synchronously (certbot's `acme` client uses requests); the gateway calls it in a thread.
HTTP-01 tokens go into the shared ChallengeStore for the plain-HTTP listener to serve, and are
removed again whatever happens.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from acme import challenges, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from garrison.acme.account import Account, AcmeError, describe
from garrison.acme.challenges import ChallengeStore

ORDER_TIMEOUT = dt.timedelta(seconds=120)


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate


def new_key_pem() -> bytes:
    """A fresh P-256 key per certificate: a renewal never reuses the old key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def obtain(account: Account, names: list[str], store: ChallengeStore) -> Issued:
    """Order a certificate for `names`, answer HTTP-01 for each, finalize, download."""
    key_pem = new_key_pem()
    csr_pem = crypto_util.make_csr(key_pem, names)
    acme = account.client
    tokens: list[str] = []
    try:
        try:
            order = acme.new_order(csr_pem)
        except Exception as exc:
            raise AcmeError(f"new order for {', '.join(names)} refused: {describe(exc)}") from None
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA reuses a recent validation
            challb = _http01(authz)
            response, validation = challb.chall.response_and_validation(account.key)
            store.put(challb.chall.encode("token"), validation)
            tokens.append(challb.chall.encode("token"))
            try:
                acme.answer_challenge(challb, response)
            except Exception as exc:
                raise AcmeError(
                    f"{authz.body.identifier.value}: answering HTTP-01 failed: {describe(exc)}"
                ) from None
        deadline = dt.datetime.now() + ORDER_TIMEOUT
        try:
            done = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as exc:
            raise AcmeError(_validation_message(exc), "validation") from None
        except errors.TimeoutError:
            raise AcmeError(
                f"the ACME order for {', '.join(names)} did not complete within "
                f"{int(ORDER_TIMEOUT.total_seconds())} s",
                "timeout",
            ) from None
        except AcmeError:
            raise
        except Exception as exc:
            raise AcmeError(f"finalizing the order failed: {describe(exc)}") from None
    finally:
        for token in tokens:
            store.remove(token)
    chain_pem = done.fullchain_pem.encode()
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise AcmeError("the ACME server returned no valid PEM certificate chain") from None
    return Issued(chain_pem, key_pem, leaf)


def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, challenges.HTTP01):
            return challb
    raise AcmeError(
        f"{authz.body.identifier.value}: the ACME server offers no HTTP-01 challenge "
        "(only HTTP-01 is supported)",
        "validation",
    )


def _validation_message(exc: errors.ValidationError) -> str:
    """Name each failed identifier with the CA's reason (what the validator saw)."""
    parts = []
    for authzr in exc.failed_authzrs:
        reasons = [
            describe(challb.error) for challb in authzr.body.challenges if challb.error is not None
        ]
        name = authzr.body.identifier.value
        parts.append(f"{name}: {'; '.join(reasons) or 'authorization ' + str(authzr.body.status)}")
    return "HTTP-01 validation failed: " + " | ".join(parts)


def revoke(account: Account, leaf: x509.Certificate, reason: int = 0) -> None:
    try:
        account.client.revoke(leaf, reason)
    except Exception as exc:
        raise AcmeError(f"revocation refused: {describe(exc)}") from None

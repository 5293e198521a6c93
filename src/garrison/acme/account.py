"""The ACME account: one key and one registration per directory URL, created once.

The key is the account's only credential (whoever holds it can revoke our certificates), so it
is written 0600 atomically under a lock, and reused for every later order. Staging and
production, or Pebble and Let's Encrypt, are different CAs with different accounts: the
directory URL picks the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy as jose
import requests
from acme import client, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from garrison.fsutil import FileLock, atomic_write, ensure_private_dir

log = logging.getLogger("garrison")
USER_AGENT = "garrison-acme"
NETWORK_TIMEOUT = 30


class AcmeError(Exception):
    """An ACME step failed; the message says which step, which name and the CA's reason."""

    def __init__(self, message: str, reason: str = "acme") -> None:
        super().__init__(message)
        self.reason = reason  # a fixed word for the metric label: connection, validation, ...


@dataclass(frozen=True)
class Account:
    client: client.ClientV2
    key: jose.JWK
    uri: str
    created: bool


def account_dir(data_dir: Path, directory_url: str) -> Path:
    digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
    return Path(data_dir) / "acme" / "accounts" / digest


def _load_or_create_key(folder: Path) -> tuple[jose.JWK, bool]:
    path = folder / "account.key"
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise AcmeError(f"ACME account key {path} is unreadable: {exc}", "account") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"ACME account key {path} is not an EC key", "account")
        return jose.JWKEC(key=key), False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem, 0o600)
    return jose.JWKEC(key=key), True


BAD_NONCE_RETRIES = 16


class Network(client.ClientNetwork):
    """certbot's ClientNetwork, retrying a rejected nonce more than once.

    RFC 8555 §6.5 lets a server reject any nonce (badNonce, with a fresh one in the answer);
    the library retries once, which fails an order of a dozen requests often enough against a
    server that rejects many (Pebble's default is 5%, Boulder under load more).
    """

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
                log.debug("ACME server rejected a nonce (badNonce); retrying with a fresh one")
        return self._post_once(*args, **kwargs)


def network(key: jose.JWK | None, ca_bundle: str) -> client.ClientNetwork:
    """HTTPS to the CA, verified against the system store or the configured bundle."""
    return Network(
        key,
        alg=jose.ES256,
        verify_ssl=ca_bundle or True,  # type: ignore[arg-type]  # requests takes a path too
        user_agent=USER_AGENT,
        timeout=NETWORK_TIMEOUT,
    )


def directory(directory_url: str, ca_bundle: str, key: jose.JWK | None = None) -> client.ClientV2:
    net = network(key, ca_bundle)
    try:
        return client.ClientV2(client.ClientV2.get_directory(directory_url, net), net)
    except (OSError, ValueError, errors.Error, messages.Error) as exc:
        raise AcmeError(
            f"cannot read the ACME directory {directory_url}: {describe(exc)}", "connection"
        ) from None
    except Exception as exc:  # requests' exceptions, JSON errors: never a traceback
        raise AcmeError(
            f"cannot read the ACME directory {directory_url}: {describe(exc)}", "connection"
        ) from None


def open_account(
    data_dir: Path, directory_url: str, email: str, ca_bundle: str, *, store: bool = True
) -> Account:
    """The client for `directory_url`, logged in with our account (registered on first use).

    With store=False (dry run) nothing is written: an existing account is used, else a
    throwaway key registers a throwaway account.
    """
    folder = account_dir(data_dir, directory_url)
    if store:
        ensure_private_dir(folder.parent.parent)  # data_dir/acme: keys below, 0700
        ensure_private_dir(folder.parent)
        ensure_private_dir(folder)
        with FileLock(folder / ".lock"):
            key, created = _load_or_create_key(folder)
            return _register(folder, key, created, directory_url, email, ca_bundle, store)
    if (folder / "account.key").exists():
        key, created = _load_or_create_key(folder)
    else:
        key, created = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1())), True
    return _register(folder, key, created, directory_url, email, ca_bundle, store)


def _register(
    folder: Path,
    key: jose.JWK,
    created: bool,
    directory_url: str,
    email: str,
    ca_bundle: str,
    store: bool,
) -> Account:
    acme = directory(directory_url, ca_bundle, key)
    record = folder / "account.json"
    uri = None
    if record.exists():
        try:
            uri = json.loads(record.read_text())["uri"]
        except (OSError, ValueError, KeyError, TypeError):
            uri = None
    if uri is not None:
        acme.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        return Account(acme, key, uri, False)
    contact = messages.NewRegistration.from_data(email=email or None, terms_of_service_agreed=True)
    try:
        regr = acme.new_account(contact)
    except errors.ConflictError as exc:  # the key is known to the CA: log in as that account
        regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        acme.net.account = regr
    except Exception as exc:
        raise AcmeError(f"ACME account registration failed: {describe(exc)}", "account") from None
    if store:
        atomic_write(record, json.dumps({"uri": regr.uri, "directory": directory_url}).encode())
    return Account(acme, key, regr.uri, created)


def describe(exc: BaseException) -> str:
    """A one-line reason: the CA's problem document when there is one, else the exception."""
    if isinstance(exc, messages.Error):
        detail = exc.detail or exc.description or ""
        code = exc.code or exc.typ
        return f"{detail} ({code})" if detail else str(code)
    text = str(exc).strip() or type(exc).__name__
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:  # requests nests the socket error three levels deep; say only that
        return f"connection failed: {errno.group(1).strip()}"
    return text.splitlines()[0][:500]

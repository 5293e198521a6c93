"""`garrison ca ...`: the private CA (init, show, export, crl)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click
from sqlalchemy.exc import SQLAlchemyError

from garrison.cli.options import data_dir_option
from garrison.fsutil import atomic_write, ensure_private_dir
from garrison.gateway import ca_passphrase, resolve_data_dir
from garrison.pki.ca import CAError, CertificateAuthority, read_passphrase_file
from garrison.store.db import default_url, open_store

PASSPHRASE_FILE_ENV = "GARRISON_CA_PASSPHRASE_FILE"

passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"File holding the CA key passphrase (default: ${PASSPHRASE_FILE_ENV}, "
    "else $GARRISON_CA_PASSPHRASE).",
)


@click.group()
def ca() -> None:
    """The private certificate authority."""


def _fail(message: str) -> NoReturn:
    click.echo(f"garrison: {message}", err=True)
    sys.exit(1)


def load_ca(data_dir: Path | None, passphrase_file: Path | None = None) -> CertificateAuthority:
    """Load (or create once) the CA, exiting 1 with a message on any failure.

    The passphrase comes from --passphrase-file, else $GARRISON_CA_PASSPHRASE_FILE, else
    $GARRISON_CA_PASSPHRASE: a file keeps it out of the environment of every child process.
    """
    try:
        path = passphrase_file or (
            Path(os.environ[PASSPHRASE_FILE_ENV]) if os.environ.get(PASSPHRASE_FILE_ENV) else None
        )
        passphrase = read_passphrase_file(path) if path is not None else ca_passphrase()
        return CertificateAuthority.load_or_create(resolve_data_dir(data_dir), passphrase)
    except CAError as exc:
        _fail(str(exc))


@ca.command("export")
@data_dir_option
@passphrase_file_option
def export(data_dir: Path | None, passphrase_file: Path | None) -> None:
    """Print the CA certificate (PEM), for clients to trust."""
    sys.stdout.buffer.write(load_ca(data_dir, passphrase_file).cert_pem())


@ca.command("init")
@data_dir_option
@passphrase_file_option
def init(data_dir: Path | None, passphrase_file: Path | None) -> None:
    """Create the CA now (garrison up does it on first start).

    With a passphrase the CA key is encrypted at rest; every later command needs the same
    passphrase (file or environment).
    """
    authority = load_ca(data_dir, passphrase_file)
    click.echo(f"CA ready: {authority.cert_path}")


@ca.command("show")
@data_dir_option
@passphrase_file_option
def show(data_dir: Path | None, passphrase_file: Path | None) -> None:
    """Subject, fingerprint and expiry of the CA."""
    authority = load_ca(data_dir, passphrase_file)
    cert = authority.cert
    click.echo(f"subject:     {cert.subject.rfc4514_string()}")
    click.echo(f"fingerprint: SHA256 {authority.fingerprint_sha256()}")
    click.echo(f"expires:     {cert.not_valid_after_utc:%Y-%m-%d %H:%M UTC}")
    click.echo(f"file:        {authority.cert_path}")


@ca.command("crl")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the CRL to this file (atomically) instead of stdout.",
)
@data_dir_option
@passphrase_file_option
def crl(out: Path | None, data_dir: Path | None, passphrase_file: Path | None) -> None:
    """The current CRL of client certificates (PEM), valid for one day."""
    from garrison.pki.client_certs import ClientCerts

    authority = load_ca(data_dir, passphrase_file)
    try:
        engine = open_store(default_url(ensure_private_dir(resolve_data_dir(data_dir))))
    except (OSError, SQLAlchemyError) as exc:
        _fail(f"cannot open the store: {exc}")
    try:
        pem = ClientCerts(engine, authority).crl()
    except SQLAlchemyError as exc:
        _fail(f"store error: {exc}")
    finally:
        engine.dispose()
    if out is None:
        sys.stdout.buffer.write(pem)
        return
    try:
        atomic_write(out, pem, 0o644)
    except OSError as exc:
        _fail(f"cannot write {out}: {exc}")
    click.echo(f"CRL written: {out}", err=True)

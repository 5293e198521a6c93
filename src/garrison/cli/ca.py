"""`garrison ca ...`: the private CA (init, show, export)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from garrison.cli.options import data_dir_option
from garrison.gateway import ca_passphrase, resolve_data_dir
from garrison.pki.ca import CAError, CertificateAuthority


@click.group()
def ca() -> None:
    """The private certificate authority."""


def _load(data_dir: Path | None) -> CertificateAuthority:
    try:
        return CertificateAuthority.load_or_create(resolve_data_dir(data_dir), ca_passphrase())
    except CAError as exc:
        click.echo(f"garrison: {exc}", err=True)
        sys.exit(1)


@ca.command("export")
@data_dir_option
def export(data_dir: Path | None) -> None:
    """Print the CA certificate (PEM), for clients to trust."""
    sys.stdout.buffer.write(_load(data_dir).cert_pem())


@ca.command("init")
@data_dir_option
def init(data_dir: Path | None) -> None:
    """Create the CA now (garrison up does it on first start)."""
    authority = _load(data_dir)
    click.echo(f"CA ready: {authority.cert_path}")


@ca.command("show")
@data_dir_option
def show(data_dir: Path | None) -> None:
    """Subject, fingerprint and expiry of the CA."""
    authority = _load(data_dir)
    cert = authority.cert
    click.echo(f"subject:     {cert.subject.rfc4514_string()}")
    click.echo(f"fingerprint: SHA256 {authority.fingerprint_sha256()}")
    click.echo(f"expires:     {cert.not_valid_after_utc:%Y-%m-%d %H:%M UTC}")
    click.echo(f"file:        {authority.cert_path}")

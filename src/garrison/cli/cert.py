"""`garrison cert ...`: client certificates from the internal CA (issue 4).

Files are written only after the store has recorded the certificate, each one atomically
(temp file, fsync, rename), key and bundle 0600; NAME.crt is written last, so a complete
NAME.crt means the set is complete. A kill at any point leaves either no file or a whole one
(plus, at worst, a store row for a certificate nobody holds; see pki/client_certs.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click
from sqlalchemy.exc import SQLAlchemyError

from garrison.cli.ca import load_ca, passphrase_file_option
from garrison.cli.options import data_dir_option
from garrison.config import parse_duration
from garrison.fsutil import atomic_write, ensure_private_dir
from garrison.gateway import resolve_data_dir
from garrison.observe.audit import cli_event
from garrison.pki.client_certs import (
    NAME_RE,
    REVOCATION_REASONS,
    CertError,
    ClientCerts,
    IssuedCert,
    P12Error,
    export_p12,
)
from garrison.store.db import default_url, open_store


@click.group()
def cert() -> None:
    """Client certificates (mutual TLS) from the internal CA."""


def _fail(message: str) -> NoReturn:
    click.echo(f"garrison: {message}", err=True)
    sys.exit(1)


@contextmanager
def _certs(data_dir: Path | None, passphrase_file: Path | None) -> Iterator[ClientCerts]:
    """CA and store for one command; refusals and database errors end it with exit 1."""
    authority = load_ca(data_dir, passphrase_file)
    try:
        engine = open_store(default_url(ensure_private_dir(resolve_data_dir(data_dir))))
    except (OSError, SQLAlchemyError) as exc:
        _fail(f"cannot open the store: {exc}")
    try:
        yield ClientCerts(engine, authority)
    except CertError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"store error: {exc}")
    finally:
        engine.dispose()


def _when(ts: float | None, empty: str = "-") -> str:
    if ts is None:
        return empty
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(option: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


def _read_password(path: Path | None) -> bytes | None:
    """First line of the password file; an empty password would protect nothing."""
    if path is None:
        return None
    try:
        password = path.read_bytes().split(b"\n", 1)[0].rstrip(b"\r")
    except OSError as exc:
        _fail(f"cannot read password file {path}: {exc}")
    if not password:
        _fail(f"password file {path} is empty")
    return password


def _targets(name: str, out: Path, password: bytes | None, p12_only: bool) -> dict[str, Path]:
    """The files this command will write, in write order (the certificate last)."""
    if p12_only and password is None:
        _fail("--p12-only needs --p12-password-file")
    if not NAME_RE.fullmatch(name):
        _fail(f"invalid name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    paths: dict[str, Path] = {}
    if password is not None:
        paths["p12"] = out / f"{name}.p12"
    if not p12_only:
        paths["key"] = out / f"{name}.key"
    paths["crt"] = out / f"{name}.crt"
    return paths


def _refuse_existing(paths: dict[str, Path], force: bool) -> None:
    """Checked before issuing, so a refusal leaves no store row behind."""
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        _fail(f"{', '.join(existing)} already exist(s): use --force to overwrite")


def _write(
    paths: dict[str, Path],
    name: str,
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    password: bytes | None,
) -> None:
    try:
        if password is not None:
            atomic_write(paths["p12"], export_p12(cert_pem, key_pem, password, name, ca_pem), 0o600)
        if "key" in paths:
            atomic_write(paths["key"], key_pem, 0o600)
        atomic_write(paths["crt"], cert_pem, 0o644)
    except (OSError, P12Error) as exc:
        _fail(f"cannot write the certificate files: {exc}")


def _report(verb: str, record: IssuedCert, paths: dict[str, Path]) -> None:
    roles = ",".join(record.roles) or "-"
    click.echo(
        f"{verb} client certificate {record.name} serial={record.serial_hex} "
        f"roles={roles} expires={_when(record.not_after)}"
    )
    for path in paths.values():
        click.echo(f"  {path}")


def _audit(data_dir: Path | None, event: str, record: IssuedCert, **extra: object) -> None:
    """An audit line for a certificate change (never the key or the PKCS#12 password)."""
    fields: dict[str, object] = {
        "name": record.name,
        "serial": record.serial_hex,
        "roles": list(record.roles),
        "email": record.email,
        "until": int(record.not_after),
        **extra,
    }
    cli_event(resolve_data_dir(data_dir), event, fields)


def _out_dir(out: Path | None) -> Path:
    directory = Path.cwd() if out is None else out
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"cannot create {directory}: {exc}")
    return directory


out_option = click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for NAME.crt, NAME.key, NAME.p12 (default: current directory).",
)
p12_option = click.option(
    "--p12-password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Also write NAME.p12 (AES-256), encrypted with the first line of this file.",
)
p12_only_option = click.option(
    "--p12-only", is_flag=True, help="Write NAME.p12 and NAME.crt but no loose NAME.key."
)
force_option = click.option("--force", is_flag=True, help="Overwrite existing files.")
days_option = click.option(
    "--days", type=click.IntRange(min=1), default=365, show_default=True, help="Validity."
)


@cert.command("issue")
@click.argument("name")
@click.option("--email", default=None, help="Email address (an rfc822Name SAN).")
@click.option("--role", "roles", multiple=True, help="Repeat for each role.")
@days_option
@out_option
@p12_option
@p12_only_option
@force_option
@data_dir_option
@passphrase_file_option
def issue(
    name: str,
    email: str | None,
    roles: tuple[str, ...],
    days: int,
    out: Path | None,
    p12_password_file: Path | None,
    p12_only: bool,
    force: bool,
    data_dir: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Issue a client certificate for NAME and write its files."""
    password = _read_password(p12_password_file)
    paths = _targets(name, _out_dir(out), password, p12_only)
    _refuse_existing(paths, force)
    with _certs(data_dir, passphrase_file) as certs:
        record, cert_pem, key_pem = certs.issue(name, email=email, roles=roles, days=days)
        ca_pem = certs.ca.cert_pem()
    _audit(data_dir, "cert_issued", record)
    _write(paths, name, cert_pem, key_pem, ca_pem, password)
    _report("issued", record, paths)


@cert.command("list")
@click.option("--expiring", default=None, help="Only those expiring within e.g. 30d.")
@data_dir_option
@passphrase_file_option
def list_certs(expiring: str | None, data_dir: Path | None, passphrase_file: Path | None) -> None:
    """Issued client certificates and their status."""
    window = None if expiring is None else _duration("--expiring", expiring)
    with _certs(data_dir, passphrase_file) as certs:
        records = certs.list(expiring_within=window)
    if not records:
        click.echo("no client certificates", err=True)
        return
    now = time.time()
    header = ("NAME", "SERIAL", "EXPIRES", "STATUS", "ROLES")
    rows = [header] + [
        (r.name, r.serial_hex, _when(r.not_after), r.status(now), ",".join(r.roles) or "-")
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@cert.command("revoke")
@click.argument("name_or_serial", metavar="NAME|SERIAL")
@click.option(
    "--reason",
    type=click.Choice(list(REVOCATION_REASONS)),
    default="unspecified",
    show_default=True,
)
@data_dir_option
@passphrase_file_option
def revoke(
    name_or_serial: str, reason: str, data_dir: Path | None, passphrase_file: Path | None
) -> None:
    """Revoke one certificate (SERIAL) or every live certificate of NAME, at once."""
    with _certs(data_dir, passphrase_file) as certs:
        changed = certs.revoke(name_or_serial, reason)
    for record in changed:
        _audit(data_dir, "cert_revoked", record, reason=reason)
    if not changed:
        click.echo(f"nothing to revoke: {name_or_serial} is already revoked or expired", err=True)
    for record in changed:
        click.echo(f"revoked {record.name} serial={record.serial_hex} reason={reason}")


@cert.command("renew")
@click.argument("name")
@click.option("--grace", default="0", show_default=True, help="How long the old cert still works.")
@days_option
@out_option
@p12_option
@p12_only_option
@data_dir_option
@passphrase_file_option
def renew(
    name: str,
    grace: str,
    days: int,
    out: Path | None,
    p12_password_file: Path | None,
    p12_only: bool,
    data_dir: Path | None,
    passphrase_file: Path | None,
) -> None:
    """Issue NAME a new certificate; the old one is revoked (superseded) after --grace.

    Existing files of NAME are replaced: they hold the certificate being superseded.
    """
    grace_seconds = _duration("--grace", grace)
    password = _read_password(p12_password_file)
    paths = _targets(name, _out_dir(out), password, p12_only)
    with _certs(data_dir, passphrase_file) as certs:
        record, cert_pem, key_pem = certs.renew(name, grace_seconds=grace_seconds, days=days)
        ca_pem = certs.ca.cert_pem()
    _audit(data_dir, "cert_renewed", record, grace_s=int(grace_seconds))
    _write(paths, name, cert_pem, key_pem, ca_pem, password)
    _report("renewed", record, paths)
    if grace_seconds > 0:
        click.echo(f"the old certificate works until {_when(time.time() + grace_seconds)}")
    else:
        click.echo("the old certificate is revoked")

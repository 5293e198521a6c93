"""`garrison key ...`: scoped API keys (issue 3).

A new key goes alone to stdout, one line, so `KEY=$(garrison key create ...)` captures exactly
the key while the explanation reaches the terminal on stderr.
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

from garrison.auth.apikeys import ApiKeyError, ApiKeys
from garrison.cli.options import data_dir_option
from garrison.config import parse_duration
from garrison.fsutil import ensure_private_dir
from garrison.gateway import resolve_data_dir
from garrison.observe.audit import cli_event
from garrison.store.db import default_url, open_store


@click.group()
def key() -> None:
    """API keys for scripts and SDKs."""


def _fail(message: str) -> NoReturn:
    click.echo(f"garrison: {message}", err=True)
    sys.exit(1)


@contextmanager
def _keys(data_dir: Path | None) -> Iterator[ApiKeys]:
    """Open the store for one command; refusals and database errors end it with exit 1."""
    try:
        engine = open_store(default_url(ensure_private_dir(resolve_data_dir(data_dir))))
    except (OSError, SQLAlchemyError) as exc:
        _fail(f"cannot open the store: {exc}")
    try:
        yield ApiKeys(engine)
    except ApiKeyError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        _fail(f"store error: {exc}")
    finally:
        engine.dispose()


def _duration(option: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


def _when(ts: float | None, empty: str = "-") -> str:
    if ts is None:
        return empty
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@key.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, help="Repeat for each scope.")
@click.option("--expires", default=None, help="Lifetime such as 30d or 12h (default: none).")
@click.option("--owner", default=None, help="User the key acts for.")
@click.option(
    "--rate", "rates", multiple=True, help="Rate for this key, e.g. 60/minute (repeatable)."
)
@click.option("--tokens", default=None, help="LLM token budget for this key, e.g. 1e6/day.")
@data_dir_option
def create(
    name: str,
    scopes: tuple[str, ...],
    expires: str | None,
    owner: str | None,
    rates: tuple[str, ...],
    tokens: str | None,
    data_dir: Path | None,
) -> None:
    """Create a key and print it once on stdout."""
    expires_in = _duration("--expires", expires)
    with _keys(data_dir) as keys:
        record, full_key = keys.create(
            name, scopes, expires_in=expires_in, owner=owner, rate=rates or None, tokens=tokens
        )
    cli_event(
        resolve_data_dir(data_dir),
        "key_created",
        {
            "key_id": record.id,
            "key_name": record.name,
            "owner": record.owner,
            "scopes": list(record.scopes),
            "expires": int(record.expires_at) if record.expires_at else None,
            "rate": list(record.rate or ()),
            "tokens": record.tokens,
        },
    )
    click.echo(full_key)
    click.echo(
        f"created API key {record.id} ({record.name}) scopes={','.join(record.scopes)} "
        f"owner={record.owner or '-'} expires={_when(record.expires_at, 'never')}",
        err=True,
    )
    click.echo("the key above is shown only once: store it now", err=True)


@key.command("list")
@data_dir_option
def list_keys(data_dir: Path | None) -> None:
    """All keys with their status and last use (never a secret)."""
    with _keys(data_dir) as keys:
        records = keys.list()
    if not records:
        click.echo("no API keys", err=True)
        return
    now = time.time()
    header = ("ID", "NAME", "OWNER", "SCOPES", "EXPIRES", "STATUS", "LAST USED")
    rows = [header] + [
        (
            r.id,
            r.name,
            r.owner or "-",
            ",".join(r.scopes),
            _when(r.expires_at, "never"),
            r.status(now),
            _when(r.last_used_at, "never"),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@key.command("revoke")
@click.argument("key_id", metavar="ID")
@data_dir_option
def revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke a key at once (repeating it is harmless)."""
    with _keys(data_dir) as keys:
        record = keys.revoke(key_id)
    cli_event(
        resolve_data_dir(data_dir), "key_revoked", {"key_id": record.id, "key_name": record.name}
    )
    click.echo(f"revoked API key {record.id} ({record.name}) at {_when(record.revoked_at)}")


@key.command("rotate")
@click.argument("key_id", metavar="ID")
@click.option("--grace", default="0", show_default=True, help="How long the old key still works.")
@data_dir_option
def rotate(key_id: str, grace: str, data_dir: Path | None) -> None:
    """Give a key a new secret and print it once on stdout."""
    grace_seconds = _duration("--grace", grace) or 0.0
    with _keys(data_dir) as keys:
        full_key = keys.rotate(key_id, grace_seconds)
    cli_event(
        resolve_data_dir(data_dir),
        "key_rotated",
        {"key_id": key_id, "grace_s": int(grace_seconds)},
    )
    click.echo(full_key)
    if grace_seconds > 0:
        until = _when(time.time() + grace_seconds)
        click.echo(f"rotated API key {key_id}; the old key works until {until}", err=True)
    else:
        click.echo(f"rotated API key {key_id}; the old key no longer works", err=True)
    click.echo("the key above is shown only once: store it now", err=True)


@key.command("limits")
@click.argument("key_id", metavar="ID")
@click.option(
    "--rate", "rates", multiple=True, help="Rate for this key, e.g. 60/minute (repeatable)."
)
@click.option("--tokens", default=None, help="LLM token budget for this key, e.g. 1e6/day.")
@click.option("--clear", is_flag=True, help="Drop the key's own limits: the routes' apply.")
@data_dir_option
def limits(
    key_id: str, rates: tuple[str, ...], tokens: str | None, clear: bool, data_dir: Path | None
) -> None:
    """Set a key's own rates and token budget (they replace what it had)."""
    if clear == bool(rates or tokens):
        _fail("give --rate and/or --tokens, or --clear (not both)")
    with _keys(data_dir) as keys:
        record = keys.set_limits(key_id, rates or None, tokens)
    cli_event(
        resolve_data_dir(data_dir),
        "key_limits_changed",
        {
            "key_id": record.id,
            "key_name": record.name,
            "rate": list(record.rate or ()),
            "tokens": record.tokens,
        },
    )
    shown = ", ".join(
        [*(record.rate or ()), *([f"tokens {record.tokens}"] if record.tokens else [])]
    )
    click.echo(f"API key {record.id} ({record.name}) limits: {shown or 'those of its routes'}")

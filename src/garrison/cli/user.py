"""`garrison user ...`: accounts for browser login (issue 3).

A password is never printed or logged, except one we generated: that is printed once, alone
on stdout, so a script can capture it (`pw=$(garrison user add alice)`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click

from garrison.auth.passwords import generate_password
from garrison.auth.users import User, UserError, Users
from garrison.cli.options import data_dir_option
from garrison.fsutil import ensure_private_dir
from garrison.gateway import resolve_data_dir
from garrison.observe.audit import cli_event
from garrison.store.db import default_url, open_store

password_stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from stdin (one line) instead of generating and printing one.",
)


@click.group()
def user() -> None:
    """Users who log in from a browser."""


def _fail(message: str) -> None:
    click.echo(f"garrison: {message}", err=True)
    sys.exit(1)


@contextmanager
def _users(data_dir: Path | None) -> Iterator[Users]:
    """The account store in the data dir; a UserError inside becomes a message and exit 1."""
    directory = ensure_private_dir(resolve_data_dir(data_dir))
    engine = open_store(default_url(directory))
    try:
        yield Users(engine)
    except UserError as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


def _read_password() -> str:
    """One line from stdin; on a terminal, a hidden prompt asked twice instead."""
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True, err=True))
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def _status(account: User, now: float) -> str:
    if account.disabled:
        return "disabled"
    if account.locked(now) and account.locked_until is not None:
        until = datetime.fromtimestamp(account.locked_until, UTC)
        return f"locked until {until:%H:%M:%S} UTC"
    return "active"


@user.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, help="A role (repeatable).")
@click.option("--email", default=None, help="E-mail address, passed to the upstream.")
@password_stdin_option
@data_dir_option
def add(
    name: str,
    roles: tuple[str, ...],
    email: str | None,
    password_stdin: bool,
    data_dir: Path | None,
) -> None:
    """Create a user; without --password-stdin, print a generated password once."""
    password = _read_password() if password_stdin else generate_password()
    with _users(data_dir) as accounts:
        accounts.add(name, password, roles=roles, email=email)
    cli_event(
        resolve_data_dir(data_dir),
        "user_added",
        {"user": name, "roles": list(roles), "email": email},
    )
    if password_stdin:
        click.echo(f"added user {name!r}", err=True)
    else:
        click.echo(password)


@user.command("list")
@data_dir_option
def list_users(data_dir: Path | None) -> None:
    """Every user with roles, e-mail and status (active, disabled or locked)."""
    with _users(data_dir) as accounts:
        everyone = accounts.list()
    now = time.time()
    rows = [("NAME", "ROLES", "EMAIL", "STATUS")]
    rows += [(u.name, ",".join(u.roles) or "-", u.email or "-", _status(u, now)) for u in everyone]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        click.echo("  ".join([*cells, row[3]]))


@user.command("disable")
@click.argument("name")
@data_dir_option
def disable(name: str, data_dir: Path | None) -> None:
    """Refuse all logins by this user until enabled again."""
    with _users(data_dir) as accounts:
        accounts.disable(name)
    cli_event(resolve_data_dir(data_dir), "user_disabled", {"user": name})
    click.echo(f"disabled user {name!r}", err=True)


@user.command("enable")
@click.argument("name")
@data_dir_option
def enable(name: str, data_dir: Path | None) -> None:
    """Allow a disabled user to log in again."""
    with _users(data_dir) as accounts:
        accounts.enable(name)
    cli_event(resolve_data_dir(data_dir), "user_enabled", {"user": name})
    click.echo(f"enabled user {name!r}", err=True)


@user.command("passwd")
@click.argument("name")
@password_stdin_option
@data_dir_option
def passwd(name: str, password_stdin: bool, data_dir: Path | None) -> None:
    """Set a new password (and lift any lockout); without --password-stdin, print one once."""
    with _users(data_dir) as accounts:
        if accounts.get(name) is None:
            raise UserError(f"no such user {name!r}")
        password = _read_password() if password_stdin else generate_password()
        accounts.set_password(name, password)
    cli_event(resolve_data_dir(data_dir), "user_password_changed", {"user": name})
    if password_stdin:
        click.echo(f"password changed for {name!r}", err=True)
    else:
        click.echo(password)


@user.command("limits")
@click.argument("name")
@click.option("--rate", "rates", multiple=True, help="A rate such as 60/minute (repeatable).")
@click.option("--tokens", default=None, help="An LLM token budget such as 1e6/day.")
@click.option("--clear", is_flag=True, help="Back to the routes' own limits.")
@data_dir_option
def set_limits(
    name: str, rates: tuple[str, ...], tokens: str | None, clear: bool, data_dir: Path | None
) -> None:
    """Give a user their own rates and token budget, instead of the routes' ones."""
    if clear and (rates or tokens):
        _fail("use either --rate/--tokens or --clear, not both")
    if not clear and not rates and tokens is None:
        _fail("give --rate and/or --tokens, or --clear")
    with _users(data_dir) as accounts:
        accounts.set_limits(name, None if clear else rates, None if clear else tokens)
    cli_event(
        resolve_data_dir(data_dir),
        "user_limits_changed",
        {"user": name, "rate": list(rates), "tokens": tokens},
    )
    shown = "route defaults" if clear else f"rate={','.join(rates) or '-'} tokens={tokens or '-'}"
    click.echo(f"limits of {name!r}: {shown}", err=True)


@user.command("roles")
@click.argument("name")
@click.option("--set", "roles", multiple=True, help="A role (repeatable); replaces all roles.")
@click.option("--clear", is_flag=True, help="Remove all roles.")
@data_dir_option
def set_roles(name: str, roles: tuple[str, ...], clear: bool, data_dir: Path | None) -> None:
    """Replace a user's roles with the --set ones, or remove them all with --clear."""
    if clear and roles:
        _fail("use either --set or --clear, not both")
    if not clear and not roles:
        _fail("give at least one --set ROLE, or --clear to remove all roles")
    with _users(data_dir) as accounts:
        accounts.set_roles(name, () if clear else roles)
    cli_event(
        resolve_data_dir(data_dir), "user_roles_changed", {"user": name, "roles": list(roles)}
    )
    click.echo(f"roles of {name!r}: {','.join(roles) or '-'}", err=True)

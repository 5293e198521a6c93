"""`garrison acme issue|renew|status|revoke`: the ACME certificate from the command line.

The same AcmeManager as `garrison up` does the work, under the same lock, so the CLI and a
running gateway never order at once; the gateway notices the new files and serves them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from garrison import config as config_mod
from garrison.acme.account import AcmeError, open_account
from garrison.acme.issue import obtain, revoke
from garrison.acme.manager import AcmeManager
from garrison.acme.responder import standalone_responder
from garrison.acme.storage import iso, parse_iso, san_names
from garrison.cli.options import config_option, data_dir_option
from garrison.config import Config, ConfigError
from garrison.gateway import resolve_data_dir
from garrison.observe.audit import cli_event
from garrison.process import configure_logging


def _fail(message: str) -> NoReturn:
    click.echo(f"garrison: {message}", err=True)
    sys.exit(1)


def _fail_os(exc: OSError, config: Config) -> NoReturn:
    """A file in the data dir, or the HTTP-01 port, could not be used: say which and why."""
    where = exc.filename or f"{config.server.http_listen} (HTTP-01 listener)"
    _fail(f"cannot use {where}: {exc.strerror or exc}")


def _config(config_file: Path | None) -> Config:
    if config_file is None:
        raise click.UsageError("--config FILE is required (it holds [tls.acme])")
    try:
        config = config_mod.validate(config_mod.load_file(config_file))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        _fail("configuration is invalid")
    if config.tls.source != "acme":
        _fail('[tls] source is not "acme" in this configuration')
    return config


def _manager(config_file: Path | None, data_dir: Path | None) -> tuple[Config, AcmeManager]:
    configure_logging()
    config = _config(config_file)
    return config, AcmeManager(resolve_data_dir(data_dir), config.tls.acme)


def _audit(config: Config, manager: AcmeManager, event: str, **fields: object) -> None:
    """An audit line for what this command did (the gateway records its own renewals)."""
    cli_event(manager.data_dir, event, fields, config.audit)


@click.group()
def acme() -> None:
    """Public certificates from an ACME CA (Let's Encrypt, step-ca, ...)."""


def _run(config: Config, manager: AcmeManager, force: bool, source: str) -> None:
    assert config.server.http_listen is not None  # validated for source = "acme"
    try:
        with standalone_responder(config.server.http_listen, manager.challenges) as own:
            if not own:
                click.echo(
                    f"garrison: {config.server.http_listen} is in use; assuming the running "
                    "gateway answers the HTTP-01 challenge"
                )
            outcome = manager.ensure(force=force, source=source)
    except OSError as exc:
        _fail_os(exc, config)
    names = list(manager.config.names)
    if outcome.error:
        _audit(config, manager, "acme_failure", stage=source, names=names, error=outcome.error)
        _fail(f"ACME {source} failed: {outcome.error}")
    if outcome.renewed:
        state = manager.live.read_state()
        _audit(
            config,
            manager,
            "acme_certificate",
            stage=source,
            names=names,
            serial=state.serial,
            until=state.not_after,
        )
        click.echo(
            f"garrison: certificate for {', '.join(state.names)} stored in "
            f"{manager.live.chain_path}, valid until {state.not_after}"
        )
    else:
        click.echo(
            "garrison: the current certificate is valid; next renewal "
            f"{iso(outcome.next_check)} (use --force to renew now)"
        )


@acme.command()
@click.option("--dry-run", is_flag=True, help="Against the staging directory; nothing stored.")
@data_dir_option
@config_option
def issue(dry_run: bool, data_dir: Path | None, config_file: Path | None) -> None:
    """Obtain the certificate for [tls.acme] names (if none is valid yet)."""
    config, manager = _manager(config_file, data_dir)
    if dry_run:
        _dry_run(config, manager)
        return
    _run(config, manager, force=manager.usable() is None, source="issuance")


def _dry_run(config: Config, manager: AcmeManager) -> None:
    """A full order against the staging directory; the certificate is thrown away."""
    cfg = config.tls.acme
    url = cfg.dry_run_directory
    assert config.server.http_listen is not None
    try:
        with standalone_responder(config.server.http_listen, manager.challenges):
            account = open_account(manager.data_dir, url, cfg.email, cfg.ca_bundle, store=False)
            issued = obtain(account, list(cfg.names), manager.challenges)
    except AcmeError as exc:
        _fail(f"dry run against {url} failed: {exc}")
    except OSError as exc:
        _fail_os(exc, config)
    click.echo(
        f"garrison: dry run OK: {url} validated {', '.join(san_names(issued.leaf))} and issued "
        "a certificate (not stored)"
    )


@acme.command()
@click.option("--force", is_flag=True, help="Renew even if the certificate is not due yet.")
@data_dir_option
@config_option
def renew(force: bool, data_dir: Path | None, config_file: Path | None) -> None:
    """Renew the certificate when it is due (or now, with --force)."""
    config, manager = _manager(config_file, data_dir)
    _run(config, manager, force=force, source="renewal")


@acme.command()
@data_dir_option
@config_option
def status(data_dir: Path | None, config_file: Path | None) -> None:
    """Names, expiry, next renewal and the last error."""
    _, manager = _manager(config_file, data_dir)
    state = manager.live.read_state()
    leaf = manager.live.leaf()
    usable = manager.usable() is not None
    click.echo(f"names:        {', '.join(manager.config.names)}")
    click.echo(f"directory:    {manager.config.directory}")
    if leaf is None:
        click.echo("certificate:  none yet")
    else:
        click.echo(f"certificate:  {manager.live.chain_path} (serial {leaf.serial_number:x})")
        click.echo(f"covers:       {', '.join(san_names(leaf))}")
        click.echo(f"expires:      {iso(leaf.not_valid_after_utc)}")
        click.echo(
            f"usable:       {'yes' if usable else 'no'}{' (revoked)' if state.revoked else ''}"
        )
    click.echo(f"next renewal: {iso(manager.due())}")
    click.echo(f"last success: {state.last_success or '-'}")
    click.echo(f"last error:   {state.last_error or '-'}")
    if state.failures:
        retry = parse_iso(state.retry_at)
        click.echo(f"failures:     {state.failures} in a row, next try {iso(retry)}")


@acme.command("revoke")
@data_dir_option
@config_option
def revoke_cmd(data_dir: Path | None, config_file: Path | None) -> None:
    """Revoke the current certificate (a key compromise, a name given up); renew replaces it."""
    config, manager = _manager(config_file, data_dir)
    leaf = manager.live.leaf()
    if leaf is None:
        _fail("there is no ACME certificate to revoke")
    cfg = config.tls.acme
    state = manager.live.read_state()
    try:
        account = open_account(manager.data_dir, cfg.directory, cfg.email, cfg.ca_bundle)
        revoke(account, leaf)
        state.revoked = True
        manager.live.write_state(state)
    except AcmeError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail_os(exc, config)
    _audit(config, manager, "acme_revoked", serial=f"{leaf.serial_number:x}", names=list(cfg.names))
    click.echo(f"garrison: certificate {leaf.serial_number:x} revoked; run `garrison acme renew`")

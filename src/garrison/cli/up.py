"""`garrison up` and `garrison check`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError

from garrison.auth.bootstrap import ensure_admin
from garrison.auth.users import UserError
from garrison.cli.options import config_option, data_dir_option
from garrison.config import Config, ConfigError
from garrison.gateway import UpOptions, prepare_certificates, resolve_data_dir
from garrison.observe.audit import audit_path, open_sink, warn_full_bodies
from garrison.pki.ca import CAError
from garrison.pki.server_cert import ServerCertificate
from garrison.pki.tls import TLSConfigError, server_context
from garrison.process import configure_logging, run, say

PLACEHOLDER_UPSTREAM = "http://127.0.0.1:9"


def _fail_config(error: ConfigError) -> None:
    for problem in error.problems:
        click.echo(problem, err=True)
    click.echo("configuration is invalid; nothing was started", err=True)
    sys.exit(1)


@click.command()
@click.option("--upstream", help="URL of the app to protect, e.g. http://127.0.0.1:7860.")
@click.option("--listen", help="HTTPS address, HOST:PORT (default 0.0.0.0:8443; port 0 = any).")
@click.option("--http-listen", help="Plain HTTP address that redirects to HTTPS.")
@click.option(
    "--hostname", "hostnames", multiple=True, help="Name or IP for the server certificate."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Processes sharing the ports (SO_REUSEPORT).",
)
@click.option("--demo", is_flag=True, help="Start the bundled demo AI app and protect it.")
@click.option(
    "--admin-password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Password for the first `admin` account (else $GARRISON_ADMIN_PASSWORD, else random).",
)
@data_dir_option
@config_option
def up(
    upstream: str | None,
    listen: str | None,
    http_listen: str | None,
    hostnames: tuple[str, ...],
    workers: int,
    demo: bool,
    admin_password_file: Path | None,
    data_dir: Path | None,
    config_file: Path | None,
) -> None:
    """Start the gateway in front of an upstream (or the demo app)."""
    configure_logging()
    options = UpOptions(
        config_file=config_file,
        upstream=upstream,
        listen=listen,
        http_listen=http_listen,
        hostnames=hostnames,
        data_dir=data_dir,
        workers=workers,
        demo=demo and not upstream,
    )
    try:
        if options.demo:
            options.with_upstream(PLACEHOLDER_UPSTREAM).load_config()  # fail before starting it
        elif not upstream and not config_file:
            raise ConfigError(
                ["upstream: nothing to protect: give --upstream URL, --demo or --config"]
            )
        else:
            options.load_config()
    except ConfigError as exc:
        _fail_config(exc)
    directory = resolve_data_dir(data_dir)
    demo_process = None
    if options.demo:
        from garrison.demo.launcher import DemoProcess

        demo_process = DemoProcess()
        options = options.with_upstream(demo_process.url)
        say(f"demo app started on {demo_process.url} (loopback only)")
    try:
        config = options.load_config()
        try:
            ca, cert = prepare_certificates(directory, config)
        except (CAError, OSError) as exc:
            click.echo(f"garrison: cannot prepare certificates: {exc}", err=True)
            sys.exit(1)
        say(f"data dir {directory}")
        try:
            _first_admin(directory, admin_password_file)
        except (UserError, OSError, SQLAlchemyError) as exc:
            click.echo(f"garrison: cannot prepare the user store: {exc}", err=True)
            sys.exit(1)
        say(f"CA certificate (trust this): {ca.cert_path}")
        _announce_certificate(config, cert)
        _announce_audit(config, directory)
        for route in config.route:
            target = config.upstream_by_name(route.upstream).url
            access = "public" if route.public else "auth " + "|".join(route.auth)
            say(f"route {route.path} -> {target} ({access})")
        try:
            code = run(options, config, directory)
        except OSError as exc:
            click.echo(f"garrison: cannot listen: {exc.strerror or exc}", err=True)
            code = 1
    except ConfigError as exc:
        _fail_config(exc)
    finally:
        if demo_process is not None:
            demo_process.stop()
    sys.exit(code)


def _announce_certificate(config: Config, cert: ServerCertificate) -> None:
    """Say which certificate will be served; a bad [tls.files] pair stops here, clearly."""
    tls = config.tls
    if tls.source == "acme":
        say(
            f"ACME certificate for {', '.join(tls.acme.names)} from {tls.acme.directory} "
            f"(HTTP-01 on {config.server.http_listen}; obtained at start when none is valid)"
        )
    elif tls.source == "files":
        assert tls.files.cert is not None and tls.files.key is not None
        try:
            server_context(config.server.tls_profile, tls.files.cert, tls.files.key)
        except TLSConfigError as exc:
            click.echo(f"garrison: [tls.files]: {exc}", err=True)
            sys.exit(1)
        say(f"server certificate from {tls.files.cert} (reloaded when the file changes)")
    else:
        say(
            f"server certificate for {', '.join(cert.names)}, valid until {cert.not_after:%Y-%m-%d}"
        )


def _announce_audit(config: Config, directory: Path) -> None:
    """Say where the audit log goes; an unusable audit file stops the start, in one line."""
    audit = config.audit
    if audit.sink == "file":
        path = audit_path(audit, directory)
        try:
            sink = open_sink(audit, directory)
        except OSError as exc:
            click.echo(
                f"garrison: cannot open the audit log {path}: {exc.strerror or exc}", err=True
            )
            sys.exit(1)
        if sink is not None:
            sink.close()
        say(f"audit log {path} (fsync {audit.fsync}, bodies {audit.bodies})")
    elif audit.sink == "off":
        say('audit log off ([audit] sink = "off")')
    else:
        say(f"audit log to {audit.sink} (bodies {audit.bodies})")
    warn_full_bodies(audit, lambda text: click.echo(f"garrison: {text}", err=True))


def _first_admin(directory: Path, password_file: Path | None) -> None:
    created = ensure_admin(directory, password_file)
    if created is None:
        return
    password, generated = created
    if generated:
        # stdout only, never the log: shown once, like a key from `garrison key create`.
        click.echo(
            f"garrison: created user 'admin' with password: {password}\n"
            "garrison: (shown once; change it with: garrison user passwd admin)"
        )
    else:
        say("created user 'admin' with the password you gave")


@click.command()
@config_option
def check(config_file: Path | None) -> None:
    """Validate a configuration file, like `nginx -t`."""
    if config_file is None:
        raise click.UsageError("--config FILE is required")
    try:
        from garrison import config as config_mod

        parsed = config_mod.validate(config_mod.load_file(config_file))
        if not parsed.route:
            raise ConfigError(["route: no route configured"])
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        sys.exit(1)
    click.echo("config OK")
    warn_full_bodies(parsed.audit, lambda text: click.echo(text, err=True))
    from garrison.pipeline.cors import describe

    for line in describe(parsed):  # who may read what from another origin: worth a look
        click.echo(line)

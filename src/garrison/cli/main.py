"""The `garrison` command. Thin: parse, call into the parts, print."""

from __future__ import annotations

import sys

import click

from garrison import __version__
from garrison.cli.acme import acme
from garrison.cli.ca import ca
from garrison.cli.cert import cert
from garrison.cli.key import key
from garrison.cli.limits import limits
from garrison.cli.up import check, up
from garrison.cli.user import user


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="garrison")
def cli() -> None:
    """Garrison puts a self-hosted AI service behind HTTPS, auth and limits, unchanged."""


cli.add_command(up)
cli.add_command(check)
cli.add_command(ca)
cli.add_command(user)
cli.add_command(key)
cli.add_command(cert)
cli.add_command(limits)
cli.add_command(acme)


def main() -> None:
    sys.exit(cli.main(prog_name="garrison", standalone_mode=True))

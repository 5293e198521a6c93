"""`garrison user ...`: accounts for browser login (issue 3)."""

from __future__ import annotations

import click


@click.group()
def user() -> None:
    """Users who log in from a browser."""

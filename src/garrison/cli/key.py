"""`garrison key ...`: scoped API keys (issue 3)."""

from __future__ import annotations

import click


@click.group()
def key() -> None:
    """API keys for scripts and SDKs."""

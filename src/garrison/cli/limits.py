"""`garrison limits show`: what a running gateway counts right now."""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import click

from garrison.cli.options import data_dir_option
from garrison.gateway import resolve_data_dir


@click.group()
def limits() -> None:
    """Rate, concurrency and token-budget usage."""


@limits.command("show")
@click.argument("identity", required=False)
@click.option(
    "--url",
    default="https://127.0.0.1:8443",
    show_default=True,
    help="The running gateway (asked over loopback).",
)
@data_dir_option
def show(identity: str | None, url: str, data_dir: Path | None) -> None:
    """Current usage, for everyone or one IDENTITY (key:ID, user:NAME or ip:ADDRESS)."""
    ca = resolve_data_dir(data_dir) / "ca" / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca)) if ca.exists() else None
    target = url.rstrip("/") + "/.garrison/limits"
    if identity:
        target += "?who=" + quote(identity, safe="")
    try:
        with urllib.request.urlopen(target, context=context, timeout=10) as resp:
            rows = json.load(resp)["usage"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        click.echo(f"garrison: cannot read limits from {url}: {exc}", err=True)
        sys.exit(1)
    if not rows:
        click.echo("no usage recorded")
        return
    table = [("IDENTITY", "ROUTE", "KIND", "USED", "LIMIT")]
    for row in rows:
        table.append(
            (
                str(row.get("key")),
                str(row.get("route")),
                str(row.get("kind")),
                str(row.get("used")),
                str(row.get("limit", "-")),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())

"""The failure webhook: a small JSON POST to `alert_webhook` when issuance or renewal fails.

Best effort and bounded (5 s): an unreachable webhook is logged and never stops a retry. The
URL itself is never logged (chat webhooks carry their secret in the path), only its host.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from urllib.parse import urlsplit

log = logging.getLogger("garrison")
TIMEOUT = 5.0


def send_alert(url: str, payload: dict[str, object]) -> bool:
    """POST `payload` as JSON; True when the hook answered 2xx."""
    if not url:
        return False
    host = urlsplit(url).hostname or "?"
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "garrison-acme"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            ok = 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.error("ACME alert webhook on %s failed: %s", host, getattr(exc, "reason", exc))
        return False
    if not ok:
        log.error("ACME alert webhook on %s answered %d", host, resp.status)
    return ok

"""Stage: the request target in one safe form (DESIGN §5.1), and the Host it was sent to."""

from __future__ import annotations

import re

from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.paths import BadPath, normalise_path, split_target, target_host
from garrison.pipeline.pipeline import Stage

# uri-host [":" port] (RFC 9112 3.2): a bracketed IP literal or a plain name/IPv4. Anything else
# ("a b", "evil/x", "user@host", empty) is refused, so it never reaches X-Forwarded-Host.
_VALID_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{1,5})?").fullmatch


class RequestTarget(Stage):
    """Decode the path once, resolve dots, reject encoded separators; no raw bytes pass."""

    name = "normalise"

    def __call__(self, ex: Exchange) -> Reply | None:
        try:
            raw_path, ex.query = split_target(ex.target)
            ex.path = normalise_path(raw_path)
        except BadPath as exc:
            return error_reply(400, exc.code, str(exc), html=ex.wants_html())
        host = ex.header(b"host")
        if ex.target[:1] != b"/":
            # absolute-form: only for ourselves; never a way to reach another host
            absolute = target_host(ex.target)
            if host is not None and absolute is not None and absolute.lower() != host.lower():
                return error_reply(
                    400,
                    "foreign_host",
                    "absolute request target for another host",
                    html=ex.wants_html(),
                )
            host = absolute if host is None else host
        if host is not None:
            if not _VALID_HOST(host):
                return error_reply(400, "bad_host", "invalid Host header", html=ex.wants_html())
            try:
                ex.host = host.decode("ascii")
            except UnicodeDecodeError:
                return error_reply(
                    400, "bad_host", "Host header must be ASCII", html=ex.wants_html()
                )
        return None

"""Stage: the request target in one safe form (DESIGN §5.1), and the Host it was sent to."""

from __future__ import annotations

from garrison.pipeline.exchange import Exchange, Reply, error_reply
from garrison.pipeline.paths import BadPath, normalise_path, split_target, target_host
from garrison.pipeline.pipeline import Stage


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
            try:
                ex.host = host.decode("ascii")
            except UnicodeDecodeError:
                return error_reply(
                    400, "bad_host", "Host header must be ASCII", html=ex.wants_html()
                )
        return None

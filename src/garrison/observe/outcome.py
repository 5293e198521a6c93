"""A request's outcome, recorded once: one line for the access log and the audit log, and metrics.

Both logs carry the same JSON object per request (`"event":"request"`: decision, status, stage,
reason, who, where, how long, how much), so the line is formatted once and appended to each
log that wants it; the audit copy may add the body digest. Formatting the line is most of what
logging a request costs, so doing it twice would be the largest cost of observability on the
hot path (docs/decisions.md, "One request line for two logs").

It is formatted by hand from known fields, because json.dumps of a dict costs more than the
rest of it; only free-form strings go through `json_str`. Nothing from headers, cookies, the
query string or the body is ever in it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from garrison.observe import request_metrics

if TYPE_CHECKING:
    from garrison.http.relay import InFlight
    from garrison.observe.audit import BodyDigest
    from garrison.pipeline.exchange import Exchange, Reply
    from garrison.runtime import Runtime

MAX_TEXT = 256
MAX_PATH = 1024


def request_fields(
    ex: Exchange,
    status: int,
    *,
    refused: bool,
    reason: str = "",
    bytes_out: int | None = None,
    upstream_ms: str = "null",
    error: str = "",
) -> str:
    """The request line's members, without the closing brace (the audit copy may add some)."""
    route = ex.route
    ident = ex.identity
    if ident is None:
        refused_key = ex.refused_key_id  # an API key turned away: which one, never its secret
        who = f',"auth":"api_key","key_id":{json_str(refused_key)}' if refused_key else ""
    elif ident.key_id:
        who = (
            f',"identity":{json_str(ident.name)},"auth":"{ident.method}",'
            f'"key_id":{json_str(ident.key_id)}'
        )
    else:
        who = f',"identity":{json_str(ident.name)},"auth":"{ident.method}"'
    if route is not None:
        where = f'"route":{cached_json(route.path)},"upstream":{cached_json(route.upstream)}'
    else:
        where = '"route":null,"upstream":null'
    line = (
        f'{{"ts":"{now_iso()}","event":"request",'
        f'"decision":"{"refused" if refused else "allowed"}","status":{status},'
        f'"stage":{cached_json(ex.stage) if ex.stage else "null"},'
        f'"reason":{json_str(reason[:MAX_TEXT]) if reason else "null"},'
        f'"client_ip":{json_str(ex.client_ip or ex.peer_ip)},'
        f'"method":{cached_json(ex.method)},{where},'
        f'"path":{json_str(ex.path[:MAX_PATH]) if ex.path else "null"}{who},'
        f'"duration_ms":{(time.monotonic() - ex.started) * 1000:.3f},"upstream_ms":{upstream_ms}'
    )
    if bytes_out is not None:
        line += f',"bytes":{bytes_out}'
        if ex.response_observer is not None:
            line += _tokens(ex)
    if error:
        line += f',"error":{json_str(error)}'
    return line


def proxied(runtime: Runtime, inflight: InFlight, error: str = "") -> None:
    """A proxied request ended, whole or cut short by `error`: both logs and the metrics."""
    ex = inflight.ex
    headers_at = inflight.upstream_headers_at
    upstream = headers_at - inflight.upstream_started if headers_at else None
    if runtime.metrics:
        request_metrics.observe(ex, inflight.status, upstream)
    access = runtime.access_log
    audit = runtime.audit
    to_audit = audit.requests_all and not inflight.audited
    if not (access.enabled or to_audit):
        return
    if error:
        ex.stage = ex.stage or "upstream"
    line = request_fields(
        ex,
        inflight.status,
        refused=False,
        bytes_out=inflight.bytes_out,
        upstream_ms=f"{upstream * 1000:.3f}" if upstream is not None else "null",
        error=error,
    )
    if access.enabled:
        access.append(line + "}\n")
    if to_audit:
        inflight.audited = True
        audit.append_request(line, inflight.digest)


def answered(
    runtime: Runtime,
    ex: Exchange,
    reply: Reply,
    digest: BodyDigest | None = None,
    audited: bool = False,
) -> None:
    """The gateway answered itself (a refusal, a redirect, an endpoint, a 502/504).

    `audited`: the audit line was written already (`fsync = "always"`, at the response head)."""
    if runtime.metrics:
        request_metrics.observe_reply(ex, reply)
    access = runtime.access_log
    audit = runtime.audit
    status = reply.status
    if ex.stage == "upstream":  # allowed, then the upstream failed: 502/504
        refused, reason, error = False, "", reply.code
    else:
        refused, reason, error = status >= 400 or ex.stage == "authorise", reply.code, ""
    to_audit = not audited and (audit.requests_all or (refused and audit.requests_refused))
    if not (access.enabled or to_audit):
        return
    line = request_fields(
        ex, status, refused=refused, reason=reason, bytes_out=len(reply.body), error=error
    )
    if access.enabled:
        access.append(line + "}\n")
    if to_audit:
        audit.append_request(line, digest)


def _tokens(ex: Exchange) -> str:
    """LLM tokens the response used, when a token budget's meter counted them (at the end)."""
    tokens = getattr(ex.response_observer, "tokens", None)
    return f',"tokens":{int(tokens)}' if isinstance(tokens, int) else ""


def json_str(text: str | None) -> str:
    """A JSON string literal; the common plain-ASCII case without json.dumps."""
    if text is None:
        return "null"
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


_JSON_CACHE: dict[str, str] = {}


def cached_json(text: str) -> str:
    """JSON for the few strings that repeat on every line (methods, route paths, names)."""
    found = _JSON_CACHE.get(text)
    if found is None:
        found = json_str(text)
        if len(_JSON_CACHE) < 1024:
            _JSON_CACHE[text] = found
    return found


_last_second = 0
_last_text = ""


def now_iso() -> str:
    """UTC time with milliseconds; the second part is cached (formatting is not free)."""
    global _last_second, _last_text
    now = time.time()
    second = int(now)
    if second != _last_second:
        _last_second = second
        _last_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_last_text}.{int((now - second) * 1000):03d}Z"

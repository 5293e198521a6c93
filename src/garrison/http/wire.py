"""Bytes on the wire: serialising request and response heads, and chunked framing.

We never forward raw client bytes: every head is rebuilt from what llhttp parsed, with hop-by-hop
headers dropped and one framing (Content-Length or chunked) chosen by us on each side.
"""

from __future__ import annotations

from http import HTTPStatus

from garrison.pipeline.exchange import Headers, Reply

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones whose value we always set ourselves.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
        b"host",
        b"http2-settings",
    }
)

# The upstream's CORS answer is dropped unless its route says `cors_passthrough`: Garrison
# owns CORS, and an app's own `allow_origins=["*"]` must not reach browsers behind the gateway.
UPSTREAM_CORS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
        b"access-control-allow-private-network",
    }
)
# What response_head drops by default: one set lookup per header, as before.
HOP_BY_HOP_AND_CORS = HOP_BY_HOP | UPSTREAM_CORS

# Identity and forwarding headers a client must never be able to set (DESIGN §5.2).
SPOOFABLE_PREFIXES = (b"x-forwarded-", b"x-ssl-client-", b"x-garrison-")
SPOOFABLE = frozenset({b"x-real-ip", b"forwarded", b"x-client-ip", b"true-client-ip"})

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade"})


def _listed(headers: Headers) -> frozenset[bytes] | tuple[()]:
    """Names listed in Connection, if any beyond the usual keep-alive/close (the common case)."""
    for name, value in headers:
        if name == b"connection" and value not in _PLAIN_CONNECTION:
            return connection_tokens(headers)
    return ()


def request_head(
    method: str,
    target: bytes,
    host: bytes,
    headers: Headers,
    extra: Headers,
    framing: bytes,
    upgrade: bytes | None,
    block: bytes = b"",
) -> bytes:
    """The head sent upstream: client headers minus hop-by-hop and spoofable ones, plus ours.

    `block` is header lines rendered once and reused (the caller's identity headers)."""
    listed = _listed(headers)
    parts = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        if name in HOP_BY_HOP or name in SPOOFABLE or name.startswith(SPOOFABLE_PREFIXES):
            continue
        if listed and name in listed:
            continue
        parts += [name, b": ", value, b"\r\n"]
    for name, value in extra:
        parts += [name, b": ", value, b"\r\n"]
    if block:
        parts.append(block)
    if upgrade is not None:
        parts += [b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n"]
    parts += [framing, b"\r\n"]
    return b"".join(parts)


def response_head(
    status: int,
    reason_phrase: bytes,
    headers: Headers,
    security: Headers,
    framing: bytes,
    close: bool,
    upgrade: bytes | None = None,
    drop: frozenset[bytes] = HOP_BY_HOP_AND_CORS,
) -> bytes:
    """The head sent to the client: upstream headers minus `drop` (hop-by-hop and, unless the
    route passes them through, the upstream's CORS headers), plus security headers.

    Security headers the upstream already set (other than HSTS, which the gateway owns) are kept.
    """
    listed = _listed(headers)
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason_phrase or reason(status), b"\r\n"]
    present: set[bytes] = set()
    for name, value in headers:
        if name in drop or (listed and name in listed) or name == b"strict-transport-security":
            continue
        present.add(name)
        parts += [name, b": ", value, b"\r\n"]
    for name, value in security:
        if name not in present:
            parts += [name, b": ", value, b"\r\n"]
    if upgrade is not None:
        parts += [b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n"]
    elif close:
        parts.append(b"connection: close\r\n")
    parts += [framing, b"\r\n"]
    return b"".join(parts)


def reply_bytes(
    reply: Reply, security: Headers, close: bool, head_only: bool, extra: bytes = b""
) -> bytes:
    """A complete response for a Reply produced by the gateway itself; `extra`: serialised
    header lines the stages added for this request (Exchange.response_head_extra)."""
    status = reply.status
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason(status), b"\r\n"]
    if status != 204:  # a 204 has no body, and no Content-Length (RFC 9110 §8.6)
        parts += [
            b"content-type: ",
            reply.content_type,
            b"\r\ncontent-length: ",
            str(len(reply.body)).encode(),
            b"\r\n",
        ]
    parts.append(b"cache-control: no-store\r\n")
    for name, value in reply.headers:
        parts += [name, b": ", value, b"\r\n"]
    for name, value in security:
        parts += [name, b": ", value, b"\r\n"]
    if extra:
        parts.append(extra)
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(reply.body)
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    """One chunk; empty data gives b"" (an empty chunk would end the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

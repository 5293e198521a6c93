"""Unit tests of garrison.http.wire: the heads we rebuild and the framing we choose."""

from __future__ import annotations

import contextlib

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from garrison.http import wire
from garrison.pipeline.exchange import Headers, Reply

SECURITY: Headers = [
    (b"strict-transport-security", b"max-age=31536000"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"),
]


class _Parsed:
    """What llhttp makes of a head we produced: the proof that it is well-formed HTTP/1.1."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.body = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


def parse_request(data: bytes) -> tuple[_Parsed, httptools.HttpRequestParser]:
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return parsed, parser


def parse_response(data: bytes) -> tuple[_Parsed, httptools.HttpResponseParser]:
    parsed = _Parsed()
    parser = httptools.HttpResponseParser(parsed)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(data)
    return parsed, parser


# -- request_head ---------------------------------------------------------------------------------


def _request(
    headers: Headers,
    extra: Headers | None = None,
    framing: bytes = b"",
    upgrade: bytes | None = None,
) -> bytes:
    return wire.request_head(
        "GET", b"/a/b?x=1", b"app.example:8443", headers, extra or [], framing, upgrade
    )


def test_request_head_is_valid_http_with_our_host_first() -> None:
    head = _request([(b"accept", b"*/*"), (b"host", b"client-said.example")])
    assert head.startswith(b"GET /a/b?x=1 HTTP/1.1\r\nhost: app.example:8443\r\n")
    assert head.endswith(b"\r\n\r\n")
    parsed, parser = parse_request(head)
    assert parsed.complete
    assert parsed.url == b"/a/b?x=1"
    assert parsed.get(b"host") == [b"app.example:8443"]  # the client's Host is not repeated
    assert parsed.get(b"accept") == [b"*/*"]
    assert parser.get_http_version() == "1.1"


@pytest.mark.parametrize("name", sorted(wire.HOP_BY_HOP))
def test_request_head_drops_hop_by_hop_headers(name: bytes) -> None:
    head = _request([(name, b"v"), (b"x-keep", b"1")])
    parsed, _ = parse_request(head)
    assert parsed.complete
    assert parsed.get(name) == ([b"app.example:8443"] if name == b"host" else [])
    assert parsed.get(b"x-keep") == [b"1"]


@pytest.mark.parametrize(
    "name",
    [
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-prefix",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-real-ip",
        b"forwarded",
        b"x-client-ip",
        b"true-client-ip",
        b"x-ssl-client-cert",
        b"x-ssl-client-s-dn",
        b"x-garrison-user",
    ],
)
def test_request_head_drops_identity_headers_the_client_sent(name: bytes) -> None:
    head = _request([(name, b"203.0.113.66")], extra=[(b"x-forwarded-for", b"127.0.0.1")])
    parsed, _ = parse_request(head)
    assert b"203.0.113.66" not in head
    if name == b"x-forwarded-for":
        assert parsed.get(name) == [b"127.0.0.1"]  # only ours
    else:
        assert parsed.get(name) == []


def test_request_head_drops_headers_listed_in_connection() -> None:
    headers: Headers = [
        (b"connection", b"close, X-Private-Hop , keep-alive"),
        (b"x-private-hop", b"secret"),
        (b"x-other", b"kept"),
    ]
    parsed, _ = parse_request(_request(headers))
    assert parsed.get(b"x-private-hop") == []
    assert parsed.get(b"connection") == []
    assert parsed.get(b"x-other") == [b"kept"]


def test_request_head_connection_listing_spans_several_connection_headers() -> None:
    headers: Headers = [
        (b"connection", b"keep-alive"),
        (b"x-hop-a", b"1"),
        (b"connection", b"x-hop-a, x-hop-b"),
        (b"x-hop-b", b"2"),
        (b"x-end", b"3"),
    ]
    parsed, _ = parse_request(_request(headers))
    assert parsed.get(b"x-hop-a") == parsed.get(b"x-hop-b") == []
    assert parsed.get(b"x-end") == [b"3"]


def test_request_head_cannot_drop_the_gateway_headers_through_connection() -> None:
    """Listing X-Forwarded-For in Connection removes the client's copy, never ours."""
    headers: Headers = [(b"connection", b"x-forwarded-for, x-real-ip")]
    extra: Headers = [(b"x-forwarded-for", b"10.0.0.1"), (b"x-real-ip", b"10.0.0.1")]
    parsed, _ = parse_request(_request(headers, extra))
    assert parsed.get(b"x-forwarded-for") == [b"10.0.0.1"]
    assert parsed.get(b"x-real-ip") == [b"10.0.0.1"]


def test_request_head_keeps_repeated_end_to_end_headers_in_order() -> None:
    headers: Headers = [(b"cookie", b"a=1"), (b"accept", b"x"), (b"cookie", b"b=2")]
    parsed, _ = parse_request(_request(headers))
    assert parsed.get(b"cookie") == [b"a=1", b"b=2"]


@pytest.mark.parametrize(
    ("framing", "body", "expect"),
    [
        (b"content-length: 5\r\n", b"hello", b"hello"),
        (b"transfer-encoding: chunked\r\n", wire.chunk(b"hello") + wire.LAST_CHUNK, b"hello"),
        (b"", b"", b""),
    ],
)
def test_request_head_framing_is_the_one_we_chose(
    framing: bytes, body: bytes, expect: bytes
) -> None:
    client: Headers = [(b"content-length", b"999"), (b"transfer-encoding", b"gzip")]
    head = wire.request_head("POST", b"/u", b"h", client, [], framing, None)
    parsed, _ = parse_request(head + body)
    assert parsed.complete
    assert parsed.body == expect
    assert b"999" not in head and b"gzip" not in head
    assert len(parsed.get(b"content-length")) + len(parsed.get(b"transfer-encoding")) <= 1


def test_request_head_websocket_upgrade() -> None:
    client: Headers = [
        (b"connection", b"Upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
    ]
    head = _request(client, upgrade=b"websocket")
    parsed, parser = parse_request(head)
    assert parser.should_upgrade()
    assert parsed.get(b"upgrade") == [b"websocket"]
    assert parsed.get(b"connection") == [b"upgrade"]
    assert parsed.get(b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]


# -- response_head --------------------------------------------------------------------------------


def test_response_head_adds_security_headers_and_owns_hsts() -> None:
    upstream: Headers = [
        (b"content-type", b"text/plain"),
        (b"strict-transport-security", b"max-age=0"),
        (b"referrer-policy", b"no-referrer"),
    ]
    head = wire.response_head(200, b"", upstream, SECURITY, b"content-length: 2\r\n", False)
    parsed, _ = parse_response(head + b"ok")
    assert parsed.complete and parsed.body == b"ok"
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert parsed.get(b"strict-transport-security") == [b"max-age=31536000"]
    assert parsed.get(b"referrer-policy") == [b"no-referrer"]  # the app's own choice is kept
    assert parsed.get(b"x-content-type-options") == [b"nosniff"]
    assert parsed.get(b"connection") == []


def test_response_head_drops_hop_by_hop_and_connection_listed_headers() -> None:
    upstream: Headers = [
        (b"connection", b"keep-alive, x-upstream-hop, x-content-type-options"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"content-length", b"12345"),
        (b"x-upstream-hop", b"1"),
        (b"x-content-type-options", b"something-else"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    head = wire.response_head(200, b"", upstream, SECURITY, b"content-length: 0\r\n", True)
    parsed, _ = parse_response(head)
    assert parsed.complete
    for name in (b"keep-alive", b"transfer-encoding", b"x-upstream-hop"):
        assert parsed.get(name) == []
    assert parsed.get(b"content-length") == [b"0"]
    assert parsed.get(b"connection") == [b"close"]
    # The listed one was dropped, so the gateway's own value is sent instead.
    assert parsed.get(b"x-content-type-options") == [b"nosniff"]
    assert parsed.get(b"set-cookie") == [b"a=1", b"b=2"]


def test_response_head_for_a_tunnel() -> None:
    upstream: Headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    head = wire.response_head(101, b"", upstream, [], b"", False, b"websocket")
    parsed, _parser = parse_response(head)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert parsed.get(b"upgrade") == [b"websocket"]
    assert parsed.get(b"connection") == [b"upgrade"]


def test_response_reason_phrases() -> None:
    assert wire.reason(404) == b"Not Found"
    assert wire.reason(599) == b"Unknown"
    head = wire.response_head(599, b"", [], [], b"content-length: 0\r\n", False)
    assert head.startswith(b"HTTP/1.1 599 Unknown\r\n")
    head = wire.response_head(200, b"Fine", [], [], b"content-length: 0\r\n", False)
    assert head.startswith(b"HTTP/1.1 200 Fine\r\n")


# -- reply_bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("close", [False, True])
def test_reply_bytes_is_a_complete_response(close: bool) -> None:
    reply = Reply(403, b'{"error":"no"}', b"application/json", [(b"x-why", b"policy")])
    data = wire.reply_bytes(reply, SECURITY, close=close, head_only=False)
    parsed, parser = parse_response(data)
    assert parsed.complete
    assert parser.get_status_code() == 403
    assert parsed.body == b'{"error":"no"}'
    assert parsed.get(b"content-length") == [b"14"]
    assert parsed.get(b"cache-control") == [b"no-store"]
    assert parsed.get(b"x-why") == [b"policy"]
    assert parsed.get(b"strict-transport-security") == [b"max-age=31536000"]
    assert parsed.get(b"connection") == ([b"close"] if close else [])


def test_reply_bytes_head_only_keeps_the_length_and_sends_no_body() -> None:
    reply = Reply(200, b"x" * 50)
    data = wire.reply_bytes(reply, [], close=False, head_only=True)
    assert data.endswith(b"\r\n\r\n")
    assert b"content-length: 50\r\n" in data
    assert b"x" * 50 not in data


# -- chunked framing ------------------------------------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=8))
def test_chunks_decode_to_the_same_bytes(pieces: list[bytes]) -> None:
    framed = b"".join(wire.chunk(p) for p in pieces) + wire.LAST_CHUNK
    head = wire.request_head("POST", b"/", b"h", [], [], b"transfer-encoding: chunked\r\n", None)
    parsed, _ = parse_request(head + framed)
    assert parsed.complete
    assert parsed.body == b"".join(pieces)


def test_chunk_format() -> None:
    assert wire.chunk(b"hello") == b"5\r\nhello\r\n"
    assert wire.chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert wire.LAST_CHUNK == b"0\r\n\r\n"
    assert wire.CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_connection_tokens() -> None:
    headers: Headers = [(b"connection", b" Keep-Alive ,X-A"), (b"connection", b"x-b")]
    assert wire.connection_tokens(headers) == {b"keep-alive", b"x-a", b"x-b"}
    assert wire.connection_tokens([(b"accept", b"x")]) == frozenset()

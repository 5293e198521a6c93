"""The RESP reader and writer behind the admit script's connection: every reply shape Redis
sends on that path, cut at every byte (replies arrive in arbitrary pieces), and the encoding
of commands built ahead (`bulk`) equal to the one built per call (`encode`)."""

from __future__ import annotations

import pytest

from garrison.limits.resp import RespError, _Incomplete, bulk, encode, parse

REPLIES = [
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"+OK\r\n", b"OK"),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*4\r\n:1\r\n:0\r\n:0\r\n:1234567\r\n", [1, 0, 0, 1234567]),
    (b"*3\r\n:1\r\n$2\r\nab\r\n*2\r\n:-2\r\n$-1\r\n", [1, b"ab", [-2, None]]),
]


@pytest.mark.parametrize(("data", "value"), REPLIES)
def test_a_whole_reply_parses_and_ends_where_it_ends(data: bytes, value: object) -> None:
    assert parse(data + b":9\r\n", 0) == (value, len(data))


@pytest.mark.parametrize(("data", "value"), REPLIES)
def test_every_cut_short_reply_asks_for_more(data: bytes, value: object) -> None:
    for cut in range(len(data)):
        with pytest.raises(_Incomplete):
            parse(data[:cut], 0)


def test_an_error_reply_is_returned_as_an_error_not_raised() -> None:
    value, end = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(value, RespError) and str(value).startswith("NOSCRIPT")
    assert end == 30


def test_a_command_encoded_in_pieces_equals_the_command_encoded_at_once() -> None:
    args = ["EVALSHA", "a" * 40, 2, "k|r|5/1", "k|c", "lease.1", 1, 2, b"\x00raw"]
    pieces = b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)
    assert pieces == encode(args)
    assert bulk("é") == b"$2\r\n\xc3\xa9\r\n"

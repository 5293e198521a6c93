"""Path splitting, normalisation, forwarding form and deny keys (security invariant 1)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from garrison.pipeline.paths import (
    BadPath,
    _normalise_slow,
    deny_key,
    deny_keys,
    encode_path,
    normalise_path,
    split_target,
    target_host,
)

# -- split_target ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", b"/", b""),
        (b"/p", b"/p", b""),
        (b"/p?q", b"/p", b"q"),
        (b"/p?", b"/p", b""),
        (b"/p?a=1&b=/x?y", b"/p", b"a=1&b=/x?y"),
        (b"//host/p", b"//host/p", b""),
        (b"http://h/p?q", b"/p", b"q"),
        (b"HTTPS://h:8443/a/b", b"/a/b", b""),
        (b"http://h", b"/", b""),
        (b"http://h?q=1", b"/", b"q=1"),
        (b"http://user@h/p", b"/p", b""),
    ],
)
def test_split_target(target: bytes, path: bytes, query: bytes) -> None:
    assert split_target(target) == (path, query)


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (b"*", "bad_target"),
        (b"example.com:443", "bad_target"),
        (b"", "bad_target"),
        (b"p/q", "bad_target"),
        (b"ftp://h/p", "bad_target"),
        (b"http:/h/p", "bad_target"),
        (b"/p#frag", "fragment"),
        (b"/p?q#frag", "fragment"),
        (b"http://h/p#x", "fragment"),
    ],
)
def test_split_target_rejects(target: bytes, code: str) -> None:
    with pytest.raises(BadPath) as info:
        split_target(target)
    assert info.value.code == code
    assert info.value.status == 400
    assert str(info.value)


def test_target_host() -> None:
    assert target_host(b"http://Example.COM:8443/p") == b"example.com:8443"
    assert target_host(b"/p") is None
    assert target_host(b"*") is None


# -- normalise_path ----------------------------------------------------------------------------

NORMAL = [
    (b"/", "/"),
    (b"/a", "/a"),
    (b"/a/", "/a/"),
    (b"/static/app.js", "/static/app.js"),
    (b"/.well-known/acme-challenge/x", "/.well-known/acme-challenge/x"),
    (b"//a///b", "/a/b"),
    (b"/a//", "/a/"),
    (b"/./a", "/a"),
    (b"/a/.", "/a/"),
    (b"/a/./b", "/a/b"),
    (b"/a/b/..", "/a/"),
    (b"/a/b/../", "/a/"),
    (b"/a/b/../c", "/a/c"),
    (b"/a/..", "/"),
    (b"/a//../b", "/b"),
    (b"/a/%2e%2e/b", "/b"),
    (b"/a/%2E/b", "/a/b"),
    (b"/a/.%2e/b", "/b"),
    (b"/...", "/..."),
    (b"/a/.../b", "/a/.../b"),
    (b"/..a/b..", "/..a/b.."),
    (b"/%252e%252e/x", "/%2e%2e/x"),
    (b"/%61%64%6D%69%6e", "/admin"),
    (b"/a%20b", "/a b"),
    (b"/a%3Fb%23c", "/a?b#c"),
    (b"/%25", "/%"),
    (b"/%C3%A9t%C3%A9", "/\u00e9t\u00e9"),
    (b"/\xc3\xa9", "/\u00e9"),
    (b"/%EF%BC%8Fadmin", "/\uff0fadmin"),
    (b"/a;b=c/d", "/a;b=c/d"),
    (b"/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
]


@pytest.mark.parametrize(("raw", "expected"), NORMAL)
def test_normalise(raw: bytes, expected: str) -> None:
    assert normalise_path(raw) == expected
    assert _normalise_slow(raw) == expected


REJECTED = [
    (b"/a%2Fb", "encoded_separator"),
    (b"/a%2fb", "encoded_separator"),
    (b"/a%5Cb", "encoded_separator"),
    (b"/a%5cb", "encoded_separator"),
    (b"/..%2f..%2fetc", "encoded_separator"),
    (b"/a%00", "nul"),
    (b"/a\x00", "control_char"),
    (b"/a\tb", "control_char"),
    (b"/a\nb", "control_char"),
    (b"/a\x7f", "control_char"),
    (b"/a b", "control_char"),
    (b"/a%0A", "control_char"),
    (b"/a%0d%0aSet-Cookie:x", "control_char"),
    (b"/a%09", "control_char"),
    (b"/a%7F", "control_char"),
    (b"/a%C2%85", "control_char"),
    (b"/a\\b", "backslash"),
    (b"/..\\x", "backslash"),
    (b"/%G1", "bad_escape"),
    (b"/%4", "bad_escape"),
    (b"/%", "bad_escape"),
    (b"/a%%41", "bad_escape"),
    (b"/%ff", "bad_utf8"),
    (b"/%C0%AE%C0%AE/x", "bad_utf8"),
    (b"/%ED%A0%80", "bad_utf8"),
    (b"/\xff", "bad_utf8"),
    (b"/..", "dot_above_root"),
    (b"/../x", "dot_above_root"),
    (b"/a/../..", "dot_above_root"),
    (b"/%2e%2e/etc/passwd", "dot_above_root"),
    (b"/a/%2E%2E/%2e%2e/b", "dot_above_root"),
    (b"a/b", "bad_target"),
    (b"", "bad_target"),
]


@pytest.mark.parametrize(("raw", "code"), REJECTED)
def test_normalise_rejects(raw: bytes, code: str) -> None:
    with pytest.raises(BadPath) as info:
        normalise_path(raw)
    assert info.value.code == code
    assert info.value.status == 400


def test_every_rejection_code_is_covered() -> None:
    codes = {code for _, code in REJECTED}
    assert codes == {
        "encoded_separator",
        "nul",
        "control_char",
        "backslash",
        "bad_escape",
        "bad_utf8",
        "dot_above_root",
        "bad_target",
    }


# -- encode_path -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "wire"),
    [
        ("/", b"/"),
        ("/a/b.c~d_e-f", b"/a/b.c~d_e-f"),
        ("/a b", b"/a%20b"),
        ("/%", b"/%25"),
        ("/%2e", b"/%252e"),
        ("/a?b#c", b"/a%3Fb%23c"),
        ("/\u00e9", b"/%C3%A9"),
        ("/\uff0f", b"/%EF%BC%8F"),
        ("/a;b=c:d@e!$&'()*+,", b"/a;b=c:d@e!$&'()*+,"),
        ('/<>"`{}|^[]', b"/%3C%3E%22%60%7B%7D%7C%5E%5B%5D"),
    ],
)
def test_encode_path(path: str, wire: bytes) -> None:
    assert encode_path(path) == wire


# -- properties --------------------------------------------------------------------------------

# Pieces that make the interesting cases likely: dots, slashes, escapes (good and bad), UTF-8.
_PIECES = [
    b"/", b"//", b".", b"..", b"a", b"B", b"%", b"%2e", b"%2E", b"%2f", b"%5c", b"%25", b"%00",
    b"%41", b"%4", b"%G", b"%c3%a9", b"%C3", b"%ef%bc%8f", b";", b"=", b"~", b" ", b"\\", b"\t",
    b"\x7f", b"\xc3\xa9", b"\xff", b"?", b"#", b"%20", b"%3f", b"\x00", b":", b"@",
]  # fmt: skip
raw_paths = st.one_of(
    st.lists(st.sampled_from(_PIECES), max_size=14).map(lambda xs: b"/" + b"".join(xs)),
    st.binary(max_size=24).map(lambda b: b"/" + b),
)


def _check_normal_form(path: str) -> None:
    assert path.startswith("/")
    assert "//" not in path
    assert "/./" not in path and not path.endswith("/.")
    assert "/../" not in path and not path.endswith("/..")
    assert "\\" not in path
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path)


@settings(max_examples=2000)
@given(raw_paths)
@example(b"/a/..")
@example(b"/%2e%2e")
def test_normalise_invariants(raw: bytes) -> None:
    try:
        path = normalise_path(raw)
    except BadPath as exc:
        assert exc.code
        with pytest.raises(BadPath):
            _normalise_slow(raw)
        return
    _check_normal_form(path)
    assert _normalise_slow(raw) == path  # fast path and careful path agree
    wire = encode_path(path)
    assert normalise_path(wire) == path  # what we forward reads back as what we matched
    assert encode_path(normalise_path(wire)) == wire
    assert wire.isascii()


@settings(max_examples=1000)
@given(st.text(max_size=20))
def test_encode_roundtrip_for_any_text(text: str) -> None:
    try:
        path = normalise_path(("/" + text).encode("utf-8", "surrogatepass"))
    except BadPath:
        return
    wire = encode_path(path)
    assert normalise_path(wire) == path
    assert encode_path(normalise_path(wire)) == wire


def test_fast_path_used_for_plain_paths() -> None:
    # The fast path hands back exactly the input: nothing decoded, nothing resolved.
    raw = b"/gradio_api/queue/data"
    assert normalise_path(raw) == raw.decode()
    assert encode_path("/gradio_api/queue/data") == raw


# -- deny_key ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/admin/", "/admin/"),
        ("/ADMIN/x", "/admin/x"),
        ("/Admin;jsessionid=1/x", "/admin/x"),
        ("/admin;/x", "/admin/x"),
        ("/;x/admin", "/admin"),
        ("/admin./x", "/admin/x"),
        ("/admin. ./", "/admin/"),
        ("/admin ", "/admin"),
        ("/\uff41dmin/", "/admin/"),
        ("/admin\uff0fx", "/admin/x"),
        ("/gradio_api/\ufb01le=", "/gradio_api/file="),
        ("/stra\u00dfe", "/strasse"),
        ("/\u212aey", "/key"),
        ("/a/../b", "/a/../b"),
    ],
)
def test_deny_key(path: str, key: str) -> None:
    assert deny_key(path) == key


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("/x/..;/admin/", ("/x/../admin/", "/admin/")),
        ("/x/\uff0e\uff0e/admin", ("/x/../admin", "/admin")),
        ("/x/\u2025/admin", ("/x/../admin", "/admin")),
        ("/x/.. ./admin/", ("/x/../admin/", "/admin/")),
        ("/\uff0e/admin", ("/./admin", "/admin")),
        ("/admin/x", ("/admin/x",)),
    ],
)
def test_deny_keys_add_the_resolved_reading(path: str, keys: tuple[str, ...]) -> None:
    assert deny_keys(path) == keys


@settings(max_examples=1000)
@given(st.text(max_size=16).map(lambda t: "/" + t))
def test_deny_key_is_idempotent_and_folded(path: str) -> None:
    key = deny_key(path)
    assert key.startswith("/")
    assert "//" not in key
    assert deny_key(key) == key
    assert key == unicodedata.normalize("NFKC", key)
    assert key == key.casefold() or deny_key(key.casefold()) == key
    assert deny_keys(path)[0] == key

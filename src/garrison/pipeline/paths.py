"""One form of the request path: split the target, decode once, resolve dots, re-encode.

Security invariant 1 (DESIGN §5): the path is decoded exactly once, encoded separators, NUL,
control characters and invalid UTF-8 are refused, dot segments are resolved, and the form that
was matched is the form that is forwarded (``encode_path`` of the normalised path), so the
upstream can never see a path other than the one routes and deny rules judged.

Decisions:

- ``..`` that would climb above the root is refused (400), as nginx does, rather than clamped.
- Runs of ``/`` are merged *before* dot segments are resolved (nginx ``merge_slashes``), so
  ``/a//../b`` is ``/b``. A trailing slash is kept; ``/a/b/..`` is ``/a/`` (RFC 3986 5.2.4).
- ``%252e`` decodes once to the literal segment ``%2e``: not a dot segment, forwarded as
  ``%252e``. A double-decoding upstream is the upstream's bug; decoding twice here would be ours.
- Raw UTF-8 bytes (curl sends them) are accepted as if percent-encoded; they are re-encoded.
- FULLWIDTH SOLIDUS (U+FF0F) is an ordinary character, not a separator: the upstream receives it
  encoded (``%EF%BC%8F``). ``deny_key`` nevertheless folds it (NFKC) to ``/`` so that deny rules
  err on the side of refusing.

The common case (plain ASCII, no ``%``, no dot segment, no ``//``) returns after one precompiled
regex match; everything else takes the careful path, and tests check that both agree.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "BadPath",
    "deny_key",
    "deny_keys",
    "encode_path",
    "normalise_path",
    "split_target",
    "target_host",
]


class BadPath(ValueError):
    """A request target the gateway refuses (always 400); ``code`` is short and machine-readable."""

    status = 400

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# -- request target ----------------------------------------------------------------------------

_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#]*)")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split an origin-form (or absolute-form) request target into raw (path, query)."""
    if b"#" in target:
        raise BadPath("fragment", "a request target must not contain a fragment (#)")
    if target[:1] != b"/":
        match = _ABSOLUTE.match(target)
        if match is None:
            raise BadPath("bad_target", "the request target must be a path starting with /")
        target = target[match.end() :]
        if target[:1] != b"/":
            if target and target[:1] != b"?":
                raise BadPath("bad_target", "malformed absolute-form request target")
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query


def target_host(target: bytes) -> bytes | None:
    """The authority of an absolute-form target (lower-case), or None for origin-form.

    The listener compares it with Host: a proxy must not follow absolute-form to other hosts.
    """
    match = _ABSOLUTE.match(target)
    return match.group(1).lower() if match else None


# -- normalisation -----------------------------------------------------------------------------

# Plain ASCII path of unreserved / sub-delims / ":@" characters; with no "//" and no "/." it
# has nothing to decode or resolve and is already in forwarding form.
_FAST = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*").fullmatch
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[fF]|5[cC])")
_RAW_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f\\]")
# C0, DEL and C1 (U+0080-U+009F: NEL and friends are line breaks to some software).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def normalise_path(raw_path: bytes) -> str:
    """Decode a raw path once and resolve it; raise BadPath for anything ambiguous."""
    if _FAST(raw_path) and b"//" not in raw_path and b"/." not in raw_path:
        return raw_path.decode("ascii")
    return _normalise_slow(raw_path)


def _normalise_slow(raw_path: bytes) -> str:
    """The careful path: every check, in the order that gives the most precise reason."""
    if raw_path[:1] != b"/":
        raise BadPath("bad_target", "the path must start with /")
    bad = _RAW_FORBIDDEN.search(raw_path)
    if bad is not None:
        if bad.group() == b"\\":
            raise BadPath("backslash", "a backslash is not allowed in the path")
        raise BadPath("control_char", "a control character or space is not allowed in the path")
    if b"%" in raw_path:
        if _BAD_ESCAPE.search(raw_path):
            raise BadPath("bad_escape", "malformed percent-escape in the path")
        if _ENCODED_SEPARATOR.search(raw_path):
            raise BadPath("encoded_separator", "encoded / or \\ (%2F, %5C) is not allowed")
        decoded = unquote_to_bytes(raw_path)
        if b"\x00" in decoded:
            raise BadPath("nul", "an encoded NUL (%00) is not allowed in the path")
    else:
        decoded = raw_path
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("bad_utf8", "the path is not valid UTF-8 after decoding") from None
    if _CONTROL.search(text):
        raise BadPath("control_char", "an encoded control character is not allowed in the path")
    return _resolve(text)


def _resolve(text: str) -> str:
    """Merge "//" and resolve "." and ".." segments; ".." above the root is refused."""
    parts = text.split("/")[1:]
    trailing = parts[-1] in ("", ".", "..")
    stack: list[str] = []
    for seg in parts:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not stack:
                raise BadPath("dot_above_root", "the path climbs above the root with ..")
            stack.pop()
            continue
        stack.append(seg)
    if not stack:
        return "/"
    return "/" + "/".join(stack) + ("/" if trailing else "")


# -- forwarding form ---------------------------------------------------------------------------

_PATH_SAFE = "!$&'()*+,;=:@/"  # plus quote()'s own unreserved: A-Z a-z 0-9 - . _ ~
_SAFE_STR = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*").fullmatch


def encode_path(path: str) -> bytes:
    """The wire form of a normalised path: UTF-8 percent-encoding of all but pchar and "/"."""
    if _SAFE_STR(path):
        return path.encode("ascii")
    return quote(path, safe=_PATH_SAFE, encoding="utf-8", errors="strict").encode("ascii")


# -- deny matching -----------------------------------------------------------------------------

_DENY_SLOW = re.compile(r";|[. ](?:/|$)|//")


def deny_key(path: str) -> str:
    """Canonical form for deny prefixes: the way the most lenient upstream could read the path.

    NFKC + casefold (fullwidth, ligatures, case), ";params" dropped per segment (Tomcat, Jetty),
    trailing dots and spaces dropped per segment (Windows), "//" merged again. Dot segments stay
    literal here; ``deny_keys`` adds the resolved reading.
    """
    if path.isascii() and not _DENY_SLOW.search(path):
        return path.lower()
    return _join(_deny_segments(path))


def deny_keys(path: str) -> tuple[str, ...]:
    """Every reading a deny rule must be checked against: literal, and with dots resolved.

    Folding can create dot segments the normaliser never saw (U+FF0E twice, "..;", ".. ."); an
    upstream that folds the same way would resolve them, so a deny rule must see that reading too.
    """
    if path.isascii() and not _DENY_SLOW.search(path):
        return (path.lower(),)
    segments = _deny_segments(path)
    literal = _join(segments)
    if "." not in segments and ".." not in segments:
        return (literal,)
    stack: list[str] = []
    for seg in segments:
        if seg == "..":
            if stack:
                stack.pop()
        elif seg not in ("", "."):
            stack.append(seg)
    trailing = bool(segments) and segments[-1] in ("", ".", "..")
    resolved = "/" + "/".join(stack) + ("/" if trailing and stack else "")
    return (literal, resolved) if resolved != literal else (literal,)


def _fold(text: str) -> str:
    """NFKC caseless form (NFKC(casefold(NFKC(x))), per the Unicode caseless-matching recipe)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _deny_segments(path: str) -> list[str]:
    """Folded segments after the leading "/"; an all-dots-and-spaces segment reads as a dot."""
    out: list[str] = []
    segments = _fold(path).split("/")
    for seg in segments[1:] if segments[0] == "" else segments:
        seg = seg.split(";", 1)[0]
        if seg not in ("", ".", ".."):
            stripped = seg.rstrip(". ")
            if not stripped:
                stripped = ".." if seg.count(".") >= 2 else ("." if "." in seg else "")
            seg = stripped
        out.append(seg)
    return out


def _join(segments: list[str]) -> str:
    """ "/" + non-empty segments, keeping a trailing slash if the path had one."""
    kept = [s for s in segments if s]
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if segments[-1] == "" else "")

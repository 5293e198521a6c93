"""Deny rules that encodings, dots, slashes, case, params and Unicode cannot slip past.

Every variant is a raw request target as a client could send it. The gateway must either refuse
it (BadPath, 400) or see that the normalised path falls under the deny rule. Look-alikes that
are really other paths must stay allowed, or a deny rule would break the app.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.config import RouteConfig
from garrison.pipeline.paths import BadPath, encode_path, normalise_path, split_target
from garrison.pipeline.routes import RouteTable

# rule -> what follows it in a request for the protected resource
RULES = {
    "/gradio_api/file=": "/etc/passwd",
    "/admin/": "users",
    "/proxy=": "http://169.254.169.254/latest",
}
MIN_VARIANTS = 40


def _pct(ch: str, upper: bool = False) -> str:
    text = "".join(f"%{b:02x}" for b in ch.encode())
    return text.upper() if upper else text


def _fullwidth(ch: str) -> str:
    return chr(ord(ch) - 0x21 + 0xFF01)


def variants(rule: str, tail: str) -> list[bytes]:
    """Raw request targets that all mean `rule + tail` to some plausible reader."""
    out: list[str] = []
    body = rule[1:]  # without the leading "/"
    letters = [i for i, c in enumerate(rule) if c.isalpha()]
    slashes = [i for i, c in enumerate(rule) if c == "/"]

    def at(i: int, repl: str) -> str:
        return rule[:i] + repl + rule[i + 1 :] + tail

    out.append(rule + tail)
    for i in letters:
        out.append(at(i, _pct(rule[i])))
        out.append(at(i, _pct(rule[i], upper=True)))
        out.append(at(i, rule[i].upper()))
        out.append(at(i, _pct(_fullwidth(rule[i]))))
    out.append(rule.upper() + tail)
    out.append("".join(c.upper() if k % 2 else c for k, c in enumerate(rule)) + tail)
    out.append("/" + "".join(_pct(c) for c in body) + tail)
    out.append("/" + "".join(_pct(c, upper=True) for c in body) + tail)
    for special in "=_":
        if special in rule:
            out.append(rule.replace(special, _pct(special)) + tail)
    # Dot segments and slash runs at every separator.
    for i in slashes:
        for repl in ["//", "///", "/./", "/%2e/", "/%2E/", "/x/../", "/x/%2e%2e/", "/x/%2E%2E/",
                     "/x/.%2e/", "/x/..;/", "/x/%ef%bc%8e%ef%bc%8e/"]:  # fmt: skip
            out.append(at(i, repl))
    # Segment params (Tomcat/Jetty), trailing dots and spaces (Windows), fullwidth slash.
    for i in slashes[1:] + ([len(rule)] if rule.endswith("=") else []):
        for repl in [";jsessionid=x/", ";/", "./", "%20/", ".%20./", "%2e/", "%EF%BC%8F"]:
            out.append(rule[:i] + repl + rule[i + 1 :] + tail)
    out.append("/;x" + rule + tail)
    out.append("/%EF%BC%8F" + body + tail)
    if "fi" in rule:
        out.append(rule.replace("fi", "\ufb01") + tail)
        out.append(rule.replace("fi", _pct("\ufb01")) + tail)
    # Absolute form, query and fragment tricks.
    out.append("http://gateway.example" + rule + tail)
    out.append("HTTPS://gateway.example:443" + rule.upper() + tail)
    out.append("http://gateway.example/x/.." + rule + tail)
    out.append(rule + tail + "?")
    out.append(rule + "?x=1")
    out.append(rule + tail + "#frag")
    # Mixed: several tricks at once.
    out.append("//x/%2E%2E/" + _pct(body[0], upper=True) + body[1:].upper() + tail)
    out.append("/./" + "".join(_fullwidth(c) if c.isalpha() else c for c in body) + tail)
    # Forms that must be refused outright.
    for repl in ["%2f", "%2F", "%5c", "%5C", "\\"]:
        out.append(at(slashes[-1], repl) if len(slashes) > 1 else "/x" + repl + ".." + rule)
    out.append(rule + tail + "%00")
    out.append("/x/%c0%ae%c0%ae" + rule + tail)
    out.append("/../" + body + tail)
    out.append(rule + tail + "%0d%0a")
    return [v.encode("utf-8") for v in dict.fromkeys(out)]


CASES = [(rule, raw) for rule, tail in RULES.items() for raw in variants(rule, tail)]


def _table(rule: str) -> RouteTable:
    return RouteTable([RouteConfig(path="/", upstream="app", deny=[rule])])


def _verdict(table: RouteTable, raw: bytes) -> str:
    """ "refused" (400), "denied" (403) or the normalised path that would be forwarded."""
    try:
        raw_path, _ = split_target(raw)
        path = normalise_path(raw_path)
    except BadPath:
        return "refused"
    route = table.match(path)
    assert route is not None
    return "denied" if route.denies(path) else path


@pytest.mark.parametrize("rule", list(RULES))
def test_enough_distinct_variants(rule: str) -> None:
    found = variants(rule, RULES[rule])
    assert len(found) == len(set(found)) >= MIN_VARIANTS
    table = _table(rule)
    verdicts = [_verdict(table, raw) for raw in found]
    # Most variants must reach the deny check, or the table would only test the 400 path.
    assert verdicts.count("denied") >= MIN_VARIANTS
    assert verdicts.count("refused") >= 5


@pytest.mark.parametrize(("rule", "raw"), CASES, ids=[f"{r}|{v!r}" for r, v in CASES])
def test_variant_is_refused_or_denied(rule: str, raw: bytes) -> None:
    assert _verdict(_table(rule), raw) in ("refused", "denied")


LOOK_ALIKES = {
    "/gradio_api/file=": [
        "/gradio_api/file",
        "/gradio_api/files=x",
        "/gradio_api/file/x",
        "/gradio_api/x/file=",
        "/gradio_api/queue/data",
        "/gradio_api/upload",
        "/x/gradio_api/file=",
        "/gradio_api/%252e%252e/file=",
    ],
    "/admin/": [
        "/administrator",
        "/admins/",
        "/admin_panel",
        "/adm/in/",
        "/my/admin/",
        "/x/admin",
        "/%2561dmin/",
        "/admin-x/",
    ],
    "/proxy=": [
        "/proxy",
        "/proxy/x",
        "/proxy_x=",
        "/proxies=",
        "/x/proxy=",
        "/proxy?=x",
        "/%2570roxy=x",
        "/gradio_api/proxy",
    ],
}


@pytest.mark.parametrize(
    ("rule", "raw"), [(r, p) for r, paths in LOOK_ALIKES.items() for p in paths]
)
def test_look_alike_is_allowed(rule: str, raw: str) -> None:
    verdict = _verdict(_table(rule), raw.encode())
    assert verdict not in ("refused", "denied")
    # and what is forwarded reads back as the very path that was judged
    assert normalise_path(encode_path(verdict)) == verdict


def test_double_encoding_is_forwarded_literally() -> None:
    # Decoded once, "%252e%252e" is the literal segment "%2e%2e"; forwarded re-encoded, so an
    # upstream that decodes once sees the same literal, never "..".
    path = normalise_path(split_target(b"/a/%252e%252e/admin/")[0])
    assert path == "/a/%2e%2e/admin/"
    assert encode_path(path) == b"/a/%252e%252e/admin/"


_TRICKS = st.sampled_from(["raw", "pct", "PCT", "case", "fullwidth"])


@settings(max_examples=1500)
@given(st.sampled_from(list(RULES)), st.data())
def test_random_per_character_encodings_are_denied(rule: str, data: st.DataObject) -> None:
    pieces = ["/"]
    for ch in rule[1:] + RULES[rule]:
        trick = data.draw(_TRICKS) if ch != "/" else "raw"
        if trick == "pct":
            pieces.append(_pct(ch))
        elif trick == "PCT":
            pieces.append(_pct(ch, upper=True))
        elif trick == "case":
            pieces.append(ch.swapcase())
        elif trick == "fullwidth" and "!" <= ch <= "~":
            pieces.append(_pct(_fullwidth(ch)))
        else:
            pieces.append(ch)
    raw = "".join(pieces).encode()
    assert _verdict(_table(rule), raw) in ("refused", "denied")

"""Paths end to end (DESIGN §5.1): what the gateway judged is exactly what the upstream gets.

Deny rules are attacked with the raw request-target variants of tests/pipeline/test_deny_bypass
(encodings, dot segments, slash runs, case, ;params, Unicode look-alikes, absolute form), sent
byte for byte over real TLS: each must be refused (400) or denied (403) and none may reach the
upstream. Allowed paths reach it in their normalised, re-encoded form, with the query untouched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.e2e.fixtures_core import (
    assert_json_error,
    config,
    get,
    running_gateway,
    send_raw,
)
from tests.pipeline.test_deny_bypass import LOOK_ALIKES, MIN_VARIANTS, RULES, variants
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

HOST = "gateway.example"  # the absolute-form variants name this host
STRIP_ROUTE = '[[route]]\npath = "/app/"\nauth = ["none"]\nupstream = "app"\nstrip_prefix = true\n'


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    deny = ", ".join(f'"{rule}"' for rule in RULES)
    text = config(upstream.url, routes=STRIP_ROUTE).rstrip() + f"\ndeny = [{deny}]\n"
    with running_gateway(tmp_path_factory.mktemp("paths"), text) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh_record(upstream: FakeUpstream) -> None:
    upstream.requests.clear()


def raw_get(gw: GatewayProcess, target: bytes) -> int:
    data = b"GET " + target + f" HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
    return send_raw(gw, data).status


@pytest.mark.parametrize("rule", list(RULES))
def test_deny_variants_never_reach_the_upstream(
    gw: GatewayProcess, upstream: FakeUpstream, rule: str
) -> None:
    found = variants(rule, RULES[rule])
    assert len(found) >= MIN_VARIANTS
    statuses = {raw: raw_get(gw, raw) for raw in found}
    wrong = {raw: status for raw, status in statuses.items() if status not in (400, 403)}
    assert wrong == {}, f"variants of {rule} that were not refused or denied: {wrong}"
    assert [r.raw_path for r in upstream.requests] == []
    counts = Counter(statuses.values())
    # Most variants must get past parsing to the deny check itself, or only 400 was tested.
    assert counts[403] >= MIN_VARIANTS, counts
    # The plain rule is the baseline: denied, not refused.
    assert statuses[(rule + RULES[rule]).encode()] == 403


@pytest.mark.parametrize(
    ("rule", "path"), [(rule, p) for rule, paths in LOOK_ALIKES.items() for p in paths]
)
def test_look_alikes_are_allowed(
    gw: GatewayProcess, upstream: FakeUpstream, rule: str, path: str
) -> None:
    """Deny rules must not be broader than written: these are other paths and reach the app."""
    resp = get(gw, path, host=HOST)
    assert resp.status == 200, (path, resp.raw[:300])
    assert len(upstream.requests) == 1


FORWARDED = [
    ("/a/./b/../c//d", "/a/c/d"),
    ("/a//b///c", "/a/b/c"),
    ("/a/b/", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/%2e%2E/b", "/b"),
    ("/caf%C3%A9", "/caf%C3%A9"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/%41%42c", "/ABc"),
    ("/%7euser", "/~user"),
    ("/a%20b", "/a%20b"),
    ("/a%20b/%3F", "/a%20b/%3F"),  # an encoded ? stays a path character
    ("/a/%252e%252e/admin/", "/a/%252e%252e/admin/"),  # decoded once: a literal %2e, not ..
    ("/x;y=1/z", "/x;y=1/z"),
    ("/q?a=%2F&b=../..&c=%zz&d", "/q?a=%2F&b=../..&c=%zz&d"),  # the query is passed unchanged
    ("/a/../b?x=/../y", "/b?x=/../y"),
    ("/e?", "/e"),
]


@pytest.mark.parametrize(("sent", "forwarded"), FORWARDED)
def test_upstream_receives_the_normalised_path(
    gw: GatewayProcess, upstream: FakeUpstream, sent: str, forwarded: str
) -> None:
    resp = get(gw, sent.encode("utf-8"), host=HOST)
    assert resp.status == 200, resp.raw[:300]
    assert resp.json()["raw_path"] == forwarded
    assert [r.raw_path for r in upstream.requests] == [forwarded]


REFUSED = [
    ("/a%2Fb", "encoded_separator"),
    ("/a%2fb", "encoded_separator"),
    ("/a%5Cb", "encoded_separator"),
    ("/a%5cb", "encoded_separator"),
    ("/a\\b", "backslash"),
    ("/a%00b", "nul"),
    ("/a%C3%28", "bad_utf8"),
    ("/a%FF", "bad_utf8"),
    ("/%c0%ae%c0%ae/x", "bad_utf8"),  # overlong "."
    ("/a%zz", "bad_escape"),
    ("/a%2", "bad_escape"),
    ("/a%0d%0aX-Injected:%201", "control_char"),
    ("/a%09b", "control_char"),
    ("/a%C2%85b", "control_char"),  # NEL
    ("/../etc/passwd", "dot_above_root"),
    ("/a/../../etc/passwd", "dot_above_root"),
    ("/a#frag", "fragment"),
    # Raw (unencoded) non-ASCII is not a valid request target (RFC 3986); llhttp refuses it.
    ("/caf\u00e9", "malformed_request"),
]


@pytest.mark.parametrize(("sent", "code"), REFUSED)
def test_ambiguous_paths_are_refused(
    gw: GatewayProcess, upstream: FakeUpstream, sent: str, code: str
) -> None:
    resp = get(gw, sent.encode("utf-8"), host=HOST)
    assert_json_error(resp, 400, code)
    assert resp.closed
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("/app/x?q=1", "/x?q=1"),
        ("/app/", "/"),
        ("/app", "/"),
        ("/app/./y/../z", "/z"),
        ("/x/../app/deep/path/", "/deep/path/"),
        ("/app//caf%c3%a9", "/caf%C3%A9"),
    ],
)
def test_strip_prefix_route(
    gw: GatewayProcess, upstream: FakeUpstream, sent: str, forwarded: str
) -> None:
    resp = get(gw, sent, host=HOST)
    assert resp.status == 200, resp.raw[:300]
    assert resp.json()["raw_path"] == forwarded
    headers = {k.lower(): v for k, v in resp.json()["headers"]}
    assert headers["x-forwarded-prefix"] == "/app"


def test_prefix_matches_on_segment_boundaries_only(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    resp = get(gw, "/apple/pie", host=HOST)
    assert resp.json()["raw_path"] == "/apple/pie"  # the "/" route, nothing stripped
    headers = {k.lower() for k, _ in resp.json()["headers"]}
    assert "x-forwarded-prefix" not in headers


@pytest.mark.parametrize(
    "target",
    [
        "/.garrison/healthz",
        "/./.garrison/healthz",
        "/x/../.garrison/healthz",
        "/%2egarrison/healthz",
        "/.garrison//healthz",
    ],
)
def test_healthz_is_answered_by_the_gateway(
    gw: GatewayProcess, upstream: FakeUpstream, target: str
) -> None:
    resp = get(gw, target, host=HOST)
    assert resp.status == 200, resp.raw[:300]
    assert resp.header("content-type") == "application/json"
    payload = resp.json()
    assert payload["status"] == "ok" and isinstance(payload["version"], str)
    assert upstream.requests == []


def test_unknown_gateway_endpoint_is_404_and_not_forwarded(
    gw: GatewayProcess, upstream: FakeUpstream
) -> None:
    assert_json_error(get(gw, "/.garrison/no-such-endpoint", host=HOST), 404, "not_found")
    assert upstream.requests == []

"""Route matching: longest prefix on segment boundaries, strip_prefix, deny prefixes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.config import RouteConfig
from garrison.pipeline.routes import CompiledRoute, RouteTable


def table(*paths: str, **kwargs: bool) -> RouteTable:
    return RouteTable(
        [RouteConfig(path=p, upstream=f"u{i}", **kwargs) for i, p in enumerate(paths)]
    )


def matched(t: RouteTable, path: str) -> str | None:
    route = t.match(path)
    return route.path if route else None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/x", "/"),
        ("/v1", "/v1"),
        ("/v1/", "/v1/"),
        ("/v1/chat/completions", "/v1/"),
        ("/v1x", "/"),
        ("/v1.x", "/"),
        ("/V1/chat", "/"),
        ("/v1/models/x", "/v1/models"),
        ("/v1/models", "/v1/models"),
        ("/v1/models/", "/v1/models"),
        ("/v1/modelsx", "/v1/"),
        ("/app", "/app/"),
        ("/app/", "/app/"),
        ("/app/x/y", "/app/"),
        ("/apps", "/"),
    ],
)
def test_longest_prefix_on_segment_boundaries(path: str, expected: str) -> None:
    t = table("/", "/v1", "/v1/", "/v1/models", "/app/")
    assert matched(t, path) == expected


def test_order_in_config_does_not_matter() -> None:
    paths = ["/v1/models", "/", "/app/", "/v1/", "/v1"]
    forward, backward = table(*paths), table(*reversed(paths))
    for path in ["/v1", "/v1/x", "/v1/models/a", "/app", "/z"]:
        assert matched(forward, path) == matched(backward, path)


def test_no_route_is_none() -> None:
    t = table("/api/", "/ui")
    assert t.match("/") is None
    assert t.match("/apix") is None
    assert t.match("/uix") is None
    assert t.match("/other/api/") is None
    assert matched(t, "/api") == "/api/"
    assert matched(t, "/ui/x") == "/ui"


def test_index_and_upstream_kept() -> None:
    t = table("/", "/a/")
    route = t.match("/a/b")
    assert route is not None
    assert (route.index, route.upstream) == (1, "u1")
    assert len(t) == 2
    assert [r.index for r in t.routes] == [0, 1]


@pytest.mark.parametrize(
    ("route_path", "path", "forwarded", "prefix"),
    [
        ("/app/", "/app/x", "/x", "/app"),
        ("/app/", "/app/x/", "/x/", "/app"),
        ("/app/", "/app", "/", "/app"),
        ("/app/", "/app/", "/", "/app"),
        ("/app", "/app/a/b", "/a/b", "/app"),
        ("/a/b/", "/a/b/c", "/c", "/a/b"),
        ("/", "/x", "/x", ""),
    ],
)
def test_strip_prefix(route_path: str, path: str, forwarded: str, prefix: str) -> None:
    route = table(route_path, strip_prefix=True).match(path)
    assert route is not None
    assert route.upstream_path(path) == (forwarded, prefix)


def test_no_strip_forwards_unchanged() -> None:
    route = table("/app/").match("/app/x")
    assert route is not None
    assert route.upstream_path("/app/x") == ("/app/x", "")


def test_compiled_route_folds_deny_prefixes() -> None:
    route = CompiledRoute("/", "u", deny=("/ADMIN/", "/\uff41dmin/", "/proxy="))
    assert route.deny == ("/admin/", "/proxy=")
    assert route.denies("/Admin/x")
    assert route.denies("/admin")
    assert not route.denies("/administrator")
    assert not route.denies("/proxy")
    assert route.denies("/proxy=http://x")
    assert not CompiledRoute("/", "u").denies("/admin/")


@pytest.mark.parametrize("prefix", ["", "admin/"])
def test_deny_prefix_must_be_absolute(prefix: str) -> None:
    with pytest.raises(ValueError, match="must start with /"):
        CompiledRoute("/", "u", deny=(prefix,))


def test_deny_without_trailing_slash_is_a_plain_prefix() -> None:
    route = CompiledRoute("/", "u", deny=("/admin",))
    assert route.denies("/admin")
    assert route.denies("/administrator")  # documented: write "/admin/" for a directory
    assert not route.denies("/adm")


_SEGMENTS = st.sampled_from(["a", "b", "v1", "v1x", "app", "x"])
_paths = st.lists(_SEGMENTS, max_size=4).map(lambda s: "/" + "/".join(s))


@settings(max_examples=500)
@given(
    st.lists(st.tuples(_paths, st.booleans()), min_size=1, max_size=6, unique_by=lambda t: t[0]),
    _paths,
    st.booleans(),
)
def test_match_agrees_with_a_brute_force_reference(
    routes: list[tuple[str, bool]], path: str, trailing: bool
) -> None:
    configured = [p + "/" if slash and p != "/" else p for p, slash in routes]
    if len(set(configured)) != len(configured):
        return
    if trailing and path != "/":
        path += "/"
    t = table(*configured)

    def covers(prefix: str) -> bool:
        base = prefix.rstrip("/")
        return path in (base, prefix) or path.startswith(base + "/")

    candidates = [p for p in configured if covers(p)]
    got = matched(t, path)
    if not candidates:
        assert got is None
        return
    # Longest prefix that is really a prefix of the path; a "/v1/" covering exactly "/v1" ranks
    # below a configured "/v1".
    best = max(candidates, key=lambda p: len(p) if path.startswith(p) else len(p) - 1.5)
    assert got == best

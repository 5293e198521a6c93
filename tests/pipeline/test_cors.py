"""CORS: config validation (origins, wildcards, credentials) and the stage's answers.

The stage is driven with real Exchanges and real compiled routes; what it adds is parsed back
from the serialised header lines, the form in which it reaches the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from garrison.config import ConfigError, normalise_origin, validate
from garrison.http import wire
from garrison.pipeline.cors import Cors, cors_stage
from garrison.pipeline.exchange import Exchange, Reply
from garrison.pipeline.routes import RouteTable

APP = "https://app.example.com"
UPSTREAM = [{"name": "app", "url": "http://127.0.0.1:7860"}]


def config(top: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    """One route (with `route` options) and, when given, a global [cors] table `top`."""
    data: dict[str, Any] = {"upstream": UPSTREAM, "route": [{"path": "/", "upstream": "app"}]}
    data["route"][0].update(route)
    if top is not None:
        data["cors"] = top
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value.problems


# -- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("https://App.Example.COM", "https://app.example.com"),
        ("HTTPS://app.example.com/", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("https://app.example.com:8443", "https://app.example.com:8443"),
        ("http://app.example.com:443", "http://app.example.com:443"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("  https://127.0.0.1:5173 ", "https://127.0.0.1:5173"),
    ],
)
def test_origins_are_normalised_as_browsers_serialise_them(given: str, expected: str) -> None:
    assert normalise_origin(given) == expected
    assert validate(config({"allow_origins": [given]})).cors.allow_origins == [expected]


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("null", "sandboxed frames"),
        ("https://*.example.com", "patterns are not supported"),
        ("https://app.example.com/path", "is not an origin"),
        ("https://app.example.com?x=1", "is not an origin"),
        ("app.example.com", "is not an origin"),
        ("ftp://app.example.com", "is not an origin"),
        ("https://user@app.example.com", "is not an origin"),
        ("https://app.example.com:0", "out of range"),
        ("https://app.example.com:70000", "out of range"),
        ("https://bücher.example", "punycode"),
        ("", "is not an origin"),
    ],
)
def test_bad_origins_are_config_errors(given: str, reason: str) -> None:
    found = problems(config({"allow_origins": [given]}))
    assert len(found) == 1 and found[0].startswith("cors.allow_origins"), found
    assert reason in found[0]


def test_star_with_credentials_is_refused_with_a_clear_message() -> None:
    found = problems(config({"allow_origins": ["*"], "allow_credentials": True}))
    assert found == [
        'cors: allow_credentials = true cannot go with allow_origins = ["*"]: every site '
        "could read your users' responses; list the origins that may"
    ]


def test_star_is_allowed_explicitly_and_alone_only() -> None:
    assert validate(config({"allow_origins": "*"})).cors.allow_origins == ["*"]
    found = problems(config({"allow_origins": ["*", APP]}))
    assert "give it alone" in found[0]


def test_plain_http_origin_with_credentials_is_refused_except_loopback() -> None:
    found = problems(
        config({"allow_origins": ["http://app.example.com"], "allow_credentials": True})
    )
    assert "http:// origin" in found[0] and "use https://" in found[0]
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080"):
        cfg = validate(config({"allow_origins": [origin], "allow_credentials": True}))
        assert cfg.cors.allow_credentials


@pytest.mark.parametrize(
    ("cors", "where", "reason"),
    [
        ({"allow_methods": ["*"]}, "cors.allow_methods", "list the methods"),
        ({"allow_methods": ["GE T"]}, "cors.allow_methods", "not a valid method"),
        ({"allow_methods": ["TRACE"]}, "cors.allow_methods", "cannot be allowed"),
        ({"allow_headers": ["*"]}, "cors.allow_headers", "explicitly"),
        ({"allow_headers": ["X Bad"]}, "cors.allow_headers", "not a valid header name"),
        ({"expose_headers": ["*"]}, "cors.expose_headers", "explicitly"),
        ({"max_age": "2d"}, "cors.max_age", "at most 1d"),
        ({"allow_origin": [APP]}, "cors.allow_origin", "unknown option"),
    ],
)
def test_wildcards_and_bad_names_are_config_errors(
    cors: dict[str, Any], where: str, reason: str
) -> None:
    found = problems(config(cors))
    assert found and found[0].startswith(where + ":") and reason in found[0], found


def test_methods_are_upper_cased_and_deduplicated() -> None:
    cfg = validate(config({"allow_origins": [APP], "allow_methods": ["get", "POST", "post"]}))
    assert cfg.cors.allow_methods == ["GET", "POST"]


def test_route_cors_is_false_or_a_table_and_passthrough_needs_it_off() -> None:
    assert "leave it out to use [cors]" in problems(config(None, cors=True))[0]
    found = problems(config({"allow_origins": [APP]}, cors_passthrough=True))
    assert found[0].startswith("route.0.cors_passthrough:") and "cors = false" in found[0]
    cfg = validate(config({"allow_origins": [APP]}, cors=False, cors_passthrough=True))
    assert cfg.route_cors(cfg.route[0]) is None
    own = validate(config({"allow_origins": [APP]}, cors={"allow_origins": ["https://b.example"]}))
    policy = own.route_cors(own.route[0])
    assert policy is not None and policy.allow_origins == ["https://b.example"]


def test_default_is_no_cors_at_all() -> None:
    cfg = validate(config())
    assert cfg.cors.allow_origins == [] and cfg.route_cors(cfg.route[0]) is None
    assert cors_stage(cfg) == []  # no stage: requests pay nothing


def test_garrison_check_prints_the_cors_error(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[cors]\nallow_origins = ["*"]\nallow_credentials = true\n'
        '[[upstream]]\nname = "app"\nurl = "http://127.0.0.1:7860"\n'
        '[[route]]\npath = "/"\nupstream = "app"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "garrison", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cors: allow_credentials = true cannot go with allow_origins" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_garrison_check_says_who_may_read_what(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[cors]\nallow_origins = ["https://App.example.com:443"]\nallow_credentials = true\n'
        '[[upstream]]\nname = "app"\nurl = "http://127.0.0.1:7860"\n'
        '[[route]]\npath = "/"\nupstream = "app"\n'
        '[[route]]\npath = "/legacy/"\nupstream = "app"\ncors = false\ncors_passthrough = true\n'
        '[[route]]\npath = "/pub/"\nupstream = "app"\n[route.cors]\nallow_origins = "*"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "garrison", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config OK",
        "cors /: https://app.example.com (methods GET, POST; headers Authorization, "
        "Content-Type; credentials; max-age 600s)",
        "cors /pub/: every origin (methods GET, POST; headers Authorization, Content-Type; "
        "no credentials; max-age 600s)",
        "cors off: /legacy/",
        "cors passthrough (the app's own Access-Control-* headers): /legacy/",
    ]


# -- the stage ------------------------------------------------------------------------------


def stage_for(top: dict[str, Any], **route: Any) -> tuple[Cors, RouteTable]:
    cfg = validate(config(top, **route))
    stages = cors_stage(cfg)
    assert len(stages) == 1
    return stages[0], RouteTable(cfg.route)


def exchange(
    table: RouteTable, method: str = "GET", origin: str | None = APP, **headers: str
) -> Exchange:
    pairs = [(b"host", b"gw.example")]
    if origin is not None:
        pairs.append((b"origin", origin.encode()))
    pairs += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    ex = Exchange(method, b"/x", "1.1", pairs, "127.0.0.1", path="/x")
    ex.route = table.match("/x")
    return ex


def lines(extra: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in extra.decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            assert name not in found, f"{name} twice"
            found[name] = value
    return found


def test_actual_request_from_allowed_origin_gets_its_headers() -> None:
    stage, table = stage_for({"allow_origins": [APP], "expose_headers": ["X-Request-Id"]})
    ex = exchange(table)
    assert stage(ex) is None
    got = lines(ex.response_head_extra)
    assert got["access-control-allow-origin"] == APP
    assert got["vary"] == "Origin"
    assert got["access-control-expose-headers"] == (
        "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, X-RateLimit-Limit, "
        "X-RateLimit-Remaining, Retry-After, X-Request-Id"
    )
    assert "access-control-allow-credentials" not in got
    assert ex.cors_allowed


def test_credentials_are_announced_when_configured() -> None:
    stage, table = stage_for({"allow_origins": [APP], "allow_credentials": True})
    ex = exchange(table)
    stage(ex)
    assert lines(ex.response_head_extra)["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com.evil.com",
        "https://evil.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com:443",
        "https://APP.EXAMPLE.COM",
        "https://app.example.com/",
        "null",
        "",
        "https://app.example.co",
        "https://xapp.example.com",
    ],
)
def test_origin_match_is_exact(origin: str) -> None:
    stage, table = stage_for({"allow_origins": [APP], "allow_credentials": True})
    ex = exchange(table, origin=origin)
    assert stage(ex) is None
    assert ex.response_head_extra == b""
    assert not ex.cors_allowed


def test_request_without_origin_is_untouched() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    ex = exchange(table, origin=None)
    assert stage(ex) is None and ex.response_head_extra == b""


def test_star_answers_star_and_does_not_vouch_for_the_origin() -> None:
    stage, table = stage_for({"allow_origins": ["*"]})
    ex = exchange(table, origin="https://anyone.example")
    assert stage(ex) is None
    got = lines(ex.response_head_extra)
    assert got["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in got
    assert not ex.cors_allowed  # the token alias keeps refusing cross-site calls


def preflight(
    stage: Cors, table: RouteTable, method: str = "POST", origin: str = APP, **headers: str
) -> tuple[Reply | None, Exchange]:
    ex = exchange(table, "OPTIONS", origin, access_control_request_method=method, **headers)
    return stage(ex), ex


def test_allowed_preflight_is_answered_204() -> None:
    stage, table = stage_for({"allow_origins": [APP], "allow_credentials": True, "max_age": "5m"})
    reply, ex = preflight(stage, table, access_control_request_headers="authorization,content-type")
    assert isinstance(reply, Reply) and reply.status == 204 and reply.body == b""
    got = lines(ex.response_head_extra)
    assert got == {
        "access-control-allow-origin": APP,
        "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": "Authorization, Content-Type",
        "access-control-max-age": "300",
        "access-control-allow-credentials": "true",
    }
    # On the wire: no Content-Length or Content-Type on a 204 (RFC 9110 §8.6).
    raw = wire.reply_bytes(reply, [], False, False, ex.response_head_extra)
    assert raw.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert b"\r\ncontent-length:" not in raw.lower() and b"\r\ncontent-type:" not in raw.lower()
    assert raw.endswith(b"\r\n\r\n")


def test_safelisted_request_headers_are_always_allowed() -> None:
    stage, table = stage_for({"allow_origins": [APP], "allow_headers": []})
    reply, _ = preflight(stage, table, access_control_request_headers="Accept, accept-language")
    assert isinstance(reply, Reply) and reply.status == 204


def refusal(reply: Reply | None) -> dict[str, str]:
    assert isinstance(reply, Reply) and reply.status == 403
    error: dict[str, str] = json.loads(reply.body)["error"]
    return error


def test_preflight_from_another_origin_is_refused() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    reply, ex = preflight(stage, table, origin="https://app.example.com.evil.com")
    error = refusal(reply)
    assert error["code"] == "cors_origin_not_allowed"
    assert "https://app.example.com.evil.com" in error["message"]
    assert ex.response_head_extra == b""


def test_preflight_for_another_method_is_refused() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    reply, ex = preflight(stage, table, method="DELETE")
    error = refusal(reply)
    assert error["code"] == "cors_method_not_allowed"
    assert "'DELETE'" in error["message"] and "GET, POST" in error["message"]
    assert ex.response_head_extra == b""


def test_preflight_asking_for_another_header_is_refused_and_names_it() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    reply, ex = preflight(
        stage, table, access_control_request_headers="content-type, x-admin, authorization"
    )
    error = refusal(reply)
    assert error["code"] == "cors_header_not_allowed"
    assert "'x-admin'" in error["message"] and "Authorization, Content-Type" in error["message"]
    assert ex.response_head_extra == b""


def test_a_long_refused_value_is_cut_in_the_message() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    reply, _ = preflight(stage, table, origin="https://" + "a" * 5000 + ".example")
    assert len(refusal(reply)["message"]) < 300


def test_options_without_request_method_is_an_actual_request() -> None:
    stage, table = stage_for({"allow_origins": [APP]})
    ex = exchange(table, "OPTIONS")
    assert stage(ex) is None
    assert lines(ex.response_head_extra)["access-control-allow-origin"] == APP


def test_route_with_cors_off_or_its_own_table() -> None:
    cfg = validate(
        {
            "upstream": UPSTREAM,
            "cors": {"allow_origins": [APP]},
            "route": [
                {"path": "/", "upstream": "app"},
                {"path": "/off/", "upstream": "app", "cors": False},
                {
                    "path": "/own/",
                    "upstream": "app",
                    "cors": {"allow_origins": ["https://b.example"]},
                },
            ],
        }
    )
    (stage,) = cors_stage(cfg)
    table = RouteTable(cfg.route)

    def added(path: str, origin: str) -> bytes:
        ex = Exchange("GET", path.encode(), "1.1", [(b"origin", origin.encode())], "::1", path=path)
        ex.route = table.match(path)
        assert stage(ex) is None
        return ex.response_head_extra

    assert added("/x", APP) and not added("/x", "https://b.example")
    assert added("/off/x", APP) == b""
    assert added("/own/x", APP) == b"" and added("/own/x", "https://b.example")


# -- the upstream's own CORS headers ----------------------------------------------------------

UPSTREAM_HEADERS = [
    (b"content-type", b"application/json"),
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-credentials", b"true"),
    (b"access-control-expose-headers", b"x-secret"),
    (b"content-length", b"2"),
]


def test_upstream_cors_headers_are_dropped_by_default() -> None:
    head = wire.response_head(200, b"OK", UPSTREAM_HEADERS, [], b"", False).lower()
    assert b"access-control-" not in head
    assert b"content-type: application/json" in head


def test_upstream_cors_headers_pass_when_the_route_says_so() -> None:
    head = wire.response_head(
        200, b"OK", UPSTREAM_HEADERS, [], b"", False, drop=wire.HOP_BY_HOP
    ).lower()
    assert b"access-control-allow-origin: *" in head
    assert b"content-length" not in head  # hop-by-hop/framing rules still apply

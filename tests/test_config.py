"""The configuration schema: units, addresses, precise error paths, and all errors at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from garrison.config import (
    Config,
    ConfigError,
    build,
    load_file,
    parse_duration,
    parse_hostport,
    parse_size,
    validate,
)

GOOD: dict[str, Any] = {
    "upstream": [{"name": "app", "url": "http://127.0.0.1:7860"}],
    "route": [{"path": "/", "upstream": "app"}],
}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data)
    assert info.value.problems, "a ConfigError must carry at least one problem"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def with_server(**server: Any) -> dict[str, Any]:
    return {**GOOD, "server": server}


# -- units --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("10k", 10_000),
        ("10kB", 10_000),
        ("500MB", 500_000_000),
        ("2GB", 2_000_000_000),
        ("1KiB", 1024),
        ("1.5KiB", 1536),
        ("32MiB", 32 * 1024**2),
        ("1GiB", 1024**3),
        ("1TiB", 1024**4),
        (" 2 mib ", 2 * 1024**2),
        ("1gib", 1024**3),
    ],
)
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "1XB", "1 TB", "-1", -1, "1e3", "ten", True, "1.2.3k"])
def test_parse_size_refuses(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        ("10", 10.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("365d", 365 * 86400.0),
        (" 2 h ", 7200.0),
    ],
)
def test_parse_duration(text: Any, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "1w", "-1s", -1, "1 year", "5 mins", False, "1h30m"])
def test_parse_duration_refuses(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:80", ("localhost", 80)),
        (":8443", ("0.0.0.0", 8443)),
        ("[::1]:443", ("::1", 443)),
        ("[::]:0", ("::", 0)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text", ["8443", "localhost", "[::1]", "::1:443", "host:port", "a:b:1", "h:65536", "h:-1", ""]
)
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


# -- a good config and its defaults --------------------------------------------------------------


def test_defaults() -> None:
    config = validate(GOOD)
    assert isinstance(config, Config)
    server = config.server
    assert server.listen == "0.0.0.0:8443"
    assert server.tls_profile == "intermediate"
    assert server.hsts_max_age == 365 * 86400
    assert server.max_body == 1024**3
    assert server.server_cert_days <= 397
    assert server.timeouts.header_read > 0 and server.timeouts.upstream_idle > 0
    assert config.upstream_by_name("app").port == 7860
    assert config.upstream_by_name("app").host == "127.0.0.1"


def test_units_inside_the_schema() -> None:
    config = validate(
        with_server(
            max_body="10MiB",
            max_header_bytes="16KiB",
            hsts_max_age="1h",
            timeouts={"header_read": "1s", "upstream_idle": "250ms", "keepalive_idle": 30},
        )
    )
    assert config.server.max_body == 10 * 1024**2
    assert config.server.max_header_bytes == 16 * 1024
    assert config.server.hsts_max_age == 3600
    assert config.server.timeouts.header_read == 1.0
    assert config.server.timeouts.upstream_idle == 0.25
    assert config.server.timeouts.keepalive_idle == 30.0


def test_upstream_port_defaults_to_80() -> None:
    config = validate({**GOOD, "upstream": [{"name": "app", "url": "http://app.internal"}]})
    assert config.upstream[0].port == 80


def test_config_is_frozen() -> None:
    config = validate(GOOD)
    with pytest.raises(ValueError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]


# -- errors: path.to.key: reason ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({**GOOD, "bogus": 1}, "bogus: unknown option"),
        ({**GOOD, "upstreams": []}, "upstreams: unknown option"),
        (with_server(lisen=":1"), "server.lisen: unknown option"),
        (with_server(timeouts={"header": "1s"}), "server.timeouts.header: unknown option"),
        (
            {**GOOD, "route": [{"path": "/", "upstream": "app", "stripprefix": True}]},
            "route.0.stripprefix: unknown option",
        ),
        (
            {**GOOD, "upstream": [{"name": "app", "url": "http://x", "tls": True}]},
            "upstream.0.tls: unknown option",
        ),
    ],
)
def test_unknown_keys_are_named(data: dict[str, Any], expected: str) -> None:
    assert problems(data) == [expected]


def test_unknown_upstream_reference() -> None:
    data = {**GOOD, "route": [{"path": "/", "upstream": "x"}]}
    assert problems(data) == ["route.0.upstream: unknown upstream 'x'"]


def test_unknown_upstream_reference_in_a_later_route() -> None:
    data = {
        **GOOD,
        "route": [{"path": "/", "upstream": "app"}, {"path": "/api/", "upstream": "api"}],
    }
    assert problems(data) == ["route.1.upstream: unknown upstream 'api'"]


@pytest.mark.parametrize(
    ("server", "path", "reason"),
    [
        ({"listen": "nope"}, "server.listen", "invalid address 'nope'"),
        ({"listen": "h:99999"}, "server.listen", "port 99999 out of range"),
        ({"http_listen": "80"}, "server.http_listen", "invalid address '80'"),
        ({"max_body": "1XB"}, "server.max_body", "invalid size '1XB'"),
        ({"max_body": -5}, "server.max_body", "must not be negative"),
        ({"hsts_max_age": "1 year"}, "server.hsts_max_age", "invalid duration"),
        ({"timeouts": {"header_read": "5x"}}, "server.timeouts.header_read", "invalid duration"),
        ({"tls_profile": "old"}, "server.tls_profile", "'intermediate' or 'modern'"),
        ({"server_cert_days": 398}, "server.server_cert_days", "397"),
        ({"trusted_proxies": ["10.0.0.0/8", "x"]}, "server.trusted_proxies", "'x' is not an IP"),
        ({"hostnames": ["ok.example", "bad name"]}, "server.hostnames", "'bad name' is not"),
        ({"referrer_policy": "sometimes"}, "server.referrer_policy", "unknown Referrer-Policy"),
        ({"max_headers": 0}, "server.max_headers", "greater than or equal to 1"),
    ],
)
def test_server_errors_name_their_key(server: dict[str, Any], path: str, reason: str) -> None:
    found = problems(with_server(**server))
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}: "), found
    assert reason in found[0], found
    assert "Value error" not in found[0]


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [
        ({"name": "app", "url": "https://x"}, "must start with http://"),
        ({"name": "app", "url": "http://"}, "needs a host"),
        ({"name": "app", "url": "http://x/v1"}, "must not have a path"),
        ({"name": "app", "url": "http://x?q=1"}, "must not have a path"),
        ({"name": "app", "url": "http://x:99999"}, "out of range"),
    ],
)
def test_upstream_url_errors(upstream: dict[str, Any], reason: str) -> None:
    found = problems({**GOOD, "upstream": [upstream]})
    assert len(found) == 1 and found[0].startswith("upstream.0.url: "), found
    assert reason in found[0]


def test_upstream_name_is_checked() -> None:
    found = problems({**GOOD, "upstream": [{"name": "bad name", "url": "http://x"}]})
    assert found[0].startswith("upstream.0.name: letters, digits"), found
    # the route that named the old upstream is reported in the same run
    assert found[1:] == ["route.0.upstream: unknown upstream 'app'"], found


@pytest.mark.parametrize(
    ("route", "path", "reason"),
    [
        ({"path": "api", "upstream": "app"}, "route.0.path", "must start with /"),
        ({"path": "/a/../b", "upstream": "app"}, "route.0.path", "plain normalised"),
        ({"path": "/a%2Fb", "upstream": "app"}, "route.0.path", "plain normalised"),
        ({"path": "/a//b", "upstream": "app"}, "route.0.path", "plain normalised"),
        ({"path": "/", "upstream": "app", "deny": ["admin"]}, "route.0.deny", "must start with /"),
        ({"path": "/", "upstream": "app", "deny": ["/%61dmin"]}, "route.0.deny", "decoded"),
        ({"path": "/"}, "route.0.upstream", "Field required"),
    ],
)
def test_route_errors(route: dict[str, Any], path: str, reason: str) -> None:
    found = problems({**GOOD, "route": [route]})
    assert len(found) == 1 and found[0].startswith(f"{path}: "), found
    assert reason in found[0]


def test_duplicate_route_paths() -> None:
    data = {**GOOD, "route": [{"path": "/", "upstream": "app"}, {"path": "/", "upstream": "app"}]}
    assert problems(data) == ["route.1.path: another route has the same path '/'"]


def test_duplicate_upstream_names_name_the_upstream_list() -> None:
    data = {**GOOD, "upstream": [*GOOD["upstream"], {"name": "app", "url": "http://y"}]}
    assert problems(data) == ["upstream.1.name: duplicate upstream name 'app'"]


def test_wrong_types_name_their_key() -> None:
    found = problems({"server": [], "route": {"path": "/"}})
    assert [p.split(":")[0] for p in found] == ["server", "route"]


def test_several_errors_are_reported_together() -> None:
    data = {
        "server": {
            "listen": "nope",
            "max_body": "1XB",
            "bogus": True,
            "timeouts": {"header_read": "5x"},
        },
        "upstream": [{"name": "app", "url": "https://x"}],
        "route": [{"path": "x", "upstream": "app"}],
    }
    found = problems(data)
    paths = [p.split(": ", 1)[0] for p in found]
    assert sorted(paths) == sorted(
        [
            "server.listen",
            "server.max_body",
            "server.bogus",
            "server.timeouts.header_read",
            "upstream.0.url",
            "route.0.path",
        ]
    ), found


def test_reference_errors_are_reported_with_the_others() -> None:
    data = {
        "server": {"listen": "nope"},
        "upstream": [{"name": "app", "url": "http://x"}],
        "route": [{"path": "/", "upstream": "x"}, {"path": "/b", "upstream": "y"}],
    }
    assert sorted(problems(data)) == sorted(
        [
            "server.listen: invalid address 'nope': use HOST:PORT or [IPv6]:PORT",
            "route.0.upstream: unknown upstream 'x'",
            "route.1.upstream: unknown upstream 'y'",
        ]
    )


# -- files and flags ----------------------------------------------------------------------------


def test_load_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_file(missing)
    assert info.value.problems == [f"{missing}: file not found"]
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten = 1\n")
    with pytest.raises(ConfigError) as info:
        load_file(broken)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{broken}: TOML syntax error")


def test_build_flags_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garrison.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:1"\nhostnames = ["file.example"]\n\n'
        '[[upstream]]\nname = "default"\nurl = "http://127.0.0.1:2"\n\n'
        '[[route]]\npath = "/"\nupstream = "default"\n'
    )
    config = build(
        path,
        upstream="http://127.0.0.1:3",
        listen="127.0.0.1:4",
        hostnames=("flag.example",),
    )
    assert config.server.listen == "127.0.0.1:4"
    assert config.server.hostnames == ["flag.example"]
    assert [u.url for u in config.upstream] == ["http://127.0.0.1:3"]
    assert [(r.path, r.upstream) for r in config.route] == [("/", "default")]


def test_build_with_only_an_upstream_flag() -> None:
    config = build(None, upstream="http://127.0.0.1:7860")
    assert [(r.path, r.upstream) for r in config.route] == [("/", "default")]


def test_build_without_any_route() -> None:
    with pytest.raises(ConfigError) as info:
        build(None)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("route: ")


@pytest.mark.parametrize(
    "key", ["header_read", "keepalive_idle", "upstream_connect", "upstream_idle"]
)
def test_zero_timeouts_are_refused(key: str) -> None:
    found = problems({**GOOD, "server": {"timeouts": {key: "0s"}}})
    assert found == [
        f"server.timeouts.{key}: must be more than 0 (a zero timeout would cut every connection)"
    ]


def test_zero_shutdown_grace_is_allowed() -> None:
    config = validate({**GOOD, "server": {"timeouts": {"shutdown_grace": "0s"}}})
    assert config.server.timeouts.shutdown_grace == 0


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"route": [{"upstream": "a", "auth": ["client_cert"]}]},
            'route.0.auth: client_cert needs [client_certs] mode = "optional" or "required"',
        ),
        (
            {
                "client_certs": {"mode": "optional"},
                "route": [{"upstream": "a", "auth": ["jwt+session"]}],
            },
            'route.0.auth.0: only "client_cert+<method>" combinations are supported',
        ),
        (
            {"client_certs": {"mode": "sometimes"}, "route": [{"upstream": "a"}]},
            "client_certs.mode: Input should be 'off', 'optional' or 'required'",
        ),
        (
            {"client_certs": {"mode": "required", "crl": "/x.crl"}, "route": [{"upstream": "a"}]},
            "client_certs: crl is for an external ca; the internal CA keeps its own list",
        ),
        (
            {"route": [{"upstream": "a", "auth": ["none", "jwt"]}]},
            'route.0.auth: "none" (public) cannot be combined with other methods',
        ),
    ],
    ids=["cert-without-mtls", "bad-combo", "bad-mode", "crl-internal", "none-mixed"],
)
def test_auth_and_client_cert_problems(data: dict[str, Any], problem: str) -> None:
    data["upstream"] = [{"name": "a", "url": "http://127.0.0.1:1"}]
    with pytest.raises(ConfigError) as info:
        validate(data)
    assert problem in info.value.problems, info.value.problems

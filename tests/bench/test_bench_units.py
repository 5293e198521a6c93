"""The bench's pure parts: Garrison's config, wrk's command line and output, the order of the
measurements, and the auth ratios of the report. No processes, no timings."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.certs import CertFiles
from bench.targets import Target

from bench import __main__ as cli
from bench import configs, loadgen, report, runner, targets, workloads
from garrison.config import build

WRK_OUTPUT = """Running 1s test @ https://127.0.0.1:8443/auth-key/
  2 threads and 32 connections
  Latency Distribution
     50%    5.63ms
     75%    7.00ms
     90%    9.00ms
     99%   22.70ms
  10422 requests in 2.00s, 2.10MB read
  Non-2xx or 3xx responses: 17
Requests/sec:   5211.00
Transfer/sec:      1.05MB
"""


def _certs(tmp_path: Path) -> CertFiles:
    return CertFiles(ca=tmp_path / "ca.pem", cert=tmp_path / "c.pem", key=tmp_path / "k.pem")


def test_garrison_config_public_baseline_and_one_route_per_method(tmp_path: Path) -> None:
    conf = configs.garrison_config(tmp_path, _certs(tmp_path), 9999)
    config = build(conf)
    routes = {r.path: r for r in config.route}
    assert routes["/"].auth == ["none"]
    assert routes[configs.AUTH_ROUTES["key"]].auth == ["api_key"]
    assert routes[configs.AUTH_ROUTES["jwt"]].auth == ["jwt"]
    # The same upstream, the prefix stripped: the upstream sees "/" for all three.
    assert {r.upstream for r in routes.values()} == {"app"}
    assert config.upstream_by_name("app").url == "http://127.0.0.1:9999"
    assert all(routes[p].strip_prefix for p in configs.AUTH_ROUTES.values())
    assert str(config.server.access_log) == f"{tmp_path}/access.log"


def test_wrk_sends_headers_and_counts_non_2xx_apart() -> None:
    argv = loadgen.wrk_argv("https://h/x", 32, 2.0, headers={"Authorization": "Bearer gk_a_b"})
    assert argv[-1] == "https://h/x"
    assert argv[argv.index("-H") + 1] == "Authorization: Bearer gk_a_b"
    assert "-H" not in loadgen.wrk_argv("https://h/x", 32, 2.0)
    parsed = loadgen.parse_wrk(WRK_OUTPUT)
    assert parsed["rps"] == 5211.0
    assert parsed["requests"] == 10422.0
    assert parsed["non_2xx"] == 17.0
    assert parsed["errors"] == 17.0
    assert parsed["p99_ms"] == pytest.approx(22.7)


def test_keepalive_with_auth_checks_first_and_refuses_non_2xx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, ...]] = []
    headers = {"Authorization": "Bearer jwt"}
    monkeypatch.setattr(workloads, "auth_headers", lambda target, kind: headers)
    monkeypatch.setattr(
        workloads, "require_status", lambda url, status, h: calls.append(("check", url, status, h))
    )

    def fake_wrk(url: str, connections: int, duration: float, headers: object = None) -> dict:
        calls.append(("wrk", url, headers))
        return loadgen.parse_wrk(WRK_OUTPUT.replace("  Non-2xx or 3xx responses: 17\n", ""))

    monkeypatch.setattr(loadgen, "wrk", fake_wrk)
    target = Target("garrison", "https://127.0.0.1:1", api_key="gk_a_b")
    result = workloads.keepalive(target, 32, workloads.Params(duration=1), auth="jwt")
    url = "https://127.0.0.1:1/auth-jwt/"
    assert calls == [("check", url, 200, headers), ("wrk", url, headers)]
    assert result["rps"] == 5211.0

    monkeypatch.setattr(loadgen, "wrk", lambda *a, **k: loadgen.parse_wrk(WRK_OUTPUT))
    with pytest.raises(loadgen.LoadError, match="17 of 10422 responses were not 2xx"):
        workloads.keepalive(target, 32, workloads.Params(duration=1), auth="key")


def test_auth_rows_run_next_to_the_plain_row_on_auth_targets_only() -> None:
    names = ("ka32", "ka32key", "ka32jwt", "ka256")
    order = ["nginx", "garrison"]
    auth = {"ka32key": ("garrison",), "ka32jwt": ("garrison",)}
    assert runner.schedule(names, order, 0, auth) == [
        ("ka32", "nginx"),
        ("ka32", "garrison"),
        ("ka32key", "garrison"),
        ("ka32jwt", "garrison"),
        ("ka256", "nginx"),
        ("ka256", "garrison"),
    ]
    # Odd repetitions: the caller reverses the targets; the auth trio is reversed here.
    assert runner.schedule(names, order[::-1], 1, auth)[:4] == [
        ("ka32jwt", "garrison"),
        ("ka32key", "garrison"),
        ("ka32", "garrison"),
        ("ka32", "nginx"),
    ]
    # Without its plain row an auth row still runs, on auth targets only.
    assert runner.schedule(("ka32key",), order, 0, auth) == [("ka32key", "garrison")]
    assert runner.schedule(names[:3], ["direct"], 0, {}) == [("ka32", "direct")]


def test_aliases_include_the_auth_rows() -> None:
    assert runner.expand_workloads(["auth"]) == ("ka32", "ka32key", "ka32jwt")
    assert runner.expand_workloads(["keepalive"]) == (
        "ka32",
        "ka32key",
        "ka32jwt",
        "ka32limmem",
        "ka32limredis",
        "ka32bare",
        "ka256",
    )
    assert runner.expand_workloads(["observe"]) == ("ka32", "ka32bare")
    assert set(runner.expand_workloads(["small"])) == set(runner.GROUPS[0][1])
    plan = cli.plan_from(cli.parse_args(["--only", "auth", "--targets", "garrison"]))
    assert plan.workloads == ("ka32", "ka32key", "ka32jwt")
    assert tuple(w for _, group in runner.GROUPS for w in group) == runner.WORKLOADS


def _results(rps: dict[tuple[str, str], list[float]]) -> runner.Results:
    plan = runner.Plan(
        targets=("nginx", "garrison"),
        workloads=("ka32", "ka32key", "ka32jwt"),
        reps=3,
        params=workloads.Params(),
    )
    results = runner.Results(plan)
    for (workload, target), values in rps.items():
        for rep, value in enumerate(values):
            results.add(workload, target, rep, {"rps": value, "p50_ms": 1.0})
    return results


def _check_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


def test_auth_ratios_pass_at_ninety_percent_of_the_plain_run() -> None:
    results = _results(
        {
            ("ka32", "nginx"): [20000, 21000, 22000],
            ("ka32", "garrison"): [9000, 10000, 11000],  # median 10,000
            ("ka32key", "garrison"): [8000, 9000, 9900],  # median 9,000: exactly 0.90
            ("ka32jwt", "garrison"): [8000, 8900, 9900],  # median 8,900: 0.89
        }
    )
    text = report.checks_table(results)
    key = _check_line(text, "keep-alive 32: Garrison with API key / no auth req/s")
    assert key == "| keep-alive 32: Garrison with API key / no auth req/s | 0.90x | ≥ 0.9x | PASS |"
    jwt = _check_line(text, "keep-alive 32: Garrison with JWT / no auth req/s")
    assert jwt.endswith("| 0.89x | ≥ 0.9x | MISS |")
    workers = _check_line(text, "keep-alive 32: Garrison --workers 2 with JWT / no auth req/s")
    assert workers.endswith("| - | ≥ 0.9x | n/a |")
    # The cross-target checks still divide within one workload.
    nginx = _check_line(text, "keep-alive 32: Garrison / nginx req/s")
    assert "| 0.48x |" in nginx


def test_auth_ratio_is_na_without_the_plain_run() -> None:
    results = _results({("ka32key", "garrison"): [9000, 9000, 9000]})
    line = _check_line(
        report.checks_table(results), "keep-alive 32: Garrison with API key / no auth req/s"
    )
    assert line.endswith("| n/a |")


def test_summary_and_repetitions_show_the_auth_rows() -> None:
    results = _results(
        {
            ("ka32", "garrison"): [10000, 10000, 10000],
            ("ka32key", "garrison"): [9500, 9600, 9700],
            ("ka32jwt", "garrison"): [9400, 9500, 9600],
        }
    )
    summary = report.summary_table(results)
    assert "| keep-alive 32 + API key | req/s | - | 9,600 |" in summary
    assert "| keep-alive 32 + JWT | req/s | - | 9,500 |" in summary
    reps = report.per_rep_table(results)
    assert "| ka32key rps | garrison | 9,500 (0.95x) | 9,600 (0.96x) | 9,700 (0.97x) |" in reps
    assert "| ka32 rps | garrison | 10,000 | 10,000 | 10,000 |" in reps


def test_garrison_config_limits_route_and_backend(tmp_path: Path) -> None:
    config = build(configs.garrison_config(tmp_path, _certs(tmp_path), 9999))
    assert config.limits.backend == "memory"
    routes = {r.path: r for r in config.route}
    limited = routes[configs.LIMITS_ROUTE]
    assert limited.auth == ["api_key"]  # limits are per identity: the rows send the API key
    assert limited.rate == [configs.LIMITS_RATE]
    assert limited.concurrency == configs.LIMITS_CONCURRENCY
    assert limited.strip_prefix and limited.upstream == "app"
    # The plain and auth routes have no limits: the limits stage lets them by.
    assert all(not r.rate and r.concurrency is None for p, r in routes.items() if p != "/lim/")
    url = configs.redis_url(6399)
    assert build(configs.garrison_config(tmp_path, _certs(tmp_path), 9999, url)).limits.backend == (
        "redis://127.0.0.1:6399/0"
    )


def test_redis_server_argv_is_throwaway_and_on_loopback() -> None:
    argv = configs.redis_argv("/usr/bin/redis-server", 7001)
    assert argv[0] == "/usr/bin/redis-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert pairs == {"--bind": "127.0.0.1", "--port": "7001", "--save": "", "--appendonly": "no"}


def test_missing_redis_server_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    monkeypatch.setattr(targets.Path, "exists", lambda self: False)
    with pytest.raises(RuntimeError, match="redis-server is not installed"):
        targets.redis_server_executable()


def test_keepalive_with_limits_checks_admission_and_counts_redis_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(
        workloads, "require_limited", lambda url, h: calls.append(("check", url, h))
    )
    counts = iter(
        [
            {"evalsha": 100.0, "evalsha_usec": 1000.0, "zrem": 100.0, "calls": 500.0},
            {"evalsha": 10522.0, "evalsha_usec": 209440.0, "zrem": 10522.0, "calls": 94298.0},
        ]
    )
    monkeypatch.setattr(workloads, "redis_counts", lambda port: next(counts))
    monkeypatch.setattr(workloads, "redis_round_trip_us", lambda port: 80.0)

    def fake_wrk(url: str, connections: int, duration: float, headers: object = None) -> dict:
        calls.append(("wrk", url, headers))
        return loadgen.parse_wrk(WRK_OUTPUT.replace("  Non-2xx or 3xx responses: 17\n", ""))

    monkeypatch.setattr(loadgen, "wrk", fake_wrk)
    target = Target("garrison-redis", "https://127.0.0.1:1", api_key="gk_a_b", redis_port=7001)
    result = workloads.keepalive(target, 32, workloads.Params(duration=1), limits=True)
    url, headers = "https://127.0.0.1:1/lim/", {"Authorization": "Bearer gk_a_b"}
    assert calls == [("check", url, headers), ("wrk", url, headers)]
    assert result["evalsha_req"] == pytest.approx(1.0)  # 10,422 requests, 10,422 EVALSHAs
    assert result["zrem_req"] == pytest.approx(1.0)
    assert result["redis_calls_req"] == pytest.approx(9.0)
    assert result["evalsha_server_us"] == pytest.approx(20.0)
    assert result["redis_rtt_us"] == 80.0

    # Without Redis (the memory row): no Redis figures; a refusal fails the measurement.
    monkeypatch.setattr(loadgen, "wrk", lambda *a, **k: loadgen.parse_wrk(WRK_OUTPUT))
    memory = Target("garrison", "https://127.0.0.1:1", api_key="gk_a_b")
    with pytest.raises(loadgen.LoadError, match="17 of 10422 responses were not 2xx"):
        workloads.keepalive(memory, 32, workloads.Params(duration=1), limits=True)


def test_require_limited_wants_200_and_the_ratelimit_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter(
        [
            (200, {"ratelimit-limit": "100000000"}, b"ok"),
            (200, {}, b"ok"),
            (429, {"ratelimit-limit": "1"}, b"no"),
        ]
    )
    monkeypatch.setattr(targets, "http_get", lambda url, headers: next(answers))
    targets.require_limited("https://h/lim/", {})
    with pytest.raises(RuntimeError, match="no RateLimit-Limit header"):
        targets.require_limited("https://h/lim/", {})
    with pytest.raises(RuntimeError, match="answered 429"):
        targets.require_limited("https://h/lim/", {})


def test_limits_rows_run_next_to_the_plain_row_on_their_backends() -> None:
    names = runner.expand_workloads(["limits"])
    assert names == ("ka32", "ka32key", "ka32limmem", "ka32limredis")
    order = ["nginx", "garrison", "garrison-redis"]
    allowed = runner.VARIANT_TARGETS
    assert runner.schedule(names, order, 0, allowed) == [
        ("ka32", "nginx"),
        ("ka32", "garrison"),
        ("ka32key", "garrison"),
        ("ka32limmem", "garrison"),
        ("ka32", "garrison-redis"),
        ("ka32key", "garrison-redis"),
        ("ka32limredis", "garrison-redis"),
    ]
    assert runner.schedule(names, order[::-1], 1, allowed) == [
        ("ka32limredis", "garrison-redis"),
        ("ka32key", "garrison-redis"),
        ("ka32", "garrison-redis"),
        ("ka32limmem", "garrison"),
        ("ka32key", "garrison"),
        ("ka32", "garrison"),
        ("ka32", "nginx"),
    ]
    # garrison-redis runs nothing but its own rows (the API key row is its limits row's base);
    # the JWT row stays on garrison.
    every = runner.schedule(runner.WORKLOADS[:7], ["garrison", "garrison-redis"], 0, allowed)
    assert [w for w, t in every if t == "garrison-redis"] == ["ka32", "ka32key", "ka32limredis"]
    assert ("ka32key", "garrison") in every and ("ka32limmem", "garrison") in every
    # A target that did not start with a key runs no variant rows.
    running = [Target("garrison", "https://h", api_key="gk"), Target("garrison-redis", "https://r")]
    assert runner.variant_targets_of(running)["ka32limredis"] == ()
    assert runner.variant_targets_of(running)["ka32limmem"] == ("garrison",)


def _limits_results() -> runner.Results:
    plan = runner.Plan(
        targets=("garrison", "garrison-redis"),
        workloads=runner.expand_workloads(["limits"]),
        reps=3,
        params=workloads.Params(),
    )
    results = runner.Results(plan)
    rows = {
        ("ka32", "garrison"): [(10000, 140), (10000, 150), (10000, 160)],
        ("ka32key", "garrison"): [(10000, 140), (10000, 150), (10000, 160)],
        ("ka32limmem", "garrison"): [(8500, 160), (8600, 170), (8700, 180)],  # 0.86x
        ("ka32", "garrison-redis"): [(10000, 140), (9000, 150), (11000, 160)],
        ("ka32key", "garrison-redis"): [(10000, 150), (9000, 160), (11000, 170)],
        ("ka32limredis", "garrison-redis"): [(8000, 200), (8400, 230), (8600, 260)],  # 0.84x
    }
    for (workload, target), values in rows.items():
        for rep, (rps, cpu) in enumerate(values):
            value = {"rps": float(rps), "cpu_us": float(cpu)}
            if workload == "ka32limredis":
                value |= {"evalsha_req": 1.0, "zrem_req": 1.0, "redis_calls_req": 9.0}
                value |= {"evalsha_server_us": 20.0, "redis_rtt_us": 80.0, "redis_cpu_us": 30.0}
            results.add(workload, target, rep, value)
    return results


def test_limits_ratios_pass_at_eighty_five_percent_of_the_plain_run() -> None:
    text = report.checks_table(_limits_results())
    label = "keep-alive 32: Garrison with limits ({}) / same API key, no limits req/s"
    memory = _check_line(text, label.format("memory"))
    assert memory.endswith("| 0.86x | ≥ 0.85x | PASS |")
    redis = _check_line(text, label.format("Redis"))
    assert redis.endswith("| 0.84x | ≥ 0.85x | MISS |")
    workers = _check_line(
        text,
        "keep-alive 32: Garrison --workers 2 with limits (memory) / same API key, no limits req/s",
    )
    assert workers.endswith("| - | ≥ 0.85x | n/a |")


def test_redis_cost_is_the_paired_cpu_difference_and_labelled() -> None:
    results = _limits_results()
    # Per repetition: 200-140, 230-150, 260-160 = 60, 80, 100 µs; median 80.
    assert (
        report.paired_difference(results, "ka32limredis", "ka32", "garrison-redis", "cpu_us") == 80
    )
    lines = "\n".join(report.redis_cost_lines(results))
    assert "| extra Garrison CPU per request, limits in Redis | 80 µs |" in lines
    assert "| extra Garrison CPU per request, limits in memory | 20 µs |" in lines
    assert "| Redis calls per request from Garrison | 1.00 EVALSHA + 1.00 ZREM |" in lines
    assert "| time inside Redis per EVALSHA | 20.0 µs |" in lines
    assert "| one EVALSHA round trip, idle | 80.0 µs | synchronous redis-py" in lines
    # Against the API key row: 200-150, 230-160, 260-170 = 50, 70, 90 µs; median 70.
    assert (
        "| the same against the API key row (limits alone) | Redis 70 µs, memory 20 µs |" in lines
    )
    assert "| req/s, Redis row / API key row | 0.84x |" in lines
    summary = report.summary_table(results)
    assert "| keep-alive 32 + limits (Redis) | req/s | - | 8,400 |" in summary
    assert "| keep-alive 32 + limits (memory) | req/s | 8,600 | - |" in summary
    reps = report.per_rep_table(results)
    assert "| ka32limredis rps | garrison-redis | 8,000 (0.80x) | 8,400 (0.93x) |" in reps
    # Without the Redis row there is no such section.
    assert report.redis_cost_lines(_results({("ka32", "garrison"): [1, 1, 1]})) == []


def test_unobserved_config_turns_audit_and_metrics_off(tmp_path: Path) -> None:
    conf = configs.garrison_config(tmp_path, _certs(tmp_path), 9999)
    default = build(conf)
    assert default.audit.sink == "file" and default.audit.requests == "all"
    assert default.metrics.enabled
    conf.write_text(conf.read_text() + configs.UNOBSERVED)
    bare = build(conf)
    assert bare.audit.sink == "off" and not bare.metrics.enabled
    # Everything else is the same: the routes and the access log.
    assert [r.path for r in bare.route] == [r.path for r in default.route]
    assert bare.server.access_log == default.server.access_log


def test_the_bare_row_runs_next_to_the_plain_row_on_garrison_only() -> None:
    names = runner.expand_workloads(["observe"])
    order = ["nginx", "garrison", "garrison2"]
    allowed = runner.VARIANT_TARGETS
    assert runner.schedule(names, order, 0, allowed) == [
        ("ka32", "nginx"),
        ("ka32", "garrison"),
        ("ka32bare", "garrison"),
        ("ka32", "garrison2"),
    ]
    assert runner.schedule(names, order[::-1], 1, allowed)[1:3] == [
        ("ka32bare", "garrison"),
        ("ka32", "garrison"),
    ]


def test_audit_and_metrics_cost_is_checked_against_the_same_process() -> None:
    results = _results({("ka32", "garrison"): [9000, 9400, 8600]})
    for rep, (rps, cpu) in enumerate(((10000, 100), (10000, 110), (10000, 90))):
        results.add("ka32bare", "garrison", rep, {"rps": float(rps), "cpu_us": float(cpu)})
    for rep, cpu in enumerate((110, 118, 99)):
        results.data["ka32"]["garrison"][rep]["cpu_us"] = float(cpu)  # type: ignore[index]
    label = "keep-alive 32: Garrison / the same process without audit + metrics req/s (paired)"
    assert _check_line(report.checks_table(results), label).endswith("| 0.90x | ≥ 0.9x | PASS |")
    lines = "\n".join(report.observe_cost_lines(results))
    assert "| req/s, with / without audit + metrics | 0.90x |" in lines
    assert "| the same, ratio of the medians | 0.90x |" in lines
    # Per repetition: 10, 8, 9 µs; median 9, of the bare run's median 100 µs.
    assert "| extra proxy CPU per request | 9 µs (+9% of the bare run's) |" in lines
    # Paired: the median of the per-repetition ratios, not the ratio of the medians. Here the
    # machine is fast in rep 1, slow in rep 2, and busy during the plain half of rep 3: two
    # pairs say 0.95x, while the medians' ratio (5,900 / 9,000) would say 0.66x.
    drift = _results({("ka32", "garrison"): [9500, 5700, 5900]})
    for rep, rps in enumerate((10000, 6000, 9000)):
        drift.add("ka32bare", "garrison", rep, {"rps": float(rps)})
    assert _check_line(report.checks_table(drift), label).endswith("| 0.95x | ≥ 0.9x | PASS |")
    assert "| the same, ratio of the medians | 0.66x |" in "\n".join(
        report.observe_cost_lines(drift)
    )
    assert report.observe_cost_lines(_results({("ka32", "garrison"): [1, 1, 1]})) == []

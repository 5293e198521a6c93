"""The bench's pure parts: Garrison's config, wrk's command line and output, the order of the
measurements, and the auth ratios of the report. No processes, no timings."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.certs import CertFiles
from bench.targets import Target

from bench import __main__ as cli
from bench import configs, loadgen, report, runner, workloads
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
    assert runner.schedule(names, order, 0, ("garrison",)) == [
        ("ka32", "nginx"),
        ("ka32", "garrison"),
        ("ka32key", "garrison"),
        ("ka32jwt", "garrison"),
        ("ka256", "nginx"),
        ("ka256", "garrison"),
    ]
    # Odd repetitions: the caller reverses the targets; the auth trio is reversed here.
    assert runner.schedule(names, order[::-1], 1, ("garrison",))[:4] == [
        ("ka32jwt", "garrison"),
        ("ka32key", "garrison"),
        ("ka32", "garrison"),
        ("ka32", "nginx"),
    ]
    # Without its plain row an auth row still runs, on auth targets only.
    assert runner.schedule(("ka32key",), order, 0, ("garrison",)) == [("ka32key", "garrison")]
    assert runner.schedule(names[:3], ["direct"], 0, ()) == [("ka32", "direct")]


def test_aliases_include_the_auth_rows() -> None:
    assert runner.expand_workloads(["auth"]) == ("ka32", "ka32key", "ka32jwt")
    assert runner.expand_workloads(["keepalive"]) == ("ka32", "ka32key", "ka32jwt", "ka256")
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

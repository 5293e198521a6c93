"""The bench harness still works: every piece runs briefly against direct and nginx.

Not a performance test: it only checks that numbers come out (> 0) and that the report has its
tables, so that `make bench` cannot rot silently between the runs that matter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench import runner, workloads
from tests.support.tools import missing as missing_tool

pytestmark = pytest.mark.e2e

TOOLS = ("nginx", "wrk", "hey", "curl")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> runner.Results:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        missing_tool(f"bench peers not installed: {', '.join(missing)}")
    plan = runner.Plan(
        targets=("direct", "nginx"),
        workloads=runner.WORKLOADS,
        reps=1,
        params=workloads.Params(
            duration=1.0,
            new_conn_clients=4,
            sse_streams=10,
            sse_events=10,
            sse_interval_ms=10.0,
            upload_bytes=16 * 1024**2,
        ),
        retries=0,
    )
    return runner.run(plan, tmp_path_factory.mktemp("bench-work"))


def _value(results: runner.Results, workload: str, target: str) -> dict[str, float]:
    measured = results.data[workload][target][0]
    assert measured is not None, results.problems
    return measured


@pytest.mark.parametrize("target", ["direct", "nginx"])
def test_every_workload_produces_numbers(results: runner.Results, target: str) -> None:
    assert not results.problems
    for workload in ("ka32", "ka256", "newconn"):
        measured = _value(results, workload, target)
        assert measured["rps"] > 0
        assert measured["requests"] > 0
        assert measured["p50_ms"] > 0
    sse = _value(results, "sse", target)
    assert sse["events"] == sse["expected"] == 100
    assert sse["mean_ms"] > 0
    upload = _value(results, "upload", target)
    assert upload["mb_s"] > 0
    assert upload["bytes"] == 16 * 1024**2


def test_proxy_cpu_memory_and_tls_are_measured(results: runner.Results) -> None:
    assert _value(results, "ka32", "nginx")["cpu_us"] > 0
    assert _value(results, "sse", "nginx")["rss_mb"] > 0
    assert _value(results, "upload", "nginx")["rss_mb"] > 0
    assert results.tls["nginx"]["key"] == "ECDSA P-256"
    # hey must do a full handshake per request: nginx logs no resumed session.
    newconn = _value(results, "newconn", "nginx")
    assert newconn["logged"] > 0
    assert newconn["resumed"] == 0


def test_report_has_the_tables(results: runner.Results, tmp_path: Path) -> None:
    text = cli.write_report(results, tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text() == text
    assert "| workload | metric | direct | nginx |" in text
    assert "| keep-alive GETs, 32 conns | req/s |" in text
    assert "## Against the targets" in text
    assert "| SSE streams | event delay mean ms |" in text


def test_command_line_plan() -> None:
    plan = cli.plan_from(
        cli.parse_args(["--quick", "--only", "keepalive,sse", "--targets", "nginx"])
    )
    assert plan.workloads == (
        "ka32",
        "ka32key",
        "ka32jwt",
        "ka32limmem",
        "ka32limredis",
        "ka32bare",
        "ka256",
        "sse",
    )
    assert plan.targets == ("nginx",)
    assert plan.reps == 1
    assert plan.retries == 0
    with pytest.raises(SystemExit):
        cli.plan_from(cli.parse_args(["--targets", "apache"]))


def test_garrison_auth_rows_are_accepted(tmp_path: Path) -> None:
    """The key and JWT rows get 200s (a 401 fails the measurement) and the report has ratios."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        missing_tool(f"bench peers not installed: {', '.join(missing)}")
    plan = runner.Plan(
        targets=("garrison",),
        workloads=runner.expand_workloads(["auth"]),
        reps=1,
        params=workloads.Params(duration=1.0),
        retries=0,
    )
    results = runner.run(plan, tmp_path / "work")
    assert not results.problems
    for workload in ("ka32", "ka32key", "ka32jwt"):
        measured = _value(results, workload, "garrison")
        assert measured["rps"] > 0
        assert measured["non_2xx"] == 0
        assert measured["errors"] == 0
    text = cli.write_report(results, tmp_path / "report.md")
    assert "| keep-alive 32 + API key | req/s |" in text
    assert "| keep-alive 32: Garrison with JWT / no auth req/s | " in text


def test_garrison_limits_rows_are_admitted(tmp_path: Path) -> None:
    """The memory and Redis limits rows get 200s with RateLimit headers (checked before each row,
    a non-2xx fails it), Redis sees admits (far from the limits most come from the stock a
    process takes ahead, limits/stock.py), and the report has the ratios."""
    missing = [tool for tool in ("nginx", "wrk", "redis-server") if shutil.which(tool) is None]
    if missing:
        missing_tool(f"bench peers not installed: {', '.join(missing)}")
    plan = runner.Plan(
        targets=("garrison", "garrison-redis"),
        workloads=runner.expand_workloads(["limits"]),
        reps=1,
        params=workloads.Params(duration=1.0),
        retries=0,
    )
    results = runner.run(plan, tmp_path / "work")
    assert not results.problems
    for workload, target in (
        ("ka32", "garrison"),
        ("ka32limmem", "garrison"),
        ("ka32", "garrison-redis"),
        ("ka32key", "garrison-redis"),
        ("ka32limredis", "garrison-redis"),
    ):
        measured = _value(results, workload, target)
        assert measured["rps"] > 0
        assert measured["non_2xx"] == 0
    redis = _value(results, "ka32limredis", "garrison-redis")
    assert 0 < redis["evalsha_req"] < 0.5  # Redis decides, in stocks, not once per request
    assert redis["redis_rtt_us"] > 0
    assert "evalsha_req" not in _value(results, "ka32", "garrison-redis")
    text = cli.write_report(results, tmp_path / "report.md")
    assert "| keep-alive 32 + limits (Redis) | req/s |" in text
    assert (
        "| keep-alive 32: Garrison with limits (Redis) / same API key, no limits req/s | " in text
    )
    assert "| req/s, memory row / plain row |" in text
    assert "## Limits in Redis: the cost per request" in text


def test_the_bare_row_reloads_audit_and_metrics_off_and_back(tmp_path: Path) -> None:
    """The "without" row of the audit + metrics cost really runs without them, on the same
    process: no request lines reach the audit log during it, they do during the plain row and
    after it (reloaded back), and the report has the cost section."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        missing_tool(f"bench peers not installed: {', '.join(missing)}")
    plan = runner.Plan(
        targets=("garrison",),
        workloads=("ka32", "ka32bare"),
        reps=1,
        params=workloads.Params(duration=1.0),
        retries=0,
    )
    work = tmp_path / "work"
    results = runner.run(plan, work)
    assert not results.problems
    plain, bare = (_value(results, w, "garrison") for w in ("ka32", "ka32bare"))
    assert plain["rps"] > 0 and bare["rps"] > 0
    (audit,) = work.rglob("garrison/data/audit.log")
    (access,) = work.rglob("garrison/access.log")

    def to_root(log: Path) -> int:
        return sum('"path":"/",' in line for line in log.read_text().splitlines())

    # The access log has every request to "/" (warm-up, plain row, bare row); the audit log
    # all but the bare row's. wrk counts the requests it completed within its time: up to one
    # per connection (32) more may have been answered.
    missing_from_audit = to_root(access) - to_root(audit)
    assert bare["requests"] <= missing_from_audit <= bare["requests"] + 32, missing_from_audit
    (config,) = work.rglob("garrison/garrison.toml")
    assert "[audit]" not in config.read_text()  # reloaded back to the defaults
    text = cli.write_report(results, tmp_path / "report.md")
    assert "## Audit log and metrics: the cost per request" in text
    assert (
        "| keep-alive 32: Garrison / the same process without audit + metrics req/s (paired) | "
        in text
    )

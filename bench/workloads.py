"""One measurement of one workload against one target, returning a dict of numbers.

Proxy CPU is the CPU time of the target's whole process tree (master, workers) over the run;
memory is its tree RSS sampled every ~50 ms. The direct target has no proxy process to measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import configs, loadgen
from bench.procs import RssSampler
from bench.targets import (
    Target,
    auth_headers,
    key_headers,
    redis_counts,
    redis_round_trip_us,
    reload_config,
    require_limited,
    require_status,
)

MB = 1e6


@dataclass(frozen=True)
class Params:
    """Sizes and durations of the workloads."""

    duration: float = 10.0
    new_conn_clients: int = 32
    sse_streams: int = 200
    sse_events: int = 100
    sse_interval_ms: float = 20.0
    upload_bytes: int = 1024**3


def _cpu(target: Target) -> float:
    return target.proc.cpu_seconds() if target.proc else 0.0


def keepalive(
    target: Target,
    connections: int,
    params: Params,
    auth: str | None = None,
    limits: bool = False,
) -> dict[str, float]:
    """Keep-alive small GETs with wrk: req/s, p50/p99 ms, proxy CPU µs per request.

    auth "key" or "jwt": the same GETs to the route that takes only that method, each with
    `Authorization: Bearer` (a JWT fresh from the token endpoint for this measurement), after
    one request with urllib that must answer 200. limits: the same GETs with the API key to the
    route with a rate and a concurrency limit, after one request that must be admitted (200 with
    `RateLimit-Limit`); with the target's Redis, also what Redis did per request. Any non-2xx
    response fails the measurement: a run of refusals would measure the error path, not the proxy.
    """
    url, headers = f"{target.base_url}/", None
    if auth is not None:
        url = f"{target.base_url}{configs.AUTH_ROUTES[auth]}"
        headers = auth_headers(target, auth)
        require_status(url, 200, headers)
    elif limits:
        url = f"{target.base_url}{configs.LIMITS_ROUTE}"
        headers = key_headers(target)
        require_limited(url, headers)
    redis_port = target.redis_port if limits else None
    counts = redis_counts(redis_port) if redis_port else None
    redis_cpu = target.redis.cpu_seconds() if redis_port and target.redis else 0.0
    before = _cpu(target)
    result = loadgen.wrk(url, connections, params.duration, headers=headers)
    if result["non_2xx"]:
        raise loadgen.LoadError(
            f"{result['non_2xx']:.0f} of {result['requests']:.0f} responses were not 2xx/3xx"
        )
    if target.proc and result["requests"]:
        result["cpu_us"] = (_cpu(target) - before) / result["requests"] * 1e6
    if redis_port and counts is not None and result["requests"]:
        if target.redis:
            result["redis_cpu_us"] = (
                (target.redis.cpu_seconds() - redis_cpu) / result["requests"] * 1e6
            )
        result.update(redis_per_request(counts, redis_counts(redis_port), result["requests"]))
        result["redis_rtt_us"] = redis_round_trip_us(redis_port)
    return result


def keepalive_unobserved(target: Target, params: Params) -> dict[str, float]:
    """The keep-alive 32 run on the same Garrison process with its audit log and per-request
    metrics reloaded off (SIGHUP), then reloaded back on: what they cost, free of the few per
    cent by which two processes of the same program differ on a small machine."""
    if target.config is None:
        raise RuntimeError(f"{target.name} has no config file to reload")
    original = target.config.read_text()
    reload_config(target, original + configs.UNOBSERVED)
    try:
        return keepalive(target, 32, params)
    finally:
        reload_config(target, original)


def redis_per_request(
    before: dict[str, float], after: dict[str, float], requests: float
) -> dict[str, float]:
    """What Redis did per proxied request between two redis_counts: EVALSHA calls, ZREM calls
    (a concurrency slot given back) and all commands (those inside the script too) per request,
    and the µs Redis itself spent in one EVALSHA (its commandstats)."""
    evalsha = after["evalsha"] - before["evalsha"]
    out = {
        "evalsha_req": evalsha / requests,
        "zrem_req": (after.get("zrem", 0.0) - before.get("zrem", 0.0)) / requests,
        "redis_calls_req": (after["calls"] - before["calls"]) / requests,
    }
    if evalsha:
        out["evalsha_server_us"] = (after["evalsha_usec"] - before["evalsha_usec"]) / evalsha
    return out


def _reused_count(log: Path | None, offset: int) -> tuple[int, int]:
    """(lines, resumed sessions) in an nginx bench-format access log after byte offset."""
    if log is None or not log.exists():
        return 0, 0
    with open(log, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    return data.count(b"\n"), data.count(b'"reused":"r"')


def new_connections(target: Target, params: Params) -> dict[str, float]:
    """A new connection (full TLS handshake on https) per request with hey."""
    log = target.access_log if target.name == "nginx" else None
    offset = log.stat().st_size if log and log.exists() else 0
    before = _cpu(target)
    result = loadgen.hey_new_connections(
        f"{target.base_url}/", params.new_conn_clients, params.duration
    )
    if target.proc and result["requests"]:
        result["cpu_us"] = (_cpu(target) - before) / result["requests"] * 1e6
    if log is not None:
        time.sleep(1.2)  # nginx flushes its buffered access log every second
        lines, reused = _reused_count(log, offset)
        result["logged"] = float(lines)
        result["resumed"] = float(reused)
    return result


def sse(target: Target, params: Params) -> dict[str, float]:
    """Concurrent SSE streams through the target: event delay (ms), proxy RSS and CPU."""
    argv = [
        sys.executable,
        "-m",
        "bench.sse_client",
        f"{target.base_url}/sse",
        "--streams",
        str(params.sse_streams),
        "--events",
        str(params.sse_events),
        "--interval-ms",
        f"{params.sse_interval_ms:g}",
    ]
    timeout = params.sse_events * params.sse_interval_ms / 1000 + 60
    before = _cpu(target)
    with RssSampler(target.proc) as rss:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise loadgen.LoadError(f"sse client failed: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if target.proc:
        result["rss_mb"] = rss.peak / MB
        if result.get("events"):
            result["cpu_us_event"] = (_cpu(target) - before) / result["events"] * 1e6
    return result


def upload(target: Target, source: Path) -> dict[str, float]:
    """One large upload with curl: MB/s, proxy peak RSS (MB) and CPU seconds."""
    before = _cpu(target)
    with RssSampler(target.proc) as rss:
        result = loadgen.curl_upload(f"{target.base_url}/upload", source)
    if target.proc:
        result["rss_mb"] = rss.peak / MB
        result["cpu_s"] = _cpu(target) - before
    return result

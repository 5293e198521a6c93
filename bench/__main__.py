"""`python -m bench`: start the peers, run the workloads, write bench/results/<date>.md."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench import machine, report, runner, workloads
from bench.targets import ALL_TARGETS

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (1 rep, 3 s)")
    parser.add_argument("--duration", type=float, help="seconds per wrk/hey run (default 10)")
    parser.add_argument("--reps", type=int, help="repetitions, interleaved (default 3)")
    parser.add_argument(
        "--only",
        default="",
        help=f"workloads, comma-separated: {', '.join((*runner.WORKLOADS, *runner.ALIASES))}",
    )
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated")
    parser.add_argument(
        "--output", type=Path, help="the report file (default bench/results/DATE.md)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        help="repeat a measurement this many times while other processes load the machine "
        "(default 1, 0 with --quick)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> runner.Plan:
    """Turn the arguments into a Plan."""
    names = tuple(t for t in args.targets.split(",") if t)
    unknown = [t for t in names if t not in ALL_TARGETS]
    if unknown or not names:
        raise SystemExit(f"bench: unknown targets {unknown}; choose from {', '.join(ALL_TARGETS)}")
    only = [w for w in args.only.split(",") if w]
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (3.0 if args.quick else 10.0)
    return runner.Plan(
        targets=names,
        workloads=runner.expand_workloads(only) if only else runner.WORKLOADS,
        reps=max(1, reps),
        params=workloads.Params(duration=duration),
        quick=args.quick,
        retries=max(0, args.retries if args.retries is not None else (0 if args.quick else 1)),
    )


def notes_for(results: runner.Results) -> list[str]:
    """Explanations that belong next to the numbers of this run."""
    notes = [
        "Logs ON for every proxy, each to a file in the run dir: nginx a JSON access_log "
        "(buffer=64k flush=1s), Garrison its JSON access log (`[server] access_log`, which "
        "buffers 64 KiB / 0.2 s), Caddy its JSON access log (zap, written per request, with "
        "request headers: the heaviest of the three). The upstream nginx logs nothing. Garrison "
        "also keeps its defaults: the audit log (a line per request in <data>/audit.log, fsynced "
        "every second) and per-request metrics. The `ka32bare` row reloads `garrison` (SIGHUP) "
        'with those two off (`[audit] sink = "off"`, `[metrics] enabled = false`), runs the '
        "keep-alive 32 load next to the plain row and reloads the defaults back: the ratio of the "
        "two rows of the same process is what audit + metrics cost.",
        "`direct` is the upstream itself over plain HTTP (no TLS, no proxy): the ceiling. For the "
        "new-connection workload it measures new TCP connections per second, not handshakes.",
        "Client, proxy and upstream share the machine's cores. nginx runs 1 worker; Caddy runs "
        "with Go's default GOMAXPROCS (all cores); Garrison 1 process or `--workers 2`.",
        "Keep-alive: wrk -t2 --latency, 100-byte responses from a 1-worker nginx upstream that "
        "every proxy reaches over a keep-alive pool. nginx keepalive_requests raised to 10M so "
        "that it does not close client connections every 1000 requests (Caddy and Garrison don't).",
        "Auth rows (Garrison only): the keep-alive 32 run again, same wrk options, on a route "
        'that takes only an API key (`auth = ["api_key"]`) or only a JWT (`["jwt"]`), to the same '
        "upstream with the prefix stripped; every request carries `Authorization: Bearer` (a key "
        "made with `garrison key create`, or a JWT from `/.garrison/token` fetched just before "
        'the measurement). The plain rows use a public route (`auth = ["none"]`). Each auth '
        "measurement follows a urllib request that must answer 200, and fails on any non-2xx.",
        "Limits rows (Garrison only): the keep-alive 32 run again, same wrk options, with the API "
        'key, on a route with `auth = ["api_key"]`, `rate = ["100000000/minute"]` and '
        "`concurrency = 1000` (per identity, never reached), to the same upstream with the prefix "
        'stripped. Memory: on `garrison` (and `garrison2`), `[limits] backend = "memory"`. '
        "Redis: on `garrison-redis`, a second 1-process Garrison whose `[limits] backend` is a "
        "redis-server the bench starts on a free loopback port (`--save '' --appendonly no`) and "
        "stops by PID; it runs only the plain keep-alive 32 row and this one. Each limits row "
        "is compared with the plain row of the same process, measured next to it; before it, one "
        "request must answer 200 with a `RateLimit-Limit` header (the limits stage ran), and any "
        "non-2xx fails it. The plain route has no limits.",
        "New connections: `hey -disable-keepalive` (Go, HTTP/1.1, no TLS session cache: a full "
        "handshake per request). wrk with `Connection: close` was rejected: it reuses its SSL "
        "object and resumes the session on reconnect (nginx logged $ssl_session_reused=r).",
        "SSE: a Python (uvloop) upstream stamps each event with time.time_ns() at send; a Python "
        "client (separate process) records arrival - send. All connections are made first, then "
        "the requests go out staggered over one interval. Added delay = proxy - direct, same rep.",
        "Upload: curl -T of a sparse file (Content-Length known, no Expect) to a Python sink that "
        "discards the body; MB/s = 10⁶ bytes/s; RSS sampled every 50 ms.",
    ]
    resumed = results.data.get("newconn", {}).get("nginx", [])
    logged = sum(r.get("logged", 0) for r in resumed if r)
    reused = sum(r.get("resumed", 0) for r in resumed if r)
    if logged:
        notes.append(
            f"Verified in this run: nginx logged {logged:.0f} requests in the new-connection "
            f"workload, {reused:.0f} of them on a resumed TLS session."
        )
    measured = [
        m
        for by_target in results.data.values()
        for reps in by_target.values()
        for m in reps
        if m is not None
    ]
    if measured:
        loads = [m.get("bg_cores", 0.0) for m in measured]
        repeated = sum(1 for m in measured if m.get("attempts", 1) > 1)
        notes.append(
            f"The machine is shared: other processes used {statistics.mean(loads):.2f} cores on "
            f"average during the measurements (max {max(loads):.2f}); {repeated} measurements were "
            f"repeated because others used more than {runner.NOISY_CORES} cores (the quietest "
            "attempt is kept)."
        )
    keys = {n: t["key"] for n, t in results.tls.items()}
    if keys:
        same = len(set(keys.values())) == 1
        notes.append(
            "Certificate keys: "
            + ", ".join(f"{n} {k}" for n, k in keys.items())
            + (
                " — the same type everywhere."
                if same
                else " — NOT the same type: handshakes differ."
            )
            + " Ciphers: nginx and Garrison (OpenSSL) settle on AES-256-GCM with OpenSSL clients "
            "(wrk, the probe), Caddy (Go) on AES-128-GCM; hey (Go) prefers AES-128-GCM."
        )
    if {"garrison", "garrison2", "garrison-redis"} & set(keys):
        notes.append(
            "Garrison serves a certificate issued by its own CA in its data dir (the config has no "
            "option for an external certificate yet); the bench checks that the server key type "
            "matches (the server key signs the handshake; clients here do not verify the chain)."
        )
    return notes


def output_path(args: argparse.Namespace, started: float) -> Path:
    """bench/results/YYYY-MM-DD.md, or with the time when that exists."""
    if args.output:
        return args.output
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{time.strftime('%Y-%m-%d', time.localtime(started))}.md"
    if path.exists():
        path = results / f"{time.strftime('%Y-%m-%d-%H%M%S', time.localtime(started))}.md"
    return path


def write_report(results: runner.Results, path: Path) -> str:
    """Render the report, write it to path and return its text."""
    text = report.render(results, machine.describe(), notes_for(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark and write the report; returns its path."""
    args = parse_args(argv)
    plan = plan_from(args)
    workdir = BENCH / ".work" / time.strftime("run-%Y%m%d-%H%M%S")
    try:
        results = runner.run(plan, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    path = output_path(args, results.started)
    write_report(results, path)
    print(report.summary_table(results))
    print()
    print(report.checks_table(results))
    print(f"\nreport: {path}" + (f" (work dir kept: {workdir})" if args.keep else ""))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])

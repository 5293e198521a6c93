"""Turns measurements into a Markdown report: medians, ratios, PASS/MISS against the targets."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from bench.runner import NOISY_CORES, VARIANTS, Results
from bench.targets import LABELS

WORKLOAD_TITLES = {
    "ka32": "keep-alive GETs, 32 conns",
    "ka32key": "keep-alive 32 + API key",
    "ka32jwt": "keep-alive 32 + JWT",
    "ka32limmem": "keep-alive 32 + limits (memory)",
    "ka32limredis": "keep-alive 32 + limits (Redis)",
    "ka32bare": "keep-alive 32, audit + metrics off",
    "ka256": "keep-alive GETs, 256 conns",
    "newconn": "new TLS conn per request",
    "sse": "SSE streams",
    "upload": "1 upload",
}
# (workload, metric key, label, digits)
ROWS: tuple[tuple[str, str, str, int], ...] = (
    ("ka32", "rps", "req/s", 0),
    ("ka32", "p50_ms", "p50 ms", 2),
    ("ka32", "p99_ms", "p99 ms", 2),
    ("ka32", "cpu_us", "proxy CPU µs/req", 0),
    *(
        (w, metric, label, digits)
        for w in ("ka32key", "ka32jwt", "ka32limmem", "ka32limredis", "ka32bare")
        for metric, label, digits in (
            ("rps", "req/s", 0),
            ("p50_ms", "p50 ms", 2),
            ("p99_ms", "p99 ms", 2),
            ("cpu_us", "proxy CPU µs/req", 0),
        )
    ),
    ("ka32limredis", "redis_cpu_us", "redis-server CPU µs/req", 0),
    ("ka32limredis", "evalsha_req", "EVALSHA calls/req", 2),
    ("ka32limredis", "zrem_req", "ZREM calls/req", 2),
    ("ka32limredis", "redis_calls_req", "Redis commands/req incl. in-script", 2),
    ("ka256", "rps", "req/s", 0),
    ("ka256", "p50_ms", "p50 ms", 2),
    ("ka256", "p99_ms", "p99 ms", 2),
    ("ka256", "cpu_us", "proxy CPU µs/req", 0),
    ("newconn", "rps", "handshakes/s", 0),
    ("newconn", "p50_ms", "p50 ms", 2),
    ("newconn", "p99_ms", "p99 ms", 2),
    ("newconn", "cpu_us", "proxy CPU µs/req", 0),
    ("sse", "mean_ms", "event delay mean ms", 2),
    ("sse", "p99_ms", "event delay p99 ms", 2),
    ("sse", "added_mean_ms", "added delay mean ms", 2),
    ("sse", "added_p99_ms", "added delay p99 ms", 2),
    ("sse", "rss_mb", "proxy peak RSS MB", 0),
    ("sse", "cpu_us_event", "proxy CPU µs/event", 0),
    ("upload", "mb_s", "MB/s", 0),
    ("upload", "rss_mb", "proxy peak RSS MB", 0),
    ("upload", "cpu_s", "proxy CPU s", 2),
)


@dataclass(frozen=True)
class Check:
    """One target from the issue: a ratio or an absolute value, and its bound.

    A ratio divides by the same metric of target `versus` in workload `versus_workload` (by
    default the same workload): the medians, or with `paired` the median of the ratios of each
    repetition (two processes measured next to each other, so that the machine's drift over
    the run, which moves both, cancels out).
    """

    label: str
    workload: str
    metric: str
    target: str
    versus: str | None  # None: absolute value
    bound: float
    at_least: bool
    unit: str = "x"
    versus_workload: str | None = None
    paired: bool = False


CHECKS = (
    *(
        check
        for w, c in (("ka32", 32), ("ka256", 256))
        for check in (
            Check(
                f"keep-alive {c}: Garrison / Caddy req/s", w, "rps", "garrison", "caddy", 1.0, True
            ),
            Check(
                f"keep-alive {c}: Garrison / nginx req/s", w, "rps", "garrison", "nginx", 0.45, True
            ),
            Check(
                f"keep-alive {c}: Garrison --workers 2 / nginx req/s",
                w,
                "rps",
                "garrison2",
                "nginx",
                0.6,
                True,
            ),
        )
    ),
    *(
        Check(
            f"keep-alive 32: {name} with {method} / no auth req/s",
            workload,
            "rps",
            target,
            target,
            0.9,
            True,
            versus_workload="ka32",
        )
        for target, name in (("garrison", "Garrison"), ("garrison2", "Garrison --workers 2"))
        for workload, method in (("ka32key", "API key"), ("ka32jwt", "JWT"))
    ),
    *(
        Check(
            f"keep-alive 32: {name} with limits ({backend}) / same API key, no limits req/s",
            workload,
            "rps",
            target,
            target,
            0.85,
            True,
            # Limits count per identity, so the limited route has an API key; the row without
            # limits that differs by the limits alone is the API key row (auth has its own
            # check). The ratio to the public row is shown in the table below the checks.
            versus_workload="ka32key",
        )
        for target, name, workload, backend in (
            ("garrison", "Garrison", "ka32limmem", "memory"),
            ("garrison2", "Garrison --workers 2", "ka32limmem", "memory"),
            ("garrison-redis", "Garrison", "ka32limredis", "Redis"),
        )
    ),
    Check(
        "keep-alive 32: Garrison / the same process without audit + metrics req/s (paired)",
        "ka32",
        "rps",
        "garrison",
        "garrison",
        0.9,
        True,
        versus_workload="ka32bare",
        paired=True,
    ),
    Check(
        "new TLS conn: Garrison / nginx handshakes/s",
        "newconn",
        "rps",
        "garrison",
        "nginx",
        0.9,
        True,
    ),
    Check(
        "SSE: Garrison added delay mean",
        "sse",
        "added_mean_ms",
        "garrison",
        None,
        1.5,
        False,
        " ms",
    ),
    Check(
        "SSE: Garrison added delay p99", "sse", "added_p99_ms", "garrison", None, 6.0, False, " ms"
    ),
    Check("upload: Garrison / nginx MB/s", "upload", "mb_s", "garrison", "nginx", 1.0, True),
    Check("upload: Garrison peak RSS", "upload", "rss_mb", "garrison", None, 120.0, False, " MB"),
)


def _with_added(results: Results) -> None:
    """Add SSE delay over direct (same repetition) to each proxy's SSE measurements."""
    sse = results.data.get("sse", {})
    direct = sse.get("direct")
    if not direct:
        return
    for reps in sse.values():
        for rep, value in enumerate(reps):
            base = direct[rep] if rep < len(direct) else None
            if value is None or base is None:
                continue
            for key in ("mean", "p99"):
                if f"{key}_ms" in value and f"{key}_ms" in base:
                    value[f"added_{key}_ms"] = value[f"{key}_ms"] - base[f"{key}_ms"]


def median(results: Results, workload: str, target: str, metric: str) -> float | None:
    """The median over repetitions, or None when nothing was measured."""
    reps = results.data.get(workload, {}).get(target, [])
    values = [r[metric] for r in reps if r is not None and metric in r]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def summary_table(results: Results) -> str:
    """The main table: one row per metric, one column per target, then the ratios."""
    names = results.plan.targets
    head = ["workload", "metric", *names, "G/nginx", "G/Caddy", "G2/nginx"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = ""
    for workload, metric, label, digits in ROWS:
        if workload not in results.data:
            continue
        values = {n: median(results, workload, n, metric) for n in names}
        if all(v is None for v in values.values()):
            continue
        title = WORKLOAD_TITLES[workload] if workload != last else ""
        last = workload
        g, g2 = values.get("garrison"), values.get("garrison2")
        nginx, caddy = values.get("nginx"), values.get("caddy")
        ratios = [_ratio(g, nginx), _ratio(g, caddy), _ratio(g2, nginx)]
        if metric.startswith("added_"):
            ratios = ["-", "-", "-"]
        cells = [title, label, *(_fmt(values[n], digits) for n in names), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_table(results: Results) -> str:
    """PASS/MISS against the issue's targets (n/a where a side was not measured)."""
    lines = ["| check | measured | target | result |", "|---|---|---|---|"]
    for check in CHECKS:
        value = median(results, check.workload, check.target, check.metric)
        if check.paired and check.versus is not None:
            value = paired_across(
                results,
                check.workload,
                check.target,
                check.versus,
                check.metric,
                True,
                check.versus_workload,
            )
        elif check.versus is not None:
            versus_workload = check.versus_workload or check.workload
            other = median(results, versus_workload, check.versus, check.metric)
            value = value / other if value is not None and other else None
        sign = "≥" if check.at_least else "≤"
        bound = f"{sign} {check.bound:g}{check.unit}"
        if value is None:
            lines.append(f"| {check.label} | - | {bound} | n/a |")
            continue
        ok = value >= check.bound if check.at_least else value <= check.bound
        shown = f"{value:.2f}{check.unit}"
        lines.append(f"| {check.label} | {shown} | {bound} | {'PASS' if ok else 'MISS'} |")
    return "\n".join(lines)


def paired_difference(
    results: Results, workload: str, versus: str, target: str, metric: str
) -> float | None:
    """The median over repetitions of (workload - versus) on one target, each pair measured in
    the same repetition, next to each other; None without a pair."""
    rows = results.data.get(workload, {}).get(target, [])
    base = results.data.get(versus, {}).get(target, [])
    diffs = [
        a[metric] - b[metric]
        for a, b in zip(rows, base, strict=False)
        if a is not None and b is not None and metric in a and metric in b
    ]
    return statistics.median(diffs) if diffs else None


def redis_cost_lines(results: Results) -> list[str]:
    """What a Redis round trip costs per request, each figure labelled with what was measured.
    Empty when the Redis row was not measured."""
    target = "garrison-redis"
    if not any(results.data.get("ka32limredis", {}).get(target, [])):
        return []

    def shown(value: float | None, unit: str, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f} {unit}".rstrip()

    extra = paired_difference(results, "ka32limredis", "ka32", target, "cpu_us")
    memory = paired_difference(results, "ka32limmem", "ka32", "garrison", "cpu_us")
    extra_key = paired_difference(results, "ka32limredis", "ka32key", target, "cpu_us")
    memory_key = paired_difference(results, "ka32limmem", "ka32key", "garrison", "cpu_us")
    rps = median(results, "ka32limredis", target, "rps")
    plain = median(results, "ka32", target, "rps")
    keyed = median(results, "ka32key", target, "rps")
    rps_mem = median(results, "ka32limmem", "garrison", "rps")
    plain_mem = median(results, "ka32", "garrison", "rps")
    keyed_mem = median(results, "ka32key", "garrison", "rps")
    lines = [
        "| what | measured | how |",
        "|---|---|---|",
        f"| extra Garrison CPU per request, limits in Redis | {shown(extra, 'µs')} | "
        "proxy CPU µs/req of the Redis row minus the plain row, same `garrison-redis` process, "
        "median of the per-repetition differences |",
        f"| extra Garrison CPU per request, limits in memory | {shown(memory, 'µs')} | "
        "the same for the memory row on `garrison` |",
        f"| the same against the API key row (limits alone) | Redis {shown(extra_key, 'µs')}, "
        f"memory {shown(memory_key, 'µs')} | the limits row minus the API key row, same process |",
        f"| redis-server CPU per request | "
        f"{shown(median(results, 'ka32limredis', target, 'redis_cpu_us'), 'µs')} | "
        "user+system time of redis-server during the Redis row / requests |",
        f"| Redis calls per request from Garrison | "
        f"{shown(median(results, 'ka32limredis', target, 'evalsha_req'), 'EVALSHA', 2)} + "
        f"{shown(median(results, 'ka32limredis', target, 'zrem_req'), 'ZREM', 2)} | "
        "INFO commandstats before and after the row / requests (EVALSHA: the admit script; "
        "ZREM: the concurrency slot given back, pipelined; all commands Redis counted, those the "
        "script runs included: "
        f"{shown(median(results, 'ka32limredis', target, 'redis_calls_req'), '', 2)}) |",
        f"| time inside Redis per EVALSHA | "
        f"{shown(median(results, 'ka32limredis', target, 'evalsha_server_us'), 'µs', 1)} | "
        "commandstats usec / calls of Garrison's own admit script during the row |",
        f"| one EVALSHA round trip, idle | "
        f"{shown(median(results, 'ka32limredis', target, 'redis_rtt_us'), 'µs', 1)} | "
        "synchronous redis-py, `EVALSHA` of `return 1` over loopback, median of 2,000, "
        "measured right after the row (client + network + Redis, not Garrison's script) |",
        f"| req/s, Redis row / plain row | {_ratio(rps, plain)} | medians, `garrison-redis` "
        "(the plain row has neither auth nor limits) |",
        f"| req/s, Redis row / API key row | {_ratio(rps, keyed)} | medians, `garrison-redis` |",
        f"| req/s, memory row / plain row | {_ratio(rps_mem, plain_mem)} | medians, `garrison` |",
        f"| req/s, memory row / API key row | {_ratio(rps_mem, keyed_mem)} | medians, `garrison` |",
    ]
    return lines


def paired_across(
    results: Results,
    workload: str,
    target: str,
    versus: str,
    metric: str,
    ratio: bool,
    versus_workload: str | None = None,
) -> float | None:
    """The median over repetitions of target / versus (ratio) or target - versus, the two
    measured in the same repetition (versus in `versus_workload`, by default the same one);
    None without a pair."""
    rows = results.data.get(workload, {}).get(target, [])
    base = results.data.get(versus_workload or workload, {}).get(versus, [])
    values = [
        (a[metric] / b[metric] if ratio else a[metric] - b[metric])
        for a, b in zip(rows, base, strict=False)
        if a is not None and b is not None and metric in a and b.get(metric)
    ]
    return statistics.median(values) if values else None


def observe_cost_lines(results: Results) -> list[str]:
    """What the audit log and metrics cost per request: `garrison` with its defaults (both on)
    against the same process reloaded with both off, next to each other in each repetition.
    Empty when one side was not measured."""
    if not any(results.data.get("ka32", {}).get("garrison", [])) or not any(
        results.data.get("ka32bare", {}).get("garrison", [])
    ):
        return []
    on = median(results, "ka32", "garrison", "rps")
    off = median(results, "ka32bare", "garrison", "rps")
    pairs = paired_across(results, "ka32", "garrison", "garrison", "rps", True, "ka32bare")
    cpu = paired_across(results, "ka32", "garrison", "garrison", "cpu_us", False, "ka32bare")
    cpu_off = median(results, "ka32bare", "garrison", "cpu_us")
    share = f" ({cpu / cpu_off:+.0%} of the bare run's)" if cpu is not None and cpu_off else ""
    return [
        "| what | measured | how |",
        "|---|---|---|",
        f"| req/s, with / without audit + metrics | {'-' if pairs is None else f'{pairs:.2f}x'} "
        "| median of the per-repetition ratios: `garrison` with its defaults (an audit line per "
        "request, fsynced every second; metrics on), and the same process reloaded (SIGHUP) with "
        '`[audit] sink = "off"` and `[metrics] enabled = false`, measured next to each other; '
        "both write the access log |",
        f"| the same, ratio of the medians | {_ratio(on, off)} | keep-alive 32 row / the row "
        "without |",
        f"| extra proxy CPU per request | {'-' if cpu is None else f'{cpu:.0f} µs'}{share} | "
        "proxy CPU µs/req with minus without, median of the per-repetition differences |",
    ]


def _rep_ratio(value: dict[str, float] | None, base: dict[str, float] | None, metric: str) -> str:
    if not value or not base or metric not in value or not base.get(metric):
        return ""
    return f" ({value[metric] / base[metric]:.2f}x)"


def per_rep_table(results: Results) -> str:
    """The headline number of each repetition, to show the spread behind each median; a variant
    row (auth, limits) also shows its ratio to the plain row of the same target and repetition."""
    key = {"sse": "mean_ms", "upload": "mb_s"}  # else req/s
    lines = [
        "| workload | target | " + " | ".join(f"rep {i + 1}" for i in range(results.plan.reps))
    ]
    lines[0] += " |"
    lines.append("|---|---|" + "---|" * results.plan.reps)
    for workload, by_target in results.data.items():
        for name in results.plan.targets:
            reps = by_target.get(name)
            if not reps:
                continue
            metric = key.get(workload, "rps")
            base = results.data.get(VARIANTS.get(workload, ("", ""))[0], {}).get(name, [])
            cells = [
                _fmt(r.get(metric) if r else None, 2 if workload == "sse" else 0)
                + (" *" if r and r.get("bg_cores", 0.0) > NOISY_CORES else "")
                + _rep_ratio(r, base[rep] if rep < len(base) else None, metric)
                for rep, r in enumerate(reps)
            ]
            lines.append(f"| {workload} {metric} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(results: Results, machine: dict[str, str], notes: list[str]) -> str:
    """The whole Markdown report."""
    _with_added(results)
    plan = results.plan
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(results.started))
    p = plan.params
    order = " ".join(plan.targets)
    parts = [
        f"# Garrison benchmark — {when}{' (quick run)' if plan.quick else ''}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        f"Run: {plan.reps} repetitions, order `{order}` then reversed (A B C … C B A), "
        f"medians shown; {p.duration:g} s per wrk/hey run; new-conn clients {p.new_conn_clients}; "
        f"SSE {p.sse_streams} streams x {p.sse_events} events every {p.sse_interval_ms:g} ms; "
        f"upload {p.upload_bytes / 1024**3:g} GiB. Total {results.seconds / 60:.1f} min.",
        "",
        "Targets: " + "; ".join(f"`{n}` = {LABELS[n]}" for n in plan.targets) + ".",
        "",
        "## Results",
        "",
        summary_table(results),
        "",
        "G = Garrison (1 process), G2 = Garrison --workers 2. CPU = user+system time of the "
        "proxy's whole process tree during the run / requests. RSS in MB (10^6 bytes), summed "
        "over the tree.",
        "",
        "## Against the targets",
        "",
        checks_table(results),
        "",
        *(
            ["## Audit log and metrics: the cost per request", "", *observe_cost_lines(results), ""]
            if observe_cost_lines(results)
            else []
        ),
        *(
            ["## Limits in Redis: the cost per request", "", *redis_cost_lines(results), ""]
            if redis_cost_lines(results)
            else []
        ),
        "## TLS served by each target",
        "",
        "| target | server key | CA key | protocol | cipher |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {t['key']} | {t.get('ca', '?')} | {t['version']} | {t['cipher']} |"
            for n, t in results.tls.items()
        ),
        "",
        "## Repetitions",
        "",
        per_rep_table(results),
        "",
        f"`*`: other processes used more than {NOISY_CORES} cores during that measurement.",
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in notes),
    ]
    if results.problems:
        parts += ["", "## Problems", "", *(f"- {p}" for p in results.problems)]
    return "\n".join(parts) + "\n"

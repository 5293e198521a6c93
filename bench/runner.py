"""Runs the workloads: upstream + targets per group, repetitions interleaved A B C … C B A."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs, loadgen, targets, workloads
from bench.certs import CertFiles, make_certs
from bench.machine import REPO
from bench.procs import BackgroundMeter, Proc, Procs, free_port

WORKLOADS = (
    "ka32",
    "ka32key",
    "ka32jwt",
    "ka32limmem",
    "ka32limredis",
    "ka32bare",
    "ka256",
    "newconn",
    "sse",
    "upload",
)
# The variant rows: workload -> (the plain workload it is compared with, what differs). Each runs
# only against VARIANT_TARGETS[workload], right next to its plain workload on the same target.
VARIANTS = {
    "ka32key": ("ka32", "key"),
    "ka32jwt": ("ka32", "jwt"),
    "ka32limmem": ("ka32", "limits"),
    "ka32limredis": ("ka32", "limits"),
    "ka32bare": ("ka32", "bare"),  # the same process, audit log + metrics reloaded off
}
AUTH_VARIANTS = {w: v for w, v in VARIANTS.items() if v[1] in ("key", "jwt")}
VARIANT_TARGETS = {
    "ka32key": (*targets.AUTH_TARGETS, "garrison-redis"),  # also the base of its limits row
    "ka32jwt": targets.AUTH_TARGETS,
    "ka32limmem": tuple(t for t, b in targets.LIMITS_BACKENDS.items() if b == "memory"),
    "ka32limredis": tuple(t for t, b in targets.LIMITS_BACKENDS.items() if b == "redis"),
    "ka32bare": ("garrison",),
}
# Targets that run only some workloads: the Redis-backed Garrison exists for its limits row (and
# the plain row it is compared with).
TARGET_WORKLOADS = {"garrison-redis": ("ka32", "ka32key", "ka32limredis")}
# What makes such a target worth starting: the rows it exists for.
STARTED_FOR = {"garrison-redis": ("ka32key", "ka32limredis")}
_LIMITS = ("ka32", "ka32key", "ka32limmem", "ka32limredis")
_KEEPALIVE = ("ka32", "ka32key", "ka32jwt", "ka32limmem", "ka32limredis", "ka32bare", "ka256")
ALIASES = {
    "keepalive": _KEEPALIVE,
    "small": (*_KEEPALIVE, "newconn"),
    "auth": ("ka32", "ka32key", "ka32jwt"),
    "limits": _LIMITS,
    "observe": ("ka32", "ka32bare"),
}
# Workloads that share one upstream (and one start of every target).
GROUPS = (
    ("small", (*_KEEPALIVE, "newconn")),
    ("sse", ("sse",)),
    ("upload", ("upload",)),
)

Measurement = dict[str, float]
# A measurement is repeated when processes other than ours used more than this many cores.
NOISY_CORES = 0.25
RETRY_PAUSE_S = 3.0


@dataclass
class Plan:
    """What to run."""

    targets: tuple[str, ...]
    workloads: tuple[str, ...]
    reps: int
    params: workloads.Params
    quick: bool = False
    retries: int = 1  # per measurement, while the machine is busy with others' work
    retry_budget_s: float = 180.0  # in all, so that a busy machine cannot stretch a run forever


@dataclass
class Results:
    """Every measurement: results[workload][target][rep] (None where it failed)."""

    plan: Plan
    data: dict[str, dict[str, list[Measurement | None]]] = field(default_factory=dict)
    tls: dict[str, dict[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    retry_seconds: float = 0.0

    def add(self, workload: str, target: str, rep: int, value: Measurement | None) -> None:
        """Record one measurement (or a failure) at its repetition."""
        slots = self.data.setdefault(workload, {}).setdefault(target, [None] * self.plan.reps)
        slots[rep] = value


def expand_workloads(names: list[str]) -> tuple[str, ...]:
    """Resolve --only names and aliases to workload keys, in canonical order."""
    chosen: set[str] = set()
    for name in names:
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in WORKLOADS:
            chosen.add(name)
        else:
            known = ", ".join((*WORKLOADS, *ALIASES))
            raise SystemExit(f"bench: unknown workload {name!r}; choose from {known}")
    return tuple(w for w in WORKLOADS if w in chosen)


def runs_on(workload: str, target: str, variant_targets: Mapping[str, Collection[str]]) -> bool:
    """Whether workload is measured on target: a variant row only on its variant_targets, and a
    target of TARGET_WORKLOADS only in its workloads."""
    if workload in VARIANTS and target not in variant_targets.get(workload, ()):
        return False
    return target not in TARGET_WORKLOADS or workload in TARGET_WORKLOADS[target]


def schedule(
    names: tuple[str, ...],
    order: list[str],
    rep: int,
    variant_targets: Mapping[str, Collection[str]],
) -> list[tuple[str, str]]:
    """(workload, target) in measurement order for one repetition.

    Each workload runs against every target in order (reversed by the caller every other
    repetition). A variant row (auth, limits) runs only against its variant_targets, next to its
    plain workload on the same target: plain, key, JWT, limits on even repetitions and the reverse
    on odd ones, so that neither side of a ratio always comes first.
    """
    pairs: list[tuple[str, str]] = []
    for workload in names:
        if workload in VARIANTS and VARIANTS[workload][0] in names:
            continue  # measured next to its plain workload
        variants = [v for v in names if v in VARIANTS and VARIANTS[v][0] == workload]
        for target in order:
            if not runs_on(workload, target, variant_targets):
                continue
            together = [
                workload,
                *(v for v in variants if runs_on(v, target, variant_targets)),
            ]
            if rep % 2:
                together.reverse()
            pairs += [(w, target) for w in together]
    return pairs


def variant_targets_of(running: list[targets.Target]) -> dict[str, tuple[str, ...]]:
    """VARIANT_TARGETS narrowed to the targets that started with what the row needs (an API key,
    the limits backend)."""
    ready = {t.name for t in running if t.api_key is not None}
    return {w: tuple(t for t in names if t in ready) for w, names in VARIANT_TARGETS.items()}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _python_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def start_upstream(group: str, procs: Procs, workdir: Path) -> tuple[Proc, int]:
    """The group's upstream: nginx (plain HTTP) for small GETs, Python for SSE and uploads."""
    port = free_port()
    if group == "small":
        directory = workdir / "upstream-nginx"
        conf = configs.nginx_upstream(directory, port)
        proc = procs.start("upstream-nginx", ["nginx", "-c", str(conf), "-p", str(directory)])
    else:
        kind = "sse" if group == "sse" else "sink"
        argv = [sys.executable, "-m", "bench.upstreams", kind, str(port)]
        proc = procs.start(f"upstream-{kind}", argv, env=_python_env(), cwd=REPO)
    proc.wait_port(port)
    return proc, port


def _measure(
    results: Results, workload: str, target: targets.Target, rep: int, fn: Callable[[], Measurement]
) -> None:
    """Run fn; again (plan.retries times, within budget) while others load the machine."""
    best: Measurement | None = None
    plan = results.plan
    for attempt in range(plan.retries + 1):
        began = time.monotonic()
        if attempt:
            time.sleep(RETRY_PAUSE_S)
        try:
            with BackgroundMeter() as background:
                value = fn()
        except Exception as exc:
            results.problems.append(f"{workload} / {target.name} / rep {rep + 1}: {exc}")
            _log(f"  {workload:8} {target.name:10} FAILED: {exc}")
            break
        value["bg_cores"] = background.cores
        if best is None or value["bg_cores"] < best["bg_cores"]:
            best = value
        if attempt:
            results.retry_seconds += time.monotonic() - began
        if background.cores <= NOISY_CORES or results.retry_seconds >= plan.retry_budget_s:
            break
        _log(f"  {workload:8} {target.name:10} other processes used {background.cores:.2f} cores")
    if best is not None:
        best["attempts"] = float(attempt + 1)
    results.add(workload, target.name, rep, best)
    if best is not None:
        if best.get("errors", 0.0) > 0.01 * max(best.get("requests", 0.0), 1.0):
            results.problems.append(
                f"{workload} / {target.name} / rep {rep + 1}: {best['errors']:.0f} errors"
            )
        shown = ", ".join(f"{k}={v:.4g}" for k, v in best.items())
        _log(f"  {workload:8} {target.name:10} {shown}")


def _runner(
    workload: str, target: targets.Target, params: workloads.Params, upload_file: Path
) -> Callable[[], Measurement]:
    if workload == "ka32":
        return lambda: workloads.keepalive(target, 32, params)
    if workload == "ka32bare":
        return lambda: workloads.keepalive_unobserved(target, params)
    if workload in AUTH_VARIANTS:
        kind = AUTH_VARIANTS[workload][1]
        return lambda: workloads.keepalive(target, 32, params, auth=kind)
    if workload in VARIANTS:
        return lambda: workloads.keepalive(target, 32, params, limits=True)
    if workload == "ka256":
        return lambda: workloads.keepalive(target, 256, params)
    if workload == "newconn":
        return lambda: workloads.new_connections(target, params)
    if workload == "sse":
        return lambda: workloads.sse(target, params)
    return lambda: workloads.upload(target, upload_file)


def _warm_up(group: str, target: targets.Target, workdir: Path, duration: float) -> None:
    """A short unrecorded run, so that no target pays its first-use costs in a measurement."""
    if group == "small":
        loadgen.wrk(f"{target.base_url}/", 32, min(1.0, duration))
        if target.api_key is not None:  # the identity caches, filled before the measurements
            for kind, path in configs.AUTH_ROUTES.items():
                headers = targets.auth_headers(target, kind)
                loadgen.wrk(f"{target.base_url}{path}", 32, min(1.0, duration), headers=headers)
            url = f"{target.base_url}{configs.LIMITS_ROUTE}"
            headers = targets.key_headers(target)
            loadgen.wrk(url, 32, min(1.0, duration), headers=headers)
    elif group == "sse":
        workloads.sse(target, workloads.Params(sse_streams=20, sse_events=10))
    else:
        loadgen.curl_upload(
            f"{target.base_url}/upload", loadgen.sparse_file(workdir / "warmup.bin", 64 * 1024**2)
        )


def _run_group(
    group: str,
    names: tuple[str, ...],
    plan: Plan,
    results: Results,
    workdir: Path,
    certs: CertFiles,
) -> None:
    upload_file = loadgen.sparse_file(workdir / "upload.bin", plan.params.upload_bytes)
    with Procs(workdir / "logs" / group) as procs:
        _, upstream_port = start_upstream(group, procs, workdir / group)
        running: list[targets.Target] = []
        for name in plan.targets:
            wanted_for = STARTED_FOR.get(name)
            if wanted_for is not None and not any(w in names for w in wanted_for):
                continue  # started only for the rows it exists for
            try:
                target = targets.start(name, procs, workdir / group, upstream_port, certs)
                _warm_up(group, target, workdir, plan.params.duration)
            except Exception as exc:
                results.problems.append(f"{group}: {name} did not start: {exc}")
                _log(f"{name} did not start: {exc}")
                continue
            if target.tls:
                results.tls.setdefault(name, target.tls)
            running.append(target)
        by_name = {t.name: t for t in running}
        variant_targets = variant_targets_of(running)
        for rep in range(plan.reps):
            order = running if rep % 2 == 0 else running[::-1]
            _log(f"{group}: repetition {rep + 1}/{plan.reps}: {' '.join(t.name for t in order)}")
            for workload, name in schedule(names, [t.name for t in order], rep, variant_targets):
                target = by_name[name]
                run_one = _runner(workload, target, plan.params, upload_file)
                _measure(results, workload, target, rep, run_one)
                time.sleep(0.5)


def run(plan: Plan, workdir: Path) -> Results:
    """Run the plan in workdir (created), returning every measurement."""
    results = Results(plan)
    workdir.mkdir(parents=True, exist_ok=True)
    certs = make_certs(workdir / "certs")
    for group, members in GROUPS:
        names = tuple(w for w in members if w in plan.workloads)
        if not names:
            continue
        _log(f"group {group}: {', '.join(names)} against {', '.join(plan.targets)}")
        try:
            _run_group(group, names, plan, results, workdir, certs)
        except Exception as exc:
            results.problems.append(f"{group}: {exc}")
            _log(f"group {group} failed:\n{traceback.format_exc()}")
    results.seconds = time.time() - results.started
    return results

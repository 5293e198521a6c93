"""Metrics across `--workers N`: prometheus-client's multiprocess mode.

Each worker is a separate process and a scrape reaches one of them, so with several workers
every metric value lives in a small mmap file under `<data dir>/metrics/` and a scrape sums
the files of all workers. The supervisor empties the folder before it forks (counts of an
earlier run must not leak into this one) and calls `worker_gone(pid)` when it reaps a worker,
which drops that worker's live gauges while its counters keep counting in the totals.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import multiprocess, values

from garrison.observe import metrics, request_metrics

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(data_dir: Path) -> Path:
    """In the supervisor, before any fork: a fresh, private folder for the value files."""
    folder = data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    os.environ[ENV] = str(folder)
    return folder


def enable(folder: Path) -> None:
    """In a worker, right after the fork and before it serves: values go to files.

    Children resolved before the fork hold in-process values, so they are dropped (and made
    again on first use, now file-backed); the caches pointing at them are forgotten too."""
    os.environ[ENV] = str(folder)
    values.ValueClass = values.MultiProcessValue()
    for metric in metrics.all_metrics():
        if metric._labelnames:
            metric.clear()
        else:
            metric._metric_init()
    request_metrics.reset_caches()
    metrics.reset_caches()
    metrics.use_multiprocess(str(folder))


def worker_gone(pid: int) -> None:
    """In the supervisor, after reaping `pid`: its live gauges (in flight, queued) go."""
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)

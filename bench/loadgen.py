"""The load generators: wrk (keep-alive), hey (a new TLS connection per request), curl (upload).

Each runs as a subprocess with a bounded duration and returns a dict of numbers parsed from its
output. Nothing here knows which target it is talking to.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class LoadError(RuntimeError):
    """A load generator failed or printed something we cannot read."""


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{argv[0]} ran past {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-1000:]}")
    return done.stdout


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS_S[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """req/s, requests, errors, p50/p99 latency (ms) from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rps or not total:
        raise LoadError(f"cannot read wrk output:\n{output}")
    result = {"rps": float(rps.group(1)), "requests": float(total.group(1))}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
        if match:
            result[f"p{pct}_ms"] = _seconds(match.group(1), match.group(2)) * 1000
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = float(non_2xx.group(1)) if non_2xx else 0.0
    result["errors"] = float(errors) + result["non_2xx"]
    return result


def wrk_argv(
    url: str,
    connections: int,
    duration: float,
    threads: int = 2,
    headers: Mapping[str, str] | None = None,
) -> list[str]:
    """The wrk command line; each header goes as `-H 'Name: value'`."""
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--timeout",
        "5s",
        "--latency",
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, url]


def wrk(
    url: str,
    connections: int,
    duration: float,
    threads: int = 2,
    headers: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Keep-alive GETs with wrk for duration seconds (non_2xx: wrk's non-2xx/3xx count)."""
    argv = wrk_argv(url, connections, duration, threads, headers)
    return parse_wrk(_run(argv, duration + 30))


def parse_hey(output: str) -> dict[str, float]:
    """req/s, responses, errors, p50/p99 latency (ms) from hey's summary."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise LoadError(f"cannot read hey output:\n{output}")
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", output)}
    ok = sum(n for c, n in codes.items() if 200 <= c < 400)
    result = {"rps": float(rps.group(1)), "requests": float(ok)}
    for pct in ("50", "99"):
        match = re.search(rf"{pct}% in ([\d.]+) secs", output)
        if match:
            result[f"p{pct}_ms"] = float(match.group(1)) * 1000
    errors = sum(n for c, n in codes.items() if not 200 <= c < 400)
    error_block = output.split("Error distribution:", 1)
    if len(error_block) == 2:
        errors += sum(int(n) for n in re.findall(r"\[(\d+)\]", error_block[1]))
    result["errors"] = float(errors)
    # hey's Requests/sec counts errors too; report successful responses per second.
    total = re.search(r"Total:\s+([\d.]+) secs", output)
    if total and float(total.group(1)) > 0:
        result["rps"] = ok / float(total.group(1))
    return result


def hey_new_connections(url: str, connections: int, duration: float) -> dict[str, float]:
    """One new connection (a full TLS handshake over https) per request, with hey."""
    argv = ["hey", "-z", f"{duration:g}s", "-c", str(connections), "-disable-keepalive", url]
    return parse_hey(_run(argv, duration + 30))


def sparse_file(path: Path, size: int) -> Path:
    """A file of size zero bytes that takes no disk space, read once so that it is in the page
    cache (the first read of a hole allocates pages: it would slow the first upload down)."""
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as handle:
            handle.truncate(size)
        with open(path, "rb", buffering=0) as handle:
            chunk = bytearray(1 << 20)
            while handle.readinto(chunk):
                pass
    return path


def curl_upload(url: str, source: Path, timeout: float = 300) -> dict[str, float]:
    """POST the file with curl (streamed, Content-Length known); MB/s = 10^6 bytes per second."""
    argv = [
        "curl",
        "-sS",
        "-k",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        "-H",
        "Expect:",
        "-H",
        "Content-Type: application/octet-stream",
        "-T",
        str(source),
        "-w",
        "%{http_code} %{size_upload} %{time_total}",
        url,
    ]
    status, size, seconds = _run(argv, timeout).split()
    if status != "200":
        raise LoadError(f"upload answered {status}")
    uploaded = float(size)
    return {"mb_s": uploaded / float(seconds) / 1e6, "bytes": uploaded, "seconds": float(seconds)}

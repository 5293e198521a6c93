"""What the numbers were measured on: CPU, kernel, tool versions, Garrison's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def describe() -> dict[str, str]:
    """A small mapping of facts about this machine and the tools used."""
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": _first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        "caddy": _first_line(["caddy", "version"]).split(" ")[0],
        "wrk": _first_line(["wrk", "--version"]).split(" [")[0],
        "curl": " ".join(_first_line(["curl", "--version"]).split()[:2]),
        "openssl": _first_line(["openssl", "version"]),
        "garrison": commit + (" (src modified)" if dirty not in ("", "?") else ""),
    }

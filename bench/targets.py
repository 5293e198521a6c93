"""The targets: the direct upstream (the ceiling), nginx, Caddy, Garrison (1 and 2 workers), and
Garrison with its limit counters in a redis-server of its own (the limits rows only).

A target is started in front of one upstream port and probed once over TLS, so that the results can
say which certificate key and TLS version each one actually served.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import configs
from bench.certs import CertFiles, describe_key
from bench.procs import Proc, Procs, free_port

ALL_TARGETS = ("direct", "nginx", "caddy", "garrison", "garrison2", "garrison-redis")
LABELS = {
    "direct": "direct (no proxy, plain HTTP)",
    "nginx": "nginx (1 worker)",
    "caddy": "Caddy",
    "garrison": "Garrison (1 process)",
    "garrison2": "Garrison (--workers 2)",
    "garrison-redis": "Garrison (1 process, `[limits] backend` = its own redis-server)",
}
GARRISONS = ("garrison", "garrison2", "garrison-redis")
# The targets with the authenticated routes of configs.AUTH_ROUTES (an API key made at start).
AUTH_TARGETS = ("garrison", "garrison2")
# Where each Garrison keeps the counters of configs.LIMITS_ROUTE.
LIMITS_BACKENDS = {
    "garrison": "memory",
    "garrison2": "memory",
    "garrison-redis": "redis",
}


@dataclass
class Target:
    """One running target: where to send requests and which process tree to measure."""

    name: str
    base_url: str
    proc: Proc | None = None
    access_log: Path | None = None
    tls: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None  # Garrison only: a key with scope "bench"
    limits: str | None = None  # Garrison only: LIMITS_BACKENDS[name]
    redis: Proc | None = None  # garrison-redis only: its redis-server
    redis_port: int | None = None
    config: Path | None = None  # Garrison only: its config file (the observe row reloads it)


def garrison_executable() -> str:
    """The `garrison` script of this venv, else the one on PATH."""
    local = Path(sys.executable).with_name("garrison")
    if local.exists():
        return str(local)
    found = shutil.which("garrison")
    if not found:
        raise RuntimeError("garrison is not installed in this environment")
    return found


def probe_tls(port: int) -> dict[str, str]:
    """Handshake once with 127.0.0.1:port (no verification) and describe what was served."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), 5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
        cipher = tls.cipher()
        return {
            "key": describe_key(der) if der else "?",
            "version": tls.version() or "?",
            "cipher": cipher[0] if cipher else "?",
        }


def _insecure() -> ssl.SSLContext:
    """Loopback bench traffic to a throwaway certificate: no verification."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_get(
    url: str, headers: dict[str, str] | None = None, form: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one GET (or form POST) with urllib; an
    error status is returned too."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=_insecure()) as response:
            got = {k.lower(): v for k, v in response.headers.items()}
            return response.status, got, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def http_status(
    url: str, headers: dict[str, str] | None = None, form: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of one GET (or form POST) with urllib; an error status is returned too."""
    status, _, body = http_get(url, headers, form)
    return status, body


def create_api_key(data_dir: Path) -> str:
    """`garrison key create bench --scope bench` in the gateway's data dir: the key."""
    argv = [garrison_executable(), "key", "create", "bench", "--scope", "bench"]
    done = subprocess.run(
        [*argv, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    key = done.stdout.strip()
    if done.returncode != 0 or not key.startswith("gk_"):
        raise RuntimeError(f"garrison key create failed ({done.returncode}): {done.stderr[-500:]}")
    return key


def fetch_jwt(target: Target) -> str:
    """A fresh access token for the target's API key (client-credentials grant)."""
    if target.api_key is None:
        raise RuntimeError(f"{target.name} has no API key")
    form = {"grant_type": "client_credentials", "client_secret": target.api_key}
    status, body = http_status(f"{target.base_url}/.garrison/token", form=form)
    if status != 200:
        raise RuntimeError(f"{target.name}: token endpoint answered {status}: {body[:200]!r}")
    return str(json.loads(body)["access_token"])


def auth_headers(target: Target, kind: str) -> dict[str, str]:
    """The Authorization header of an auth row: "key" (the API key) or "jwt" (a fresh token)."""
    if target.api_key is None:
        raise RuntimeError(f"{target.name} has no API key")
    credential = target.api_key if kind == "key" else fetch_jwt(target)
    return {"Authorization": f"Bearer {credential}"}


def require_status(url: str, expected: int, headers: dict[str, str] | None = None) -> None:
    """Fail loudly unless one request to url answers expected."""
    status, body = http_status(url, headers)
    if status != expected:
        raise RuntimeError(f"GET {url} answered {status}, not {expected}: {body[:200]!r}")


def key_headers(target: Target) -> dict[str, str]:
    """`Authorization: Bearer <the target's API key>`: the credential of the limits rows."""
    if target.api_key is None:
        raise RuntimeError(f"{target.name} has no API key")
    return {"Authorization": f"Bearer {target.api_key}"}


def require_limited(url: str, headers: dict[str, str]) -> None:
    """Fail loudly unless one request to url is admitted (200) by the limits stage: the response
    must carry `RateLimit-Limit`, which only that stage adds."""
    status, got, body = http_get(url, headers)
    if status != 200:
        raise RuntimeError(f"GET {url} answered {status}, not 200: {body[:200]!r}")
    if "ratelimit-limit" not in got:
        raise RuntimeError(f"GET {url}: no RateLimit-Limit header; the limits stage did not run")


def check_limits_route(target: Target) -> None:
    """The limits route refuses no credentials and admits the API key, with RateLimit-* headers."""
    url = f"{target.base_url}{configs.LIMITS_ROUTE}"
    require_status(url, 401)
    require_limited(url, key_headers(target))


def redis_server_executable() -> str:
    """redis-server on PATH (or /usr/bin); the Redis row cannot run without it."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise RuntimeError(
            "redis-server is not installed: the limits (Redis) row needs it (make sysdeps)"
        )
    return found


def start_redis(procs: Procs) -> tuple[Proc, int]:
    """A throwaway redis-server on a free 127.0.0.1 port (stopped by PID with the other procs)."""
    port = free_port()
    proc = procs.start("redis", configs.redis_argv(redis_server_executable(), port))
    proc.wait_port(port)
    if redis_client(port).ping() is not True:
        raise RuntimeError(f"redis-server on port {port} does not answer PING")
    return proc, port


def redis_client(port: int) -> redis.Redis:
    """A synchronous redis-py client of the bench's redis-server."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def redis_counts(port: int) -> dict[str, float]:
    """Commands Redis has run so far: EVALSHA calls, the µs Redis spent in them, ZREM calls, and
    all calls (commandstats also counts the commands a script runs with redis.call)."""
    stats = redis_client(port).info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    return {
        "evalsha": float(evalsha.get("calls", 0)),
        "evalsha_usec": float(evalsha.get("usec", 0)),
        "zrem": float(stats.get("cmdstat_zrem", {}).get("calls", 0)),
        "calls": float(sum(v.get("calls", 0) for v in stats.values() if isinstance(v, dict))),
    }


def redis_round_trip_us(port: int, count: int = 2000) -> float:
    """Median µs of one EVALSHA of a one-line script (`return 1`) with synchronous redis-py over
    loopback: the network + client cost of a round trip, without Garrison's script."""
    client = redis_client(port)
    sha = client.script_load("return 1")
    samples = []
    for _ in range(count):
        began = time.perf_counter_ns()
        client.evalsha(sha, 0)
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1000


def check_auth_routes(target: Target) -> None:
    """The baseline is public, the auth routes refuse no credentials and accept theirs."""
    require_status(f"{target.base_url}/", 200)
    for kind, path in configs.AUTH_ROUTES.items():
        url = f"{target.base_url}{path}"
        require_status(url, 401)
        require_status(url, 200, auth_headers(target, kind))


def start(name: str, procs: Procs, workdir: Path, upstream_port: int, certs: CertFiles) -> Target:
    """Start target name in front of 127.0.0.1:upstream_port; return when it accepts requests."""
    if name == "direct":
        return Target(name, f"http://127.0.0.1:{upstream_port}")
    port = free_port()
    directory = workdir / name
    api_key: str | None = None
    redis_proc: Proc | None = None
    redis_port: int | None = None
    if name == "nginx":
        conf = configs.nginx_proxy(directory, port, upstream_port, certs)
        proc = procs.start(name, ["nginx", "-c", str(conf), "-p", str(directory)])
        proc.wait_port(port)
    elif name == "caddy":
        conf = configs.caddyfile(directory, port, upstream_port, certs)
        home = {k: str(directory) for k in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")}
        argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
        proc = procs.start(name, argv, env=home)
        proc.wait_port(port)
    elif name in GARRISONS:
        backend = "memory"
        if LIMITS_BACKENDS[name] == "redis":
            redis_proc, redis_port = start_redis(procs)
            backend = configs.redis_url(redis_port)
        conf = configs.garrison_config(directory, certs, upstream_port, backend)
        data_dir = directory / "data"
        api_key = create_api_key(data_dir)
        argv = [
            garrison_executable(),
            "up",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data_dir),
            "--config",
            str(conf),
        ]
        if name == "garrison2":
            argv += ["--workers", "2"]
        proc = procs.start(name, argv)
        proc.wait_output("ready", timeout=60)
        proc.wait_port(port)
    else:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")
    target = Target(name, f"https://127.0.0.1:{port}", proc, directory / "access.log")
    if name in GARRISONS:
        target.config = directory / "garrison.toml"
    if api_key is not None:
        target.api_key = api_key
        target.limits = LIMITS_BACKENDS[name]
        target.redis, target.redis_port = redis_proc, redis_port
        check_auth_routes(target)
        check_limits_route(target)
    target.tls = probe_tls(port)
    target.tls["ca"] = describe_key(_ca_path(proc, certs).read_bytes())
    return target


RELOADED = "configuration reloaded"


def reload_config(target: Target, text: str, timeout: float = 30.0) -> None:
    """Write Garrison's config and SIGHUP it; return once it says the reload is done (a refused
    reload fails the measurement: it would measure the wrong thing)."""
    if target.proc is None or target.config is None:
        raise RuntimeError(f"{target.name} is not a Garrison with a config file")
    done = target.proc.output().count(RELOADED)
    target.config.write_text(text)
    os.kill(target.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while target.proc.output().count(RELOADED) <= done:
        if "reload refused" in target.proc.output()[-4000:] or time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: reload failed\n{target.proc.output()[-1000:]}")
        target.proc.check_alive()
        time.sleep(0.05)


def _ca_path(proc: Proc, certs: CertFiles) -> Path:
    """The CA a target's certificate chains to: Garrison's own (as it prints it) or the bench's."""
    match = re.search(r"CA certificate \(trust this\): (\S+)", proc.output())
    return Path(match.group(1)) if match else certs.ca

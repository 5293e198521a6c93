"""The targets: the direct upstream (the ceiling), nginx, Caddy, Garrison (1 and 2 workers).

A target is started in front of one upstream port and probed once over TLS, so that the results can
say which certificate key and TLS version each one actually served.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import configs
from bench.certs import CertFiles, describe_key
from bench.procs import Proc, Procs, free_port

ALL_TARGETS = ("direct", "nginx", "caddy", "garrison", "garrison2")
LABELS = {
    "direct": "direct (no proxy, plain HTTP)",
    "nginx": "nginx (1 worker)",
    "caddy": "Caddy",
    "garrison": "Garrison (1 process)",
    "garrison2": "Garrison (--workers 2)",
}
# The targets with the authenticated routes of configs.AUTH_ROUTES (an API key made at start).
AUTH_TARGETS = ("garrison", "garrison2")


@dataclass
class Target:
    """One running target: where to send requests and which process tree to measure."""

    name: str
    base_url: str
    proc: Proc | None = None
    access_log: Path | None = None
    tls: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None  # AUTH_TARGETS only: a key with scope "bench"


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


def http_status(
    url: str, headers: dict[str, str] | None = None, form: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of one GET (or form POST) with urllib; an error status is returned too."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=_insecure()) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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
    elif name in ("garrison", "garrison2"):
        conf = configs.garrison_config(directory, certs, upstream_port)
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
    if api_key is not None:
        target.api_key = api_key
        check_auth_routes(target)
    target.tls = probe_tls(port)
    target.tls["ca"] = describe_key(_ca_path(proc, certs).read_bytes())
    return target


def _ca_path(proc: Proc, certs: CertFiles) -> Path:
    """The CA a target's certificate chains to: Garrison's own (as it prints it) or the bench's."""
    match = re.search(r"CA certificate \(trust this\): (\S+)", proc.output())
    return Path(match.group(1)) if match else certs.ca

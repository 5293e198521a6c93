"""The targets: the direct upstream (the ceiling), nginx, Caddy, Garrison (1 and 2 workers).

A target is started in front of one upstream port and probed once over TLS, so that the results can
say which certificate key and TLS version each one actually served.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import sys
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


@dataclass
class Target:
    """One running target: where to send requests and which process tree to measure."""

    name: str
    base_url: str
    proc: Proc | None = None
    access_log: Path | None = None
    tls: dict[str, str] = field(default_factory=dict)


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


def start(name: str, procs: Procs, workdir: Path, upstream_port: int, certs: CertFiles) -> Target:
    """Start target name in front of 127.0.0.1:upstream_port; return when it accepts requests."""
    if name == "direct":
        return Target(name, f"http://127.0.0.1:{upstream_port}")
    port = free_port()
    directory = workdir / name
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
        conf = configs.garrison_config(directory, certs)
        argv = [
            garrison_executable(),
            "up",
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(directory / "data"),
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
    target.tls = probe_tls(port)
    target.tls["ca"] = describe_key(_ca_path(proc, certs).read_bytes())
    return target


def _ca_path(proc: Proc, certs: CertFiles) -> Path:
    """The CA a target's certificate chains to: Garrison's own (as it prints it) or the bench's."""
    match = re.search(r"CA certificate \(trust this\): (\S+)", proc.output())
    return Path(match.group(1)) if match else certs.ca

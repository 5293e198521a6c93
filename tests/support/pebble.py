"""A real Pebble (Let's Encrypt's test ACME server) and pebble-challtestsrv for tests.

ACME must be tested against an ACME server, not a fake that agrees with our reading of RFC 8555:
Pebble validates HTTP-01 for real, rejects nonces, reuses authorizations at random and signs
with a new root on each start. challtestsrv runs as DNS only and answers every name with
127.0.0.1, so Pebble's validator fetches ``http://<name>:<http_port>/.well-known/...`` from
whatever listens on 127.0.0.1:<http_port> (the gateway under test, or a wrong responder).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = shutil.which("pebble") or (
    "/usr/bin/pebble" if os.path.exists("/usr/bin/pebble") else None
)
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or (
    "/usr/bin/pebble-challtestsrv" if os.path.exists("/usr/bin/pebble-challtestsrv") else None
)
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_listener_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a localhost/127.0.0.1 certificate for Pebble's own HTTPS listener
    (the Debian package ships none). Returns (ca, cert, key) paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


class Pebble:
    """Pebble + challtestsrv on 127.0.0.1 ephemeral ports; `http_port` is where Pebble's
    validator connects for HTTP-01, so the gateway under test listens there for plain HTTP.

    `stop()`/`start()` restart Pebble alone on the same ports (for "ACME server down" tests);
    each start makes a new root, so read `root_pem()` after a start.
    """

    def __init__(self, workdir: Path, nonce_reject: int = 0) -> None:
        self.workdir = workdir
        self.nonce_reject = nonce_reject  # percentage of good nonces Pebble answers badNonce
        self.port = free_port()
        self.management_port = free_port()
        self.http_port = free_port()
        self.tls_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self.listener_ca, cert, key = _write_listener_cert(workdir)
        self.config_path = workdir / "pebble-config.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(cert),
                        "privateKey": str(key),
                        "httpPort": self.http_port,
                        "tlsPort": self.tls_port,
                        # Only written into certificates (nothing answers there): without an
                        # OCSP URI, testssl.sh rates every Pebble certificate HIGH
                        # ("neither CRL nor OCSP URI"), a property of the test CA.
                        "ocspResponderURL": f"http://127.0.0.1:{free_port()}/ocsp",
                        "externalAccountBindingRequired": False,
                    }
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.dns: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.listener_ca))

    def start_dns(self) -> None:
        assert CHALLTESTSRV is not None
        self.dns = subprocess.Popen(
            [
                CHALLTESTSRV,
                "-dns01", f"127.0.0.1:{self.dns_port}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{self.dns_management_port}",
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
            ],
            stdout=(self.workdir / "challtestsrv.log").open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> None:
        assert PEBBLE is not None
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject),
        }
        self.proc = subprocess.Popen(
            [
                PEBBLE,
                "-config", str(self.config_path),
                "-dnsserver", f"127.0.0.1:{self.dns_port}",
            ],
            stdout=(self.workdir / "pebble.log").open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pebble exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    self.directory, context=self._context(), timeout=1
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pebble did not answer within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "pebble.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def root_pem(self) -> bytes:
        """The root Pebble signs with (new on each start), from its management interface."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=5) as resp:
            return resp.read()

    def stop(self) -> None:
        """Kill Pebble (not challtestsrv) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self.dns is not None and self.dns.poll() is None:
            self.dns.kill()
            self.dns.wait(timeout=10)


def pebble_or_skip(workdir: Path, nonce_reject: int = 0) -> Pebble:
    """A started Pebble; without the binaries: fail under CI=true, else skip (with why)."""
    if PEBBLE is None or CHALLTESTSRV is None:
        reason = "pebble not installed (apt-get install pebble, or make sysdeps)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    server = Pebble(workdir, nonce_reject)
    server.start_dns()
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server

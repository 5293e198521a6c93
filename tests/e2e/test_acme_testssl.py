"""testssl.sh against `garrison up` serving a Pebble-issued certificate (issue 6, item 5).

The scan trusts Pebble's root (--add-ca), so the only thing "private" about the test PKI is
already accounted for; every other HIGH or CRITICAL finding is a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fixtures_core import config, need_tool, running_gateway
from tests.support.pebble import Pebble, pebble_or_skip
from tests.support.upstream import FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "chat.example.com"
SCAN_TIMEOUT_S = 540


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    work = tmp_path / "pebble"
    work.mkdir()
    server = pebble_or_skip(work)
    try:
        yield server
    finally:
        server.close()


def test_testssl_finds_nothing_high_or_critical(
    tmp_path: Path, upstream: FakeUpstream, pebble: Pebble
) -> None:
    testssl = need_tool(shutil.which("testssl") or shutil.which("testssl.sh"), "testssl.sh")
    text = config(
        upstream.url,
        server=f'http_listen = "127.0.0.1:{pebble.http_port}"\n',
        upstreams=f"""
[tls]
source = "acme"
[tls.acme]
directory = "{pebble.directory}"
names = ["{NAME}"]
ca_bundle = "{pebble.listener_ca}"
""",
    )
    with running_gateway(tmp_path, text) as gw:
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        report = tmp_path / "testssl.json"
        scan = subprocess.run(
            [testssl, "--quiet", "--color", "0", "--warnings", "off",
             "--jsonfile", str(report), "--ip", "127.0.0.1", "--add-ca", str(root),
             f"https://{NAME}:{gw.port}"],
            capture_output=True, text=True, timeout=SCAN_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert report.exists(), scan.stdout[-3000:] + scan.stderr[-2000:]
    findings = json.loads(report.read_text())
    by_id = {f["id"]: f for f in findings}
    # The scan really ran against our certificate and our TLS settings.
    assert by_id["cert_chain_of_trust"]["finding"].startswith("passed"), by_id[
        "cert_chain_of_trust"
    ]
    assert by_id["cert_trust"]["severity"] == "OK", by_id["cert_trust"]
    assert "not offered" in by_id["TLS1"]["finding"] and "not offered" in by_id["SSLv3"]["finding"]
    assert by_id["HSTS_time"]["severity"] == "OK", by_id["HSTS_time"]
    bad = [
        f"{f['severity']} {f['id']}: {f['finding']}"
        for f in findings
        if f.get("severity") in ("HIGH", "CRITICAL")
    ]
    assert bad == [], "\n".join(bad)

"""`/.garrison/metrics` end to end (issue 7): real traffic through a real gateway, then a
scrape. Counters must match what was sent, labels must stay bounded whatever paths clients
use, the text must pass `promtool check metrics` (and the prometheus-client parser), only
allowed addresses or admins may scrape, and with `--workers 2` one scrape sums both workers."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.fixtures_core import (
    OPEN,
    ci,
    client_context,
    dead_upstream,
    demo_upstream,
    gateway_config,
    route_toml,
    running_gateway,
    upstream_toml,
)
from tests.e2e.fixtures_stream import wait_until
from tests.e2e.test_auth import cli, login, new_key
from tests.e2e.test_limits import _chat
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

RANDOM_PATHS = 1000
OTHER_LOOPBACK = "127.0.0.2"  # Linux routes all of 127/8 to lo: a second client address
HELD_CONNECTIONS = 24  # all on one of two workers: probability 2**-23
FLUSH_WAIT_S = 10.0  # workers flush every second; this bounds how long a failure takes


def config(upstream: str, demo: str, metrics: str = "") -> str:
    return gateway_config(
        upstream,
        dead_upstream("gone"),
        upstream_toml("llm", demo),
        route_toml("/open/", "app", OPEN),
        route_toml("/keyed/"),
        route_toml("/rated/", "app", OPEN, 'rate = ["2/minute"]'),
        route_toml("/broken/", "gone", OPEN),
        route_toml("/v1/", "llm", 'tokens = "100000/minute"'),
        metrics,
    )


@pytest.fixture(scope="module")
def demo() -> Iterator[str]:
    with demo_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, demo: str
) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("metrics"), config(upstream.url, demo)) as g:
        yield g


def client(gw: GatewayProcess, key: str | None = None, source: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(verify=client_context(gw), local_address=source)
    return httpx.Client(base_url=gw.url, headers=headers, transport=transport, timeout=30)


def scrape(gw: GatewayProcess, key: str | None = None, source: str | None = None) -> str:
    with closing(client(gw, key, source)) as c:
        resp = c.get("/.garrison/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "no-store" in resp.headers["cache-control"]
    return resp.text


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample, through the strict parser (it raises on any malformed line)."""
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in samples(text)
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    )


def test_counters_follow_real_traffic(gw: GatewayProcess, demo: str) -> None:
    key = new_key(gw, "metered", "x")
    before = scrape(gw)
    with closing(client(gw)) as c:
        assert [c.get("/open/a").status_code for _ in range(3)] == [200] * 3
        assert [c.get("/keyed/a").status_code for _ in range(2)] == [401] * 2
        assert [c.get("/rated/a").status_code for _ in range(3)] == [200, 200, 429]
        assert c.get("/broken/a").status_code == 502
    with closing(client(gw, key)) as c:
        assert c.get("/keyed/a").status_code == 200
        chat = _chat(c, stream=False)
        assert chat.status_code == 200
        used = chat.json()["usage"]["total_tokens"]
    after = scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    req = "garrison_requests_total"
    assert delta(req, route="/open/", status="200", identity="none") == 3
    assert delta(req, route="/keyed/", status="401", identity="none") == 2
    assert delta(req, route="/keyed/", status="200", identity="api_key") == 1
    assert delta(req, route="/rated/", status="200") == 2
    assert delta(req, route="/rated/", status="429") == 1
    assert delta(req, route="/broken/", status="502") == 1
    assert delta("garrison_limit_refusals_total", limit="rate") == 1
    assert delta("garrison_auth_failures_total") == 2
    assert delta("garrison_request_duration_seconds_count", route="/open/") == 3
    assert delta("garrison_tls_handshakes_total", version="TLSv1.3") >= 2  # two clients
    now = time.time()
    for kind in ("server", "ca"):  # the private CA and the certificate it issued
        expiry = total(after, "garrison_certificate_expiry_timestamp_seconds", kind=kind)
        assert expiry > now, kind
    # Upstream latency only for requests that reached an upstream (not the 401s or the 502).
    assert delta("garrison_upstream_duration_seconds_count", route="/keyed/") == 1
    assert delta("garrison_upstream_duration_seconds_count", route="/broken/") == 0
    # Token usage per identity: the key's id, as `garrison key list` names it.
    assert used > 0 and delta("garrison_tokens_total") == used
    spenders = {
        lab["identity"]
        for n, lab, v in samples(after)
        if n == "garrison_tokens_total" and v != total(before, n, identity=lab["identity"])
    }
    assert len(spenders) == 1 and spenders.pop().startswith("key:")


def test_random_paths_do_not_become_label_values(gw: GatewayProcess) -> None:
    with closing(client(gw)) as c:
        for n in range(RANDOM_PATHS):
            c.get(f"/nowhere-{n}/x{n}")  # no route: 404 from the gateway
            c.get(f"/open/deep/{n}")  # one route, a thousand request paths
    text = scrape(gw)
    values: dict[str, set[str]] = {}
    for name, labels, _v in samples(text):
        for label, value in labels.items():
            values.setdefault(f"{name}:{label}", set()).add(value)
    routes = values["garrison_requests_total:route"]
    assert routes <= {"/open/", "/keyed/", "/rated/", "/broken/", "/v1/", "gateway", "none"}
    assert total(text, "garrison_requests_total", route="none") >= RANDOM_PATHS
    assert total(text, "garrison_requests_total", route="/open/") >= RANDOM_PATHS
    assert all(len(v) < 60 for k, v in values.items() if not k.endswith(":le")), {
        k: len(v) for k, v in values.items()
    }
    assert "nowhere" not in text and "/open/deep" not in text


def test_promtool_accepts_a_real_scrape(gw: GatewayProcess) -> None:
    with closing(client(gw)) as c:
        c.get("/open/x")
    text = scrape(gw)
    assert len(samples(text)) > 20
    promtool = shutil.which("promtool")
    if promtool is None:
        if ci():
            pytest.fail("promtool is missing (Debian package prometheus, in TEST_DEB)")
        pytest.skip("promtool not installed (apt-get install prometheus); parser check passed")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_access_control(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, demo: str
) -> None:
    text = config(upstream.url, demo, f'[metrics]\nallow = ["{OTHER_LOOPBACK}/32"]\n')
    with running_gateway(tmp_path_factory.mktemp("metrics-acl"), text) as gw:
        for user, role in (("boss", "admin"), ("worker", "staff")):
            cli(gw.data_dir, "user", "add", user, "--role", role, "--password-stdin",
                stdin=f"{user}-password-1\n")  # fmt: skip
        admin_key = new_key(gw, "boss-key", "x", owner="boss")
        plain_key = new_key(gw, "worker-key", "x", owner="worker")
        admin_jwt, plain_jwt = (token(gw, user) for user in ("boss", "worker"))
        # Allowed: the listed address, or an admin's API key, token or session.
        assert "garrison_requests_total" in scrape(gw, source=OTHER_LOOPBACK)
        assert "garrison_requests_total" in scrape(gw, key=admin_key)
        assert "garrison_requests_total" in scrape(gw, key=admin_jwt)
        with closing(login(gw, "boss", "boss-password-1")) as session:
            assert session.get("/.garrison/metrics").status_code == 200
        with closing(login(gw, "worker", "worker-password-1")) as session:
            assert session.get("/.garrison/metrics").status_code == 403
        # Refused (127.0.0.1 is not listed here): nothing, a non-admin, a bad credential.
        for key in (None, plain_key, plain_jwt, "gk_not_a_real_key", "not-a-jwt"):
            with closing(client(gw, key)) as c:
                refused = c.get("/.garrison/metrics")
            assert refused.status_code == 403, key
            assert b"garrison_" not in refused.content
            assert refused.json()["error"]["code"] == "forbidden"


def token(gw: GatewayProcess, user: str) -> str:
    with closing(client(gw)) as c:
        resp = c.post(
            "/.garrison/token",
            data={"grant_type": "password", "username": user, "password": f"{user}-password-1"},
        )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def test_default_allows_loopback(gw: GatewayProcess) -> None:
    assert "garrison_requests_total" in scrape(gw)
    with closing(client(gw)) as c:
        assert c.post("/.garrison/metrics").status_code == 405


def _owners(gw: GatewayProcess, conns: list[http.client.HTTPSConnection]) -> set[int | None]:
    owner: dict[int, int] = {}
    for kid in psutil.Process(gw.proc.pid).children():
        for c in kid.net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == gw.port and c.raddr:
                owner[c.raddr.port] = kid.pid
    return {owner.get(conn.sock.getsockname()[1]) for conn in conns}


def test_two_workers_sum_into_one_scrape(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, demo: str
) -> None:
    text = config(upstream.url, demo)
    directory = tmp_path_factory.mktemp("metrics-workers")
    with running_gateway(directory, text, ["--workers", "2"]) as gw:
        conns: list[http.client.HTTPSConnection] = []
        try:
            for _ in range(HELD_CONNECTIONS):
                conn = http.client.HTTPSConnection(
                    "127.0.0.1", gw.port, context=client_context(gw), timeout=30
                )
                conn.connect()
                conns.append(conn)
            pids = _owners(gw, conns)
            for conn in conns:
                conn.request("GET", "/open/w", headers={"Host": "localhost"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
        finally:
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.close()
        assert len(pids - {None}) == 2, pids  # both workers served some of them
        assert (gw.data_dir / "metrics").is_dir()

        def counted() -> float:
            text = scrape(gw)  # a fresh connection: lands on either worker
            assert total(text, "garrison_certificate_expiry_timestamp_seconds", kind="server")
            return total(text, "garrison_requests_total", route="/open/", status="200")

        # A worker adds its requests into the shared files at most FLUSH_SECONDS later.
        assert wait_until(lambda: counted() == HELD_CONNECTIONS, timeout=FLUSH_WAIT_S)
        assert [counted() for _ in range(6)] == [HELD_CONNECTIONS] * 6
        # Live gauges are summed over the workers' files too (nothing held now: 0 each).
        live = {n for n, _lab, v in samples(scrape(gw)) if v == 0}
        assert "garrison_limit_slots_held" in live


def test_disabled_counts_nothing_and_hides_the_endpoint(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, demo: str
) -> None:
    text = config(upstream.url, demo, "[metrics]\nenabled = false\n")
    with (
        running_gateway(tmp_path_factory.mktemp("metrics-off"), text) as gw,
        closing(client(gw)) as c,
    ):
        assert c.get("/open/x").status_code == 200  # traffic is untouched
        gone = c.get("/.garrison/metrics")
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "not_found"
        assert b"garrison_" not in gone.content

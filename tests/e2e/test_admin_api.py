"""The JSON admin API end to end (issue 7): a real `garrison up`, real HTTPS, a recording upstream.

An admin creates a user and a key through the API, the key works through the gateway, the API
revokes it and the next call is refused (on one worker and on two); a client certificate is
issued as a PKCS#12 that loads with its password, then revoked (the CRL lists it); the audit
search finds the refused call. Then schemathesis throws generated and malformed calls at every
operation of the OpenAPI document (acceptance 3): none may answer 5xx.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.e2e.fixtures_core import (
    OPEN,
    client,
    client_context,
    dead_upstream,
    gateway_config,
    route_toml,
    running_gateway,
)
from tests.e2e.fixtures_stream import wait_until
from tests.e2e.test_auth import cli, login
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

API = "/.garrison/api"
NOTICE_WAIT_S = 10.0  # change notices reach every worker within ~0.25 s; this bounds a failure
FUZZ_EXAMPLES = 30  # per operation: the whole run stays well under two minutes


def config(upstream: str) -> str:
    return gateway_config(upstream, route_toml("/app/", "app", 'allow = { scopes = ["chat"] }'))


def admin_key(gw: GatewayProcess) -> str:
    return cli(gw.data_dir, "key", "create", "ops", "--scope", "admin", "--owner", "admin").strip()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("admin-api"), config(upstream.url)) as g:
        yield g


@pytest.fixture(scope="module")
def admin(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with closing(client(gw, admin_key(gw))) as c:
        yield c


def key_lifecycle(gw: GatewayProcess, admin: httpx.Client, user: str) -> None:
    """Create a user and a key by API, use it, revoke it by API: refused from then on."""
    created = admin.post(f"{API}/users", json={"name": user, "password": "user-password-1"})
    assert created.status_code == 201, created.text
    made = admin.post(
        f"{API}/keys", json={"name": f"{user}-key", "owner": user, "scopes": ["chat"]}
    )
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["secret"], made.json()["key"]["id"]
    assert secret.startswith(f"gk_{key_id}_")
    assert secret not in admin.get(f"{API}/keys").text  # shown once, at creation only
    assert secret not in admin.get(f"{API}/keys/{key_id}").text
    path = f"/app/{uuid.uuid4().hex}"

    def answered(status: int) -> bool:
        """Six new connections (with --workers 2, both workers) all get `status`."""
        for _ in range(6):
            with closing(client(gw, secret)) as user_client:
                if user_client.get(path).status_code != status:
                    return False
        return True

    # The new owner reaches each worker's user directory with the next change notice.
    assert wait_until(lambda: answered(200), NOTICE_WAIT_S)
    revoked = admin.delete(f"{API}/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert wait_until(lambda: answered(401), NOTICE_WAIT_S)
    found = admin.get(f"{API}/audit", params={"status": 401, "route": path, "limit": 5})
    assert found.status_code == 200 and found.json(), found.text
    line = found.json()[0]
    assert (line["event"], line["decision"], line["path"]) == ("request", "refused", path)
    assert (line["auth"], line["key_id"]) == ("api_key", key_id)  # which key was turned away
    assert "identity" not in line  # a refused key proves nobody's identity
    changes = admin.get(f"{API}/audit", params={"event": "key_revoked", "identity": "admin:admin"})
    assert [c["key_id"] for c in changes.json()][:1] == [key_id]
    # Searching by the key id finds its whole story: created, used, revoked, refused.
    story = admin.get(f"{API}/audit", params={"identity": key_id, "limit": 100}).json()
    kinds = {(r["event"], r.get("decision")) for r in story}
    assert {("key_created", None), ("key_revoked", None)} <= kinds
    assert {("request", "allowed"), ("request", "refused")} <= kinds


def test_user_and_key_lifecycle(gw: GatewayProcess, admin: httpx.Client) -> None:
    key_lifecycle(gw, admin, "dora")
    assert "user-password-1" not in (gw.data_dir / "audit.log").read_text()


def test_overview_knows_which_upstream_is_down(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> None:
    """Both upstreams are probed at start (no traffic needed); a request to the dead one keeps
    it down, and the health gauge says the same to Prometheus."""
    text = config(upstream.url) + dead_upstream("gone") + route_toml("/gone/", "gone", OPEN)
    with (
        running_gateway(tmp_path_factory.mktemp("admin-health"), text) as gw,
        closing(client(gw, admin_key(gw))) as c,
    ):

        def health() -> dict[str, bool | None]:
            got = c.get(f"{API}/overview")
            assert got.status_code == 200, got.text
            return {u["name"]: u["healthy"] for u in got.json()["upstreams"]}

        assert wait_until(lambda: health() == {"app": True, "gone": False}, NOTICE_WAIT_S)
        assert c.get("/gone/x").status_code == 502
        assert health() == {"app": True, "gone": False}
        scrape = c.get("/.garrison/metrics").text
        assert 'garrison_upstream_up{upstream="app"} 1.0' in scrape
        assert 'garrison_upstream_up{upstream="gone"} 0.0' in scrape


def test_two_workers_refuse_a_revoked_key(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> None:
    directory = tmp_path_factory.mktemp("admin-api-workers")
    with (
        running_gateway(directory, config(upstream.url), ["--workers", "2"]) as two,
        closing(client(two, admin_key(two))) as c,
    ):
        key_lifecycle(two, c, "erin")


def test_client_certificate_issue_and_revoke(gw: GatewayProcess, admin: httpx.Client) -> None:
    body = {"name": "frank", "roles": ["staff"], "days": 30, "p12_password": "p12-password"}
    issued = admin.post(f"{API}/certs", json=body)
    assert issued.status_code == 201, issued.text
    cert, p12 = issued.json()["cert"], base64.b64decode(issued.json()["p12"])
    key, leaf, cas = pkcs12.load_key_and_certificates(p12, b"p12-password")
    assert key is not None and leaf is not None and len(cas) == 1
    assert format(leaf.serial_number, "x") == cert["serial"]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12, b"wrong-password")
    listed = admin.get(f"{API}/certs").json()
    assert [c["status"] for c in listed if c["serial"] == cert["serial"]] == ["active"]
    assert issued.json()["p12"] not in admin.get(f"{API}/certs").text
    assert admin.get(f"{API}/certs/{cert['serial']}/p12").status_code == 404  # never again
    revoked = admin.post(f"{API}/certs/{cert['serial']}/revoke", json={"reason": "keyCompromise"})
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    crl = x509.load_pem_x509_crl(admin.get("/.garrison/crl.pem").content)
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    text = (gw.data_dir / "audit.log").read_text()
    assert "p12-password" not in text and issued.json()["p12"][:40] not in text


def test_session_calls_need_the_csrf_header(gw: GatewayProcess) -> None:
    with closing(login(gw, "admin", ADMIN_PASSWORD)) as browser:
        assert browser.get(f"{API}/users").status_code == 200
        body = {"name": "gina", "password": "gina-password"}
        same = {"Origin": gw.url}
        refused = browser.post(f"{API}/users", json=body, headers=same)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf"
        headers = {**same, "X-Garrison-CSRF": "1"}
        sessions = browser.get(f"{API}/sessions", params={"user": "admin"}).json()
        assert sessions and all(len(s["id"]) == 64 for s in sessions)
        assert browser.post(f"{API}/users", json=body, headers=headers).status_code == 201


def test_errors_are_json_and_precise(admin: httpx.Client) -> None:
    missing = admin.get(f"{API}/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = admin.put(f"{API}/keys")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD, POST"
    bad = admin.post(f"{API}/keys", json={"name": "k", "scopes": ["NOT A SCOPE"]})
    assert bad.status_code == 422
    assert [f["loc"] for f in bad.json()["error"]["fields"]] == ["body.scopes.0"]
    big = admin.post(
        f"{API}/users", content=b"x" * 100_000, headers={"content-type": "application/json"}
    )
    assert big.status_code == 413


def test_require_client_cert_wants_the_admins_own_certificate(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> None:
    directory = tmp_path_factory.mktemp("admin-mtls")
    text = config(upstream.url) + (
        '[client_certs]\nmode = "optional"\n\n[admin]\nrequire_client_cert = true\n'
    )
    with running_gateway(directory, text) as g:
        key = admin_key(g)
        out = directory / "certs"
        for name in ("admin", "nina"):
            cli(g.data_dir, "cert", "issue", name, "--out", str(out))

        def get(cert: str | None) -> int:
            ctx = client_context(g)
            if cert is not None:
                ctx.load_cert_chain(out / f"{cert}.crt", out / f"{cert}.key")
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=g.url, verify=ctx, headers=headers, timeout=30) as c:
                return c.get(f"{API}/users").status_code

        assert get(None) == 403  # the admin's key alone is not enough
        assert get("nina") == 403  # someone else's certificate neither
        assert get("admin") == 200


# -- acceptance 3: schemathesis against the OpenAPI document -----------------------------------
@pytest.fixture(scope="module")
def fuzz_gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[tuple[GatewayProcess, str]]:
    """A gateway of its own: generated calls create and change things freely here."""
    with running_gateway(tmp_path_factory.mktemp("admin-fuzz"), config(upstream.url)) as g:
        yield g, admin_key(g)


@pytest.fixture(scope="module")
def fuzz_session(fuzz_gw: tuple[GatewayProcess, str]) -> Iterator[requests.Session]:
    gw, key = fuzz_gw
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the gateway's own CA
    session.verify = str(gw.ca_path)
    session.headers["Authorization"] = f"Bearer {key}"
    yield session
    session.close()


@pytest.fixture(scope="module")
def admin_schema(fuzz_gw: tuple[GatewayProcess, str], fuzz_session: requests.Session) -> Any:
    gw, _ = fuzz_gw
    doc = fuzz_session.get(f"{gw.url}{API}/openapi.json", timeout=30)
    assert doc.status_code == 200, doc.text
    schema = schemathesis.openapi.from_dict(doc.json())
    schema.config.update(base_url=gw.url)
    return schema


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "examples"),
    [(GenerationMode.POSITIVE, FUZZ_EXAMPLES), (GenerationMode.NEGATIVE, FUZZ_EXAMPLES // 2)],
)
def test_openapi_no_server_errors(
    admin_schema: Any,
    fuzz_gw: tuple[GatewayProcess, str],
    fuzz_session: requests.Session,
    mode: GenerationMode,
    examples: int,
) -> None:
    """Every operation, valid and invalid calls alike: never a 5xx, never an unexpected error.

    (schemathesis' own pytest loader for a schema from a fixture does not run on pytest 9,
    so each operation's strategy is driven by hypothesis here.)"""
    gw, _ = fuzz_gw
    operations = [result.ok() for result in admin_schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            case.call_and_validate(
                base_url=gw.url,
                session=fuzz_session,
                checks=[not_a_server_error],
                timeout=60,
                verify=str(gw.ca_path),
            )

        check()
    assert "admin API failure" not in gw.output()  # no unexpected exception, even answered
    assert wait_until(lambda: len(_api_statuses(gw)) >= len(operations) * 5, NOTICE_WAIT_S)
    statuses = _api_statuses(gw)
    assert max(statuses) < 500 and min(statuses) < 300  # calls were made, some succeeded


def _api_statuses(gw: GatewayProcess) -> list[int]:
    """Statuses of the admin API calls in the gateway's audit log."""
    lines = (gw.data_dir / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"event":"request"' in line]
    return [r["status"] for r in records if (r.get("path") or "").startswith(API)]

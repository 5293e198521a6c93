"""Mutual TLS end to end (issue 4, acceptance 1, 2, 4 and 6): a real `garrison up` with
`[client_certs]`, certificates issued with the real CLI (or signed here with the gateway's own
CA key, for dates and subjects the CLI will not produce), and a recording upstream.

Every refusal is checked twice: the answer the client gets (or the refused handshake), and
that the upstream never saw the request, so a test cannot pass with the check missing.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from garrison.pki.client_certs import ROLE_EXTENSION_OID, encode_roles
from tests.e2e.conftest import garrison_cli
from tests.e2e.fixtures_core import client_context, running_gateway
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
PASSWORD = "mtls-user-password-for-tests"
REVOKE_WAIT_S = 2.0  # workers follow the store's change feed every 0.25 s
HELD_CONNECTIONS = 16  # the chance that the kernel puts them all on one worker is 2**-15
HTML = {"Accept": "text/html,application/xhtml+xml"}
SPOOFED = {
    "X-SSL-Client-Verify": "SUCCESS",
    "X-SSL-Client-DN": "CN=admin",
    "X-SSL-Client-Serial": "DEADBEEF",
    "X-SSL-Client-Fingerprint": "00" * 32,
    "X-SSL-Client-Cert": "-----BEGIN%20CERTIFICATE-----",
    "x-ssl-client-s-dn": "CN=admin",
}


# ---------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class CertFiles:
    """A client certificate on disk: PEM certificate, PEM key, and the PKCS#12 when written."""

    crt: Path
    key: Path
    p12: Path | None = None


@dataclass
class Answer:
    """One HTTP answer: status, headers (names lower-case, last value wins) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict), data
        return data

    def error_code(self) -> object:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        error = self.json()["error"]
        assert isinstance(error, dict), error
        return error["code"]

    def echoed(self) -> dict[str, str]:
        """The request headers FakeUpstream echoes, names lower-case."""
        pairs = self.json()["headers"]
        assert isinstance(pairs, list)
        return {str(k).lower(): str(v) for k, v in pairs}


def issue(
    gw: GatewayProcess,
    name: str,
    out: Path,
    *,
    email: str | None = None,
    roles: Sequence[str] = (),
    p12_password: str | None = None,
) -> CertFiles:
    """`garrison cert issue NAME` into `out`, as an operator would."""
    args = ["cert", "issue", name, "--out", str(out)]
    if email is not None:
        args += ["--email", email]
    for role in roles:
        args += ["--role", role]
    p12 = None
    if p12_password is not None:
        password_file = out / f"{name}.password"
        password_file.write_text(p12_password + "\n")
        args += ["--p12-password-file", str(password_file)]
        p12 = out / f"{name}.p12"
    garrison_cli(*args, data_dir=gw.data_dir)
    files = CertFiles(out / f"{name}.crt", out / f"{name}.key", p12)
    assert files.crt.is_file() and files.key.is_file(), list(out.iterdir())
    assert files.key.stat().st_mode & 0o777 == 0o600
    return files


def revoke(gw: GatewayProcess, name_or_serial: str) -> None:
    garrison_cli("cert", "revoke", name_or_serial, data_dir=gw.data_dir)


def _write_pair(
    out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertFiles:
    crt = out / f"{stem}.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CertFiles(crt, key_path)


def signed_cert(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    out: Path,
    stem: str,
    subject: x509.Name,
    *,
    sans: Sequence[x509.GeneralName] = (),
    extensions: Sequence[x509.ExtensionType] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertFiles:
    """A client certificate for `subject`, signed by `issuer_key` (any dates, any contents)."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=not len(subject)
        )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return _write_pair(out, stem, builder.sign(issuer_key, hashes.SHA256()), key)


def gateway_ca(gw: GatewayProcess) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The internal CA's certificate and key, read from the gateway's data dir."""
    ca_dir = gw.data_dir / "ca"
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), type(key)
    return cert, key


def foreign_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA the gateway has never heard of, with the same subject as no one in particular."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mallory Root CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def mtls_context(gw: GatewayProcess, cert: CertFiles | None) -> ssl.SSLContext:
    """Trusts only the gateway's CA and presents `cert` (or no certificate)."""
    ctx = client_context(gw)
    if cert is not None:
        ctx.load_cert_chain(cert.crt, cert.key)
    return ctx


def connection(gw: GatewayProcess, cert: CertFiles | None) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "127.0.0.1", gw.port, context=mtls_context(gw, cert), timeout=10
    )


def on(
    conn: http.client.HTTPSConnection, path: str, headers: dict[str, str] | None = None
) -> Answer:
    """One GET on an (open or new) keep-alive connection."""
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def fetch(
    gw: GatewayProcess,
    path: str,
    cert: CertFiles | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One GET on a new connection that presents `cert`."""
    conn = connection(gw, cert)
    try:
        return on(conn, path, headers)
    finally:
        conn.close()


def audit_events(gw: GatewayProcess, event: str = "client_cert_refused") -> list[dict[str, object]]:
    """The gateway's audit lines for `event` (its audit file in the data dir), parsed."""
    path = gw.data_dir / "audit.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().split("\n")[:-1]:  # complete lines (a write may be under way)
        record = json.loads(line)  # every audit line parses
        if record.get("event") == event:
            found.append(record)
    return found


def wait_for_audit(
    gw: GatewayProcess, before: int, timeout: float = 5.0
) -> list[dict[str, object]]:
    """Audit refusals written after the first `before` ones (bounded wait for at least one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = audit_events(gw)[before:]
        if new:
            return new
        time.sleep(0.02)
    raise AssertionError(f"no new client_cert_refused audit line in:\n{gw.output()[-3000:]}")


def metric(gw: GatewayProcess, cert: CertFiles, result: str) -> float:
    """garrison_client_cert_verifications_total{result=...} (0 when not yet present)."""
    resp = fetch(gw, "/.garrison/metrics", cert)
    assert resp.status == 200, resp.body[:300]
    pattern = re.compile(
        r'^garrison_client_cert_verifications_total\{result="'
        + re.escape(result)
        + r'"\}\s+(\S+)$',
        re.M,
    )
    match = pattern.search(resp.body.decode())
    return float(match.group(1)) if match else 0.0


class Counting:
    """Asserts how many requests reached the upstream inside the block."""

    def __init__(self, upstream: FakeUpstream, expected: int) -> None:
        self.upstream = upstream
        self.expected = expected

    def __enter__(self) -> None:
        self.before = len(self.upstream.requests)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            seen = [r.raw_path for r in self.upstream.requests[self.before :]]
            assert len(seen) == self.expected, seen


def printable_ascii(value: str) -> bool:
    return all(32 <= ord(c) < 127 for c in value)


def mtls_config(upstream_url: str, mode: str, routes: str = "") -> str:
    """`[client_certs] mode = MODE`, upstream "app", the given routes, then `/` open to all."""
    return f"""
[server]
listen = "127.0.0.1:0"

[client_certs]
mode = "{mode}"
ca = "internal"

[[upstream]]
name = "app"
url = "{upstream_url}"
{routes}
[[route]]
path = "/"
upstream = "app"
auth = ["none"]
"""


ID_ROUTE = """
[[route]]
path = "/id/"
upstream = "app"
auth = ["client_cert"]
"""


# ---------------------------------------------------------------------- required mode
@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """`mode = "required"`, one worker (metrics are per worker); `/id/` takes the certificate
    as the caller's identity, `/` needs no identity (but still a valid certificate)."""
    text = mtls_config(upstream.url, "required", ID_ROUTE)
    with running_gateway(tmp_path_factory.mktemp("mtls"), text) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def certs(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mtls-certs")


@pytest.fixture(scope="module")
def alice(gw: GatewayProcess, certs: Path) -> CertFiles:
    return issue(gw, "alice", certs, email="alice@example.test", roles=("ops", "staff"))


def test_valid_certificate_reaches_the_app_with_its_identity(
    gw: GatewayProcess, alice: CertFiles, upstream: FakeUpstream
) -> None:
    pem = x509.load_pem_x509_certificate(alice.crt.read_bytes())
    with Counting(upstream, 2):
        plain = fetch(gw, "/hello", alice)
        ident = fetch(gw, "/id/whoami", alice)
    for resp in (plain, ident):
        assert resp.status == 200, resp.body[:300]
        seen = resp.echoed()
        assert seen["x-ssl-client-verify"] == "SUCCESS"
        assert seen["x-ssl-client-dn"] == pem.subject.rfc4514_string()
        assert "CN=alice" in seen["x-ssl-client-dn"]
        assert seen["x-ssl-client-serial"] == format(pem.serial_number, "X")
        assert seen["x-ssl-client-fingerprint"] == pem.fingerprint(hashes.SHA256()).hex()
        assert "x-ssl-client-cert" not in seen  # forward_cert = false
    assert "x-forwarded-user" not in plain.echoed()  # `/` is auth = ["none"]
    seen = ident.echoed()
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-forwarded-email"] == "alice@example.test"
    assert set(seen["x-garrison-roles"].split(",")) == {"ops", "staff"}
    assert seen["x-garrison-assertion"]


def test_no_certificate_gets_a_readable_403(gw: GatewayProcess, upstream: FakeUpstream) -> None:
    before = len(audit_events(gw))
    with Counting(upstream, 0):
        page = fetch(gw, "/id/page", None, HTML)
        api = fetch(gw, "/hello", None, {"Accept": "application/json"})
        bare = fetch(gw, "/hello")
    assert page.status == 403
    assert page.headers["content-type"].startswith("text/html"), page.headers
    text = page.body.decode()
    assert text.lstrip().lower().startswith("<!doctype html>"), text[:200]
    assert "needs a client certificate" in text, text
    for resp in (api, bare):
        assert resp.status == 403, resp.body
        assert resp.error_code() == "client_cert_required"
    new = wait_for_audit(gw, before)
    assert all(e["stage"] == "http" and e["reason"] == "none" for e in new), new


def test_untrusted_certificate_is_refused_at_the_handshake(
    gw: GatewayProcess, alice: CertFiles, certs: Path, upstream: FakeUpstream
) -> None:
    ca_cert, ca_key = foreign_ca()
    mallory = signed_cert(ca_cert, ca_key, certs, "mallory", cn("alice"))
    mallory_serial = x509.load_pem_x509_certificate(mallory.crt.read_bytes()).serial_number
    counted = metric(gw, alice, "handshake_unknown_ca")
    before = len(audit_events(gw))
    refused = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)
    with Counting(upstream, 0), pytest.raises(refused) as err:
        fetch(gw, "/id/whoami", mallory)
    assert "unknown ca" in str(err.value).lower() or not isinstance(err.value, ssl.SSLError)
    new = wait_for_audit(gw, before)
    refused = [e for e in new if e.get("stage") == "tls_handshake"]
    assert refused, new
    assert refused[0]["reason"] == "unknown_ca"
    assert refused[0]["serial"] == format(mallory_serial, "x")
    assert "CN=alice" in str(refused[0]["subject"])
    assert metric(gw, alice, "handshake_unknown_ca") == counted + 1
    assert fetch(gw, "/after-untrusted", alice).status == 200  # still up


@pytest.mark.parametrize(
    ("stem", "start_days", "end_days", "problem"),
    [("expired", -10, -1, "expired"), ("future", 1, 10, "not yet valid")],
)
def test_dates_are_checked_per_request(
    gw: GatewayProcess,
    certs: Path,
    upstream: FakeUpstream,
    stem: str,
    start_days: int,
    end_days: int,
    problem: str,
) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = gateway_ca(gw)
    cert = signed_cert(
        ca_cert,
        ca_key,
        certs,
        stem,
        cn(f"{stem}-user"),
        not_before=now + dt.timedelta(days=start_days),
        not_after=now + dt.timedelta(days=end_days),
    )
    serial = x509.load_pem_x509_certificate(cert.crt.read_bytes()).serial_number
    before = len(audit_events(gw))
    with Counting(upstream, 0):
        api = fetch(gw, "/id/x", cert)
        page = fetch(gw, "/x", cert, HTML)
    assert api.status == 403, api.body
    assert api.error_code() == "client_cert_invalid"
    assert problem in str(api.json()["error"]), api.body
    assert page.status == 403
    assert page.headers["content-type"].startswith("text/html"), page.headers
    assert problem in page.body.decode()
    new = wait_for_audit(gw, before)
    assert len(new) >= 2, new
    for event in new:
        assert event["stage"] == "http", event
        assert event["reason"] == problem, event
        assert event["client_ip"] == "127.0.0.1", event
        assert event["serial"] == format(serial, "x"), event
        assert f"CN={stem}-user" in str(event["subject"]), event


def test_spoofed_ssl_headers_never_reach_the_app(
    gw: GatewayProcess, alice: CertFiles, upstream: FakeUpstream
) -> None:
    pem = x509.load_pem_x509_certificate(alice.crt.read_bytes())
    with Counting(upstream, 1):
        resp = fetch(gw, "/spoof", alice, SPOOFED)
    assert resp.status == 200
    seen = upstream.requests[-1].header_list
    ssl_headers = [(n, v) for n, v in seen if n.startswith("x-ssl-")]
    assert sorted(ssl_headers) == sorted(
        [
            ("x-ssl-client-verify", "SUCCESS"),
            ("x-ssl-client-dn", pem.subject.rfc4514_string()),
            ("x-ssl-client-serial", format(pem.serial_number, "X")),
            ("x-ssl-client-fingerprint", pem.fingerprint(hashes.SHA256()).hex()),
        ]
    ), ssl_headers


# ---------------------------------------------------------------------- odd subjects
def _odd_subjects() -> list[
    tuple[str, x509.Name, list[x509.GeneralName], list[x509.ExtensionType]]
]:
    """(label, subject, SANs, extra extensions) that a careless parser would trip on."""
    ou = NameOID.ORGANIZATIONAL_UNIT_NAME
    dns = [x509.DNSName(f"host{i}.example.test") for i in range(150)]
    mails = [x509.RFC822Name(f"user{i}@example.test") for i in range(150)]
    big = [x509.NameAttribute(ou, f"unit-{i:03d}-" + "x" * 90) for i in range(55)]
    return [
        ("empty-subject", x509.Name([]), [x509.DNSName("nobody.example.test")], []),
        ("empty-cn", cn(""), [], []) if _empty_cn_allowed() else ("blank-cn", cn(" "), [], []),
        ("unicode-cn", cn("Zoë 用户 🚀"), [], []),
        ("rtl-cn", cn("\u202eadmin"), [], []),
        ("big-dn", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bigdn"), *big]), [], []),
        ("many-sans", cn("sans"), [*dns, *mails], []),
        (
            "two-cns",
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                ]
            ),
            [],
            [],
        ),
        (
            "bad-role-ext",
            cn("badrole"),
            [],
            [x509.UnrecognizedExtension(ROLE_EXTENSION_OID, b"\x30\x7f\x0c\x03ops")],
        ),
        (
            "role-ext-not-der",
            cn("notder"),
            [],
            [x509.UnrecognizedExtension(ROLE_EXTENSION_OID, b"\xff\xfe garbage")],
        ),
        (
            "control-ou",
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "ctrl"),
                    x509.NameAttribute(ou, "ops\r\nX-Injected: 1"),
                    x509.NameAttribute(ou, "esc\x1b[31m\x00"),
                    x509.NameAttribute(ou, "ok-role"),
                ]
            ),
            [],
            [],
        ),
        ("cn-newline", cn("admin\n"), [], []),
        ("cn-space", cn("alice bob"), [], []),
        ("cn-slash", cn("../admin"), [], []),
        ("cn-crlf", cn("eve\r\nX-Forwarded-User: admin"), [], []),
        (
            "roles-ext-hostile",
            cn("hostile"),
            [],
            [x509.UnrecognizedExtension(ROLE_EXTENSION_OID, encode_roles(["ops\nadmin", "fine"]))],
        ),
    ]


def _empty_cn_allowed() -> bool:
    try:
        cn("")
    except ValueError:
        return False
    return True


VALID_NAMES = {  # label: the user name its certificate rightly names
    "big-dn": "bigdn",
    "many-sans": "sans",
    "bad-role-ext": "badrole",
    "role-ext-not-der": "notder",
    "control-ou": "ctrl",
    "roles-ext-hostile": "hostile",
}


@pytest.mark.parametrize("case", _odd_subjects(), ids=lambda c: c[0])
def test_odd_subjects_get_clean_answers(
    gw: GatewayProcess,
    certs: Path,
    upstream: FakeUpstream,
    alice: CertFiles,
    case: tuple[str, x509.Name, list[x509.GeneralName], list[x509.ExtensionType]],
) -> None:
    label, subject, sans, extensions = case
    ca_cert, ca_key = gateway_ca(gw)
    cert = signed_cert(ca_cert, ca_key, certs, label, subject, sans=sans, extensions=extensions)
    conn = connection(gw, cert)
    try:
        open_route = on(conn, "/odd", SPOOFED)
        ident = on(conn, "/id/odd", HTML)
        api = on(conn, "/id/odd")
    finally:
        conn.close()
    assert open_route.status == 200, (label, open_route.body[:300])
    seen = open_route.echoed()
    assert seen["x-ssl-client-verify"] == "SUCCESS", seen
    assert printable_ascii(seen["x-ssl-client-dn"]), seen["x-ssl-client-dn"]
    assert len(seen["x-ssl-client-dn"]) <= 4096
    assert seen["x-ssl-client-dn"] != "CN=admin"
    assert "x-forwarded-user" not in seen and "x-injected" not in seen
    for resp in (ident, api):
        assert resp.status in (200, 401, 403), (label, resp.status, resp.body[:300])
    if label in VALID_NAMES:
        assert api.status == 200, (label, api.body[:300])
        who = api.echoed()
        assert who["x-forwarded-user"] == VALID_NAMES[label], who
        roles = who.get("x-garrison-roles", "")
        assert printable_ascii(roles) and "\n" not in roles, roles
        if label == "control-ou":
            assert roles == "ok-role", roles
        if label == "roles-ext-hostile":
            assert roles == "fine", roles
    else:
        assert api.status == 403, (label, api.status, api.body[:300])
        assert api.error_code() == "client_cert_required"
        assert ident.headers["content-type"].startswith("text/html")
    assert fetch(gw, "/still-up", alice).status == 200
    assert gw.proc.poll() is None
    assert "Traceback" not in gw.output(), gw.output()[-3000:]


# ---------------------------------------------------------------------- revocation, 2 workers
def workers(gw: GatewayProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(gw.proc.pid).children() if p.is_running()]


def owners(gw: GatewayProcess, conns: Sequence[http.client.HTTPSConnection]) -> set[int | None]:
    """The pids of the workers holding these (connected) client connections."""
    owner: dict[int, int] = {}
    for kid in workers(gw):
        for c in kid.net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == gw.port and c.raddr:
                owner[c.raddr.port] = kid.pid
    return {owner.get(conn.sock.getsockname()[1]) for conn in conns}


def test_revocation_reaches_every_worker_and_open_connections(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    text = mtls_config(upstream.url, "required", ID_ROUTE)
    with running_gateway(tmp_path, text, ["--workers", "2"]) as gw2:
        assert len(workers(gw2)) == 2
        out = tmp_path / "certs"
        out.mkdir()
        doomed = issue(gw2, "doomed", out)
        other = issue(gw2, "other", out)
        held = [connection(gw2, doomed) for _ in range(HELD_CONNECTIONS)]
        try:
            for conn in held:
                conn.connect()
            pids = owners(gw2, held)
            assert len(pids) == 2 and None not in pids, pids
            assert all(on(conn, "/id/before").status == 200 for conn in held)

            revoke(gw2, "doomed")
            revoked_at = time.monotonic()
            statuses: list[int] = [200]
            while time.monotonic() - revoked_at < REVOKE_WAIT_S and 200 in statuses:
                statuses = [on(conn, "/id/after").status for conn in held]
                time.sleep(0.05)
            assert statuses == [403] * HELD_CONNECTIONS, statuses  # kept-alive, both workers
            with Counting(upstream, 0):
                answers = [on(conn, "/id/again") for conn in held]
                fresh = [connection(gw2, doomed) for _ in range(HELD_CONNECTIONS)]
                for conn in fresh:
                    conn.connect()
                fresh_pids = owners(gw2, fresh)
                assert len(fresh_pids) == 2 and None not in fresh_pids, fresh_pids
                answers += [on(conn, "/id/fresh") for conn in fresh]
                for conn in fresh:
                    conn.close()
        finally:
            for conn in held:
                conn.close()
        for resp in answers:
            assert resp.status == 403, resp.body
            assert resp.error_code() == "client_cert_invalid"
            assert "revoked" in resp.body.decode()
        assert fetch(gw2, "/id/other", other).status == 200  # only that certificate


# ---------------------------------------------------------------------- optional mode, routes
OPTIONAL_ROUTES = """
[[route]]
path = "/open/"
upstream = "app"

[[route]]
path = "/admin/"
upstream = "app"
auth = ["client_cert"]
allow = { roles = ["ops"] }

[[route]]
path = "/both/"
upstream = "app"
auth = ["client_cert+session"]
"""


@pytest.fixture(scope="module")
def opt(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """`mode = "optional"` with routes that need a certificate, a login, or both."""
    text = mtls_config(upstream.url, "optional", OPTIONAL_ROUTES)
    with running_gateway(tmp_path_factory.mktemp("mtls-opt"), text) as gateway:
        for user in ("carol", "dave"):
            garrison_cli(
                "user",
                "add",
                user,
                "--password-stdin",
                data_dir=gateway.data_dir,
                stdin=PASSWORD + "\n",
            )
        yield gateway


@pytest.fixture(scope="module")
def opt_certs(
    opt: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, CertFiles]:
    out = tmp_path_factory.mktemp("mtls-opt-certs")
    return {
        "carol": issue(opt, "carol", out, email="carol@example.test", roles=("ops",)),
        "dave": issue(opt, "dave", out, roles=("staff",)),
    }


def httpx_client(gw: GatewayProcess, cert: CertFiles | None) -> httpx.Client:
    return httpx.Client(
        base_url=gw.url, verify=mtls_context(gw, cert), timeout=30, follow_redirects=False
    )


def logged_in(gw: GatewayProcess, user: str, cert: CertFiles | None) -> httpx.Client:
    """A client presenting `cert` that signed in as `user` through the real login form."""
    c = httpx_client(gw, cert)
    form = c.get("/.garrison/login", params={"next": "/"})
    assert form.status_code == 200, form.text[:300]
    match = CSRF_RE.search(form.text)
    assert match, form.text[:300]
    resp = c.post(
        "/.garrison/login",
        data={"username": user, "password": PASSWORD, "csrf": match.group(1), "next": "/"},
        headers={"Origin": gw.url},
    )
    assert resp.status_code == 303, resp.text
    return c


def test_optional_mode_without_certificate(opt: GatewayProcess, upstream: FakeUpstream) -> None:
    with Counting(upstream, 1):
        public = fetch(opt, "/anyone")
    assert public.status == 200
    assert public.echoed()["x-ssl-client-verify"] == "NONE"
    with Counting(upstream, 0):
        admin_api = fetch(opt, "/admin/x")
        admin_page = fetch(opt, "/admin/x", None, HTML)
        both = fetch(opt, "/both/x")
        opened = fetch(opt, "/open/x")
    assert admin_api.status == 403 and admin_api.error_code() == "client_cert_required"
    assert admin_page.status == 403
    assert "client certificate" in admin_page.body.decode()
    assert both.status == 403 and both.error_code() == "client_cert_required"
    assert opened.status == 401 and opened.error_code() == "authentication_required"


def test_optional_mode_certificate_routes(
    opt: GatewayProcess, opt_certs: dict[str, CertFiles], upstream: FakeUpstream
) -> None:
    with Counting(upstream, 1):
        ok = fetch(opt, "/admin/panel", opt_certs["carol"])
    assert ok.status == 200, ok.body
    seen = ok.echoed()
    assert seen["x-forwarded-user"] == "carol"
    assert seen["x-forwarded-email"] == "carol@example.test"
    assert seen["x-garrison-roles"] == "ops"
    assert seen["x-ssl-client-verify"] == "SUCCESS"
    with Counting(upstream, 0):
        no_role = fetch(opt, "/admin/panel", opt_certs["dave"])
        cert_on_login_route = fetch(opt, "/open/x", opt_certs["carol"])
        cert_without_login = fetch(opt, "/both/x", opt_certs["carol"])
    assert no_role.status == 403 and no_role.error_code() == "forbidden_role"
    # A certificate is not a login where the route does not accept certificates.
    assert cert_on_login_route.status == 401, cert_on_login_route.body
    assert cert_without_login.status == 401, cert_without_login.body  # a login is missing
    assert cert_without_login.error_code() == "authentication_required"


def test_optional_mode_cert_plus_session(
    opt: GatewayProcess, opt_certs: dict[str, CertFiles], upstream: FakeUpstream
) -> None:
    with closing(logged_in(opt, "carol", opt_certs["carol"])) as same, Counting(upstream, 2):
        both = same.get("/both/x")
        opened = same.get("/open/x")
    assert both.status_code == 200, both.text
    assert {k.lower(): v for k, v in both.json()["headers"]}["x-forwarded-user"] == "carol"
    assert opened.status_code == 200, opened.text
    with closing(logged_in(opt, "carol", opt_certs["dave"])) as mixed, Counting(upstream, 0):
        mismatch = mixed.get("/both/x")
    assert mismatch.status_code == 403, mismatch.text
    assert mismatch.json()["error"]["code"] == "forbidden_mismatch"
    with closing(logged_in(opt, "carol", None)) as session_only, Counting(upstream, 0):
        no_cert = session_only.get("/both/x")
    assert no_cert.status_code == 403, no_cert.text
    assert no_cert.json()["error"]["code"] == "client_cert_required"


def test_optional_mode_spoofed_headers(
    opt: GatewayProcess, opt_certs: dict[str, CertFiles], upstream: FakeUpstream
) -> None:
    with Counting(upstream, 2):
        anonymous = fetch(opt, "/spoof", None, SPOOFED)
        with_cert = fetch(opt, "/spoof", opt_certs["dave"], SPOOFED)
    assert anonymous.status == 200 and with_cert.status == 200
    anon_seen, cert_seen = (r.header_list for r in upstream.requests[-2:])
    assert [(n, v) for n, v in anon_seen if n.startswith("x-ssl-")] == [
        ("x-ssl-client-verify", "NONE")
    ]
    cert_ssl = dict((n, v) for n, v in cert_seen if n.startswith("x-ssl-"))
    assert len([n for n, _ in cert_seen if n.startswith("x-ssl-")]) == 4, cert_seen
    assert cert_ssl["x-ssl-client-verify"] == "SUCCESS"
    assert "CN=dave" in cert_ssl["x-ssl-client-dn"]
    assert cert_ssl["x-ssl-client-serial"] != "DEADBEEF"
    assert "x-ssl-client-cert" not in cert_ssl

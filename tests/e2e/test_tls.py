"""TLS from the outside (DESIGN §5.6): real curl and openssl against a running gateway.

The private CA works for clients (curl --cacert with no -k), the server certificate covers every
configured name plus the loopback names and lives at most 397 days, old protocols and weak
ciphers are refused, HSTS and the other security headers ride on every HTTPS answer, plain HTTP
redirects to HTTPS, and a changed hostname list reissues the certificate on reload and restart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
import signal
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.fixtures_core import (
    PYTHON,
    SECURITY_HEADERS,
    RawResponse,
    assert_json_error,
    closed_port,
    config,
    get,
    ipv6_loopback,
    need_tool,
    run,
    running_gateway,
    send_raw,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

HOSTNAMES = ["gw.example.test", "10.11.12.13", "fd00::7"]
HAVE_IPV6 = ipv6_loopback()
DEFAULT_HSTS = "max-age=31536000"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """Intermediate profile, default HSTS, three names, a redirect listener; dual-stack."""
    listen = "[::]:0" if HAVE_IPV6 else "127.0.0.1:0"
    text = config(
        upstream.url,
        server=f'hostnames = {HOSTNAMES!r}\nhttp_listen = "127.0.0.1:0"\n',
        upstreams=f'[[upstream]]\nname = "down"\nurl = "http://127.0.0.1:{closed_port()}"\n',
        routes='[[route]]\npath = "/down/"\nauth = ["none"]\nupstream = "down"\n',
    ).replace('listen = "127.0.0.1:0"', f'listen = "{listen}"', 1)
    with running_gateway(tmp_path_factory.mktemp("tls"), text) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def modern(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    text = config(
        upstream.url,
        server='tls_profile = "modern"\nhsts_max_age = "1h"\nreferrer_policy = "no-referrer"\n',
    )
    with running_gateway(tmp_path_factory.mktemp("tls-modern"), text) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def curl() -> str:
    return need_tool(shutil.which("curl"), "curl")


@pytest.fixture(scope="module")
def openssl() -> str:
    return need_tool(shutil.which("openssl"), "openssl")


def served_certificate(gw: GatewayProcess, server_hostname: str = "localhost") -> x509.Certificate:
    """The leaf the gateway presents, read without verification (we inspect it ourselves)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def sans(
    cert: x509.Certificate,
) -> tuple[set[str], set[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), set(ext.get_values_for_type(x509.IPAddress))


def s_client(openssl: str, port: int, *args: str) -> tuple[int, str]:
    """openssl s_client -brief with stdin closed: the handshake summary, then it exits."""
    result = run([openssl, "s_client", "-brief", "-connect", f"127.0.0.1:{port}", *args])
    return result.returncode, result.stdout + result.stderr


def negotiated(output: str) -> tuple[str, str]:
    """(protocol, cipher) from -brief's summary; ("", "") when no handshake completed."""
    if "CONNECTION ESTABLISHED" not in output:
        return "", ""
    proto = re.search(r"^Protocol version: (\S+)", output, re.M)
    cipher = re.search(r"^Ciphersuite: (\S+)", output, re.M)
    return (proto.group(1) if proto else "?"), (cipher.group(1) if cipher else "?")


def verified(gw: GatewayProcess) -> tuple[str, ...]:
    """s_client arguments that make the handshake fail unless the chain and name verify."""
    assert gw.ca_path is not None
    return ("-CAfile", str(gw.ca_path), "-verify_return_error", "-verify_hostname", "localhost",
            "-servername", "localhost")  # fmt: skip


# -- the CA works for real clients ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_curl_trusts_the_exported_ca(gw: GatewayProcess, curl: str, host: str) -> None:
    if host == "[::1]" and not HAVE_IPV6:
        pytest.skip("no IPv6 loopback in this environment (cannot bind ::1)")
    script = (
        f'"{curl}" -sS --fail --cacert <("{PYTHON}" -m garrison ca export --data-dir '
        f'"{gw.data_dir}") https://{host}:{gw.port}/.garrison/healthz'
    )
    result = run(["bash", "-c", script])
    assert result.returncode == 0, result.stderr
    assert '"status":"ok"' in result.stdout


def test_curl_without_the_ca_refuses(gw: GatewayProcess, curl: str) -> None:
    """The control: without --cacert the certificate is not trusted (curl exit 60)."""
    result = run([curl, "-sS", f"https://localhost:{gw.port}/.garrison/healthz"])
    assert result.returncode == 60, (result.returncode, result.stderr)


def test_exported_ca_is_the_one_announced(gw: GatewayProcess) -> None:
    exported = run([PYTHON, "-m", "garrison", "ca", "export", "--data-dir", str(gw.data_dir)])
    assert exported.returncode == 0, exported.stderr
    assert gw.ca_path is not None
    assert exported.stdout.encode() == gw.ca_path.read_bytes()


# -- the server certificate -----------------------------------------------------------------------


def test_server_certificate_names_and_lifetime(gw: GatewayProcess) -> None:
    cert = served_certificate(gw)
    dns, ips = sans(cert)
    assert dns == {"gw.example.test", "localhost"}
    assert ips == {ipaddress.ip_address(a) for a in ("10.11.12.13", "fd00::7", "127.0.0.1", "::1")}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=397)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) < cert.not_valid_after_utc
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False


@pytest.mark.parametrize("name", ["gw.example.test", "10.11.12.13", "fd00::7", "localhost"])
def test_every_configured_name_verifies(gw: GatewayProcess, name: str) -> None:
    """A verifying client (hostname checks on) accepts the certificate under each name."""
    assert gw.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(gw.ca_path))
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as sock,
    ):
        assert sock.version() in ("TLSv1.2", "TLSv1.3")


def test_unlisted_name_does_not_verify(gw: GatewayProcess) -> None:
    assert gw.ca_path is not None
    ctx = ssl.create_default_context(cafile=str(gw.ca_path))
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="other.example.test")


# -- protocols and ciphers ------------------------------------------------------------------------


def _self_signed_pem(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls11-control")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = directory / "control.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


TLS11_CLIENT = ("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")


def test_tls11_client_works_against_a_tls11_server(openssl: str, tmp_path: Path) -> None:
    """Control for the next test: this openssl really offers TLS 1.1 when asked to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.load_cert_chain(_self_signed_pem(tmp_path))
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot serve TLS 1.1 at all: {exc}")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    versions: list[str] = []

    def serve() -> None:
        server.settimeout(30)
        try:
            conn, _ = server.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                versions.append(tls.version() or "")
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        _, output = s_client(openssl, port, *TLS11_CLIENT)
    finally:
        thread.join(30)
        server.close()
    assert versions == ["TLSv1.1"], output
    assert negotiated(output)[0] == "TLSv1.1"


def test_tls11_is_refused(gw: GatewayProcess, openssl: str) -> None:
    code, output = s_client(openssl, gw.port, *TLS11_CLIENT)
    assert code != 0, output
    assert negotiated(output) == ("", ""), output


def test_tls12_works_with_ecdhe_and_aead(gw: GatewayProcess, openssl: str) -> None:
    code, output = s_client(openssl, gw.port, "-tls1_2", *verified(gw))
    proto, cipher = negotiated(output)
    assert code == 0 and proto == "TLSv1.2", output
    assert cipher.startswith("ECDHE-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


@pytest.mark.parametrize(
    "ciphers",
    [
        "AES128-GCM-SHA256:AES256-GCM-SHA384",  # no forward secrecy (RSA key exchange)
        "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",  # CBC
        "DHE-RSA-AES128-GCM-SHA256",  # finite-field DH
    ],
)
def test_tls12_without_ecdhe_aead_is_refused(
    gw: GatewayProcess, openssl: str, ciphers: str
) -> None:
    code, output = s_client(openssl, gw.port, "-tls1_2", "-cipher", ciphers)
    assert code != 0, output
    assert negotiated(output) == ("", ""), output


def test_tls13_works(gw: GatewayProcess, openssl: str) -> None:
    code, output = s_client(openssl, gw.port, "-tls1_3", *verified(gw))
    proto, cipher = negotiated(output)
    assert code == 0 and proto == "TLSv1.3", output
    assert cipher in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                      "TLS_CHACHA20_POLY1305_SHA256"), cipher  # fmt: skip


def test_modern_profile_refuses_tls12(modern: GatewayProcess, openssl: str) -> None:
    code, output = s_client(openssl, modern.port, "-tls1_2")
    assert code != 0, output
    assert negotiated(output) == ("", ""), output
    code, output = s_client(openssl, modern.port, "-tls1_3", *verified(modern))
    assert code == 0 and negotiated(output)[0] == "TLSv1.3", output


# -- security headers on every HTTPS answer -------------------------------------------------------


def _answers(gw: GatewayProcess) -> dict[str, RawResponse]:
    """One answer of each kind: proxied, gateway endpoint, gateway 404, parse error, 502."""
    return {
        "proxied": get(gw, "/echo"),
        "endpoint": get(gw, "/.garrison/healthz"),
        "gateway-404": get(gw, "/.garrison/no-such-endpoint"),
        "path-400": get(gw, "/a%2Fb"),
        "parse-400": send_raw(
            gw, b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        ),
        "head": send_raw(
            gw, b"HEAD /echo HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", head_request=True
        ),
    }


def test_security_headers_on_every_answer(gw: GatewayProcess) -> None:
    answers = _answers(gw)
    answers["upstream-502"] = get(gw, "/down/x")
    expected_status = {"proxied": 200, "endpoint": 200, "gateway-404": 404, "path-400": 400,
                       "parse-400": 400, "head": 200, "upstream-502": 502}  # fmt: skip
    for kind, resp in answers.items():
        assert resp.status == expected_status[kind], (kind, resp.raw[:300])
        assert resp.all("strict-transport-security") == [DEFAULT_HSTS], kind
        assert resp.all("x-content-type-options") == ["nosniff"], kind
        assert resp.all("referrer-policy") == ["strict-origin-when-cross-origin"], kind


def test_configured_hsts_and_referrer_policy(modern: GatewayProcess) -> None:
    for kind, resp in _answers(modern).items():
        assert resp.all("strict-transport-security") == ["max-age=3600"], kind
        assert resp.all("referrer-policy") == ["no-referrer"], kind
        assert resp.all("x-content-type-options") == ["nosniff"], kind


# -- plain HTTP redirects to HTTPS ----------------------------------------------------------------


def _plain(port: int, data: bytes) -> tuple[str, dict[str, str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        for _ in range(100):  # bounded: the redirect listener closes after one answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    head = out.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


@pytest.mark.parametrize(
    ("host", "authority"),
    [
        ("localhost:{http}", "localhost:{https}"),
        ("gw.example.test", "gw.example.test:{https}"),
        ("127.0.0.1:{http}", "127.0.0.1:{https}"),
        ("[::1]:{http}", "[::1]:{https}"),
    ],
)
def test_redirect_listener_sends_301_to_same_host_and_path(
    gw: GatewayProcess, upstream: FakeUpstream, host: str, authority: str
) -> None:
    assert gw.http_port is not None, gw.output()
    ports = {"http": gw.http_port, "https": gw.port}
    before = len(upstream.requests)
    target = "/same/path?q=1&r=%2F"
    request = f"GET {target} HTTP/1.1\r\nHost: {host.format(**ports)}\r\n\r\n".encode()
    status, headers = _plain(gw.http_port, request)
    assert status.startswith("HTTP/1.1 301"), status
    assert headers["location"] == f"https://{authority.format(**ports)}{target}"
    assert "strict-transport-security" not in headers  # HSTS means nothing over plain HTTP
    assert len(upstream.requests) == before


def test_curl_follows_the_redirect_to_https(gw: GatewayProcess, curl: str) -> None:
    assert gw.ca_path is not None and gw.http_port is not None
    result = run([curl, "-sS", "-L", "--cacert", str(gw.ca_path), "-o", "/dev/null",
                  "-w", "%{http_code} %{url_effective}",
                  f"http://localhost:{gw.http_port}/.garrison/healthz?x=1"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"200 https://localhost:{gw.port}/.garrison/healthz?x=1"


# -- hostname changes reissue the certificate -----------------------------------------------------


def _names_config(upstream: FakeUpstream, names: list[str]) -> str:
    return config(upstream.url, server=f"hostnames = {names!r}\n")


def test_hostname_change_reissues_certificate_on_reload_and_restart(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    with running_gateway(tmp_path, _names_config(upstream, ["old.example.test"])) as gw:
        assert "old.example.test" in sans(served_certificate(gw))[0]
        gw.config_path.write_text(_names_config(upstream, ["new.example.test", "10.9.8.7"]))
        gw.signal(signal.SIGHUP)
        gw.wait_for_line(r"configuration reloaded")
        dns, ips = sans(served_certificate(gw))
        assert "new.example.test" in dns and "old.example.test" not in dns
        assert ipaddress.ip_address("10.9.8.7") in ips
        assert gw.ca_path is not None
        ctx = ssl.create_default_context(cafile=str(gw.ca_path))
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="new.example.test") as sock,
        ):
            sock.sendall(b"GET /.garrison/healthz HTTP/1.1\r\nHost: new.example.test\r\n"
                         b"Connection: close\r\n\r\n")  # fmt: skip
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        first_ca = gw.ca_path.read_bytes()
    # Restart on the same data dir with yet another name: same CA, new leaf.
    with running_gateway(tmp_path, _names_config(upstream, ["third.example.test"])) as gw:
        dns, _ = sans(served_certificate(gw))
        assert "third.example.test" in dns and "new.example.test" not in dns
        assert gw.ca_path is not None and gw.ca_path.read_bytes() == first_ca


def test_broken_reload_keeps_serving(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A config error on SIGHUP is logged; the running config and certificate stay."""
    with running_gateway(tmp_path, _names_config(upstream, ["keep.example.test"])) as gw:
        gw.config_path.write_text(_names_config(upstream, ["bad name!"]))
        gw.signal(signal.SIGHUP)
        gw.wait_for_line(r"reload refused")
        assert "keep.example.test" in sans(served_certificate(gw))[0]
        resp = get(gw, "/.garrison/healthz")
        assert resp.status == 200
        assert_json_error(get(gw, "/%2F"), 400, "encoded_separator")
        assert all(resp.header(h) for h in SECURITY_HEADERS)

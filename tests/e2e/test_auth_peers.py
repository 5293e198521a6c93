"""Real peers through a gateway that is protected by default (issue acceptance 6).

One gateway, routes with no `auth` line (so the default: session, API key or JWT): `/` to the
real Gradio app, `/demo/` to the demo AI app and `/fake/` to a recording fake upstream. Chromium
signs in through the login form and then uses Gradio (its XHR and SSE calls carry the session
cookie); the openai SDK and gradio_client use an API key made with `garrison key create`. A
wrong key, a forged JWT and no credential are refused, and the upstream never sees them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gradio_client import Client

from tests.e2e.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DemoApp,
    GradioApp,
    ca_file,
    create_key,
    log_in,
    spki_hash,
    trust,
)
from tests.e2e.test_peers_browser import (
    LAST_TEXT_IS,
    STEP_TIMEOUT_MS,
    WATCH_LAST_BOT,
    Traffic,
    assert_streamed,
)
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess
from tests.support.upstream import FakeUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY_NAME = "auth-peers"


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    gradio_root: GradioApp,
    demo_app: DemoApp,
    upstream: FakeUpstream,
) -> Iterator[GatewayProcess]:
    """The protected gateway: no route says `auth = ["none"]`."""
    config = f"""
[server]
listen = "127.0.0.1:0"

[[upstream]]
name = "gradio"
url = "{gradio_root.url}"

[[upstream]]
name = "demo"
url = "{demo_app.url}"

[[upstream]]
name = "fake"
url = "{upstream.url}"

[[route]]
path = "/demo/"
upstream = "demo"
strip_prefix = true

[[route]]
path = "/fake/"
upstream = "fake"
strip_prefix = true

[[route]]
path = "/"
upstream = "gradio"
"""
    gateway = GatewayProcess([], tmp_path_factory.mktemp("gw-auth") / "data", config_text=config)
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    """An ownerless key made with the CLI while the gateway runs (read on a cache miss)."""
    return create_key(gw.data_dir, KEY_NAME, scopes=("chat", "ui"))


@pytest.fixture(scope="module")
def http(gw: GatewayProcess) -> Iterator[httpx.Client]:
    """A client that trusts only the gateway's CA, follows no redirect and sends no credential."""
    with httpx.Client(verify=trust(gw), follow_redirects=False, timeout=30) as client:
        yield client


def _forged(real: str) -> list[str]:
    """Tokens that look like the gateway's own: its header and claims, signed by another
    P-256 key, and the same claims with `alg: none`."""
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    assert header["alg"] == "ES256" and header.get("kid"), header
    other = ec.generate_private_key(ec.SECP256R1())
    signed = jwt.encode(claims, other, algorithm="ES256", headers={"kid": header["kid"]})
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": header["kid"]})
    return [signed, unsigned]


def _wrong_key(key: str) -> str:
    """The real key's id with another secret: well-formed, found, and still wrong."""
    secret = key[16:]
    return key[:16] + ("A" if secret[0] != "A" else "B") + secret[1:]


def test_refused_credentials_never_reach_the_upstream(
    gw: GatewayProcess, http: httpx.Client, key: str, upstream: FakeUpstream
) -> None:
    """No credential, wrong keys and forged JWTs get 401 and nothing reaches the upstream;
    the same request with a real key or token does, as the key's or user's identity, with an
    assertion signed by a key in the gateway's JWKS and without the credential itself."""
    url = gw.url + "/fake/probe"
    token_resp = http.post(
        gw.url + "/.garrison/token",
        data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
    )
    assert token_resp.status_code == 200, token_resp.text
    token = token_resp.json()["access_token"]
    assert token_resp.json()["token_type"] == "Bearer"

    before = upstream.count()
    anonymous = http.get(url)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["code"] == "authentication_required"
    assert anonymous.headers["www-authenticate"].startswith('Bearer realm="garrison"')
    navigation = http.get(url, headers={"Accept": "text/html"})
    assert navigation.status_code == 302
    assert navigation.headers["location"] == "/.garrison/login?next=%2Ffake%2Fprobe"
    refusals = [
        {"Authorization": f"Bearer {_wrong_key(key)}"},
        {"X-API-Key": _wrong_key(key)},
        {"X-API-Key": "gk_not_a_key"},
        *({"Authorization": f"Bearer {forged}"} for forged in _forged(token)),
    ]
    for headers in refusals:
        resp = http.post(url, headers=headers, json={"secret": "must not arrive"})
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["code"] == "invalid_token", (headers, resp.text)
        assert 'error="invalid_token"' in resp.headers["www-authenticate"], headers
    assert upstream.count() == before, [r.raw_path for r in upstream.requests[before:]]

    # The same request with real credentials does reach it, so the count above can move.
    accepted = [
        ({"Authorization": f"Bearer {key}"}, f"key:{KEY_NAME}"),
        ({"X-API-Key": key}, f"key:{KEY_NAME}"),
        ({"Authorization": f"Bearer {token}"}, "admin"),
    ]
    for headers, _ in accepted:
        resp = http.post(url, headers=headers, json={"ok": True})
        assert resp.status_code == 200, resp.text
    assert upstream.count() == before + len(accepted)
    seen = upstream.requests[before:]
    assert [r.headers.get("x-forwarded-user") for r in seen] == [user for _, user in accepted]
    assert not any("authorization" in r.headers or "x-api-key" in r.headers for r in seen)
    jwks = jwt.PyJWKSet.from_dict(http.get(gw.url + "/.garrison/jwks.json").json())
    for r in seen:
        assertion = r.headers["x-garrison-assertion"]
        signer = next(
            k for k in jwks.keys if k.key_id == jwt.get_unverified_header(assertion)["kid"]
        )
        claims = jwt.decode(
            assertion, signer.key, algorithms=["ES256"], options={"verify_aud": False}
        )
        assert claims["sub"] == r.headers["x-forwarded-user"], claims


def test_openai_streams_with_a_cli_key(gw: GatewayProcess, key: str) -> None:
    """The SDK streams token by token with `api_key=<CLI key>`; a wrong key is refused."""
    with httpx.Client(verify=trust(gw)) as transport:

        def client(api_key: str) -> openai.OpenAI:
            return openai.OpenAI(
                base_url=gw.url + "/demo/v1",
                api_key=api_key,
                http_client=transport,
                max_retries=0,
                timeout=60,
            )

        stream = client(key).chat.completions.create(
            model="garrison-demo",
            messages=[{"role": "user", "content": "streamed behind a key"}],
            stream=True,
            extra_body={"x_delay_ms": 5},
        )
        pieces = [
            c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
        ]
        with pytest.raises(openai.AuthenticationError) as refused:
            client(_wrong_key(key)).chat.completions.create(
                model="garrison-demo", messages=[{"role": "user", "content": "no"}], stream=True
            )
    assert pieces == ["You", " said:", " streamed", " behind", " a", " key"]
    assert refused.value.status_code == 401


@pytest.fixture
def gradio_client_for(
    gw: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, str]], Client]]:
    """gradio_client Clients for `/` with the given headers; closed after the test."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file(gw)))
    made: list[Client] = []

    def make(headers: dict[str, str]) -> Client:
        client = Client(gw.url + "/", headers=headers, verbose=False, download_files=False)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_gradio_client_with_a_key_header(
    gradio_client_for: Callable[[dict[str, str]], Client], key: str
) -> None:
    """gradio_client sends the header on every call: config, predict and the queue's SSE."""
    client = gradio_client_for({"Authorization": f"Bearer {key}"})
    assert client.predict("keyed Gradio", api_name="/reverse") == "oidarG deyek"
    job = client.submit("one two three", api_name="/chat")
    assert job.result(timeout=60) == "Echo: one two three"
    assert job.outputs() == ["Echo:", "Echo: one", "Echo: one two", "Echo: one two three"]


def test_gradio_config_needs_a_credential(gw: GatewayProcess, http: httpx.Client, key: str) -> None:
    """What gradio_client fetches first: refused without a key, Gradio's own answer with one."""
    assert http.get(gw.url + "/config").status_code == 401
    keyed = http.get(gw.url + "/config", headers={"X-API-Key": key})
    assert keyed.status_code == 200, keyed.text[:300]
    assert keyed.json()["root"] == gw.url


@pytest.fixture(scope="module")
def browser(playwright_driver: Any, gw: GatewayProcess) -> Iterator[Any]:
    """Chromium that accepts exactly this gateway's key (last in the module: see conftest)."""
    browser = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(gw)}"],
    )
    try:
        yield browser
    finally:
        browser.close()


def test_browser_signs_in_and_uses_gradio(
    browser: Any, gw: GatewayProcess, artifacts: Path, tmp_path: Path
) -> None:
    """Sent to the login page, signed in through the form, back on Gradio: every XHR, upload
    and SSE stream the UI makes then passes on the session cookie alone."""
    context = browser.new_context(ignore_https_errors=False)
    page = context.new_page()
    traffic = Traffic(page)
    try:
        log_in(page, gw, "/")
        page.locator("#rev-in textarea").fill("hello gradio")
        page.locator("#rev-box").get_by_role("button", name="Submit").click()
        page.wait_for_function(
            "() => document.querySelector('#rev-out textarea')?.value === 'oidarg olleh'",
            timeout=STEP_TIMEOUT_MS,
        )

        data = hashlib.sha256(b"signed in").digest() * 40_000
        upload = tmp_path / "photo.bin"
        upload.write_bytes(data)
        page.locator("#file-in input[type=file]").set_input_files(str(upload))
        page.locator("#file-box").get_by_role("button", name="Submit").click()
        want = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
        page.wait_for_function(
            "(want) => document.querySelector('#file-out textarea')?.value === want",
            arg=want,
            timeout=STEP_TIMEOUT_MS,
        )

        bot = "#chatbot [data-testid='bot']"
        page.evaluate(WATCH_LAST_BOT, ["#chatbot", "[data-testid='bot']"])
        page.locator("#chat-in textarea").fill("one two three four five six")
        page.locator("#chat-in textarea").press("Enter")
        final = "Echo: one two three four five six"
        page.wait_for_function(LAST_TEXT_IS, arg=[bot, final], timeout=STEP_TIMEOUT_MS)
        seen = [t for t in page.evaluate("window.__seen") if t]
        page.screenshot(path=str(artifacts / "gradio_signed_in.png"), full_page=True)
    finally:
        context.close()
    assert_streamed(seen, final)
    assert traffic.errors == []
    assert traffic.outside(gw.url + "/") == []

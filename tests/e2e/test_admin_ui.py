"""Issue 7, acceptance 1: Debian's Chromium (via Playwright) drives the admin UI end to end.

`garrison up --demo` (the bundled fake OpenAI upstream behind `/`, admin UI on by default for
loopback clients). In one browser session: sign in as admin, create a user, create an API key
and use it with the `openai` SDK, revoke it in the UI and see the next SDK call refused, issue a
client certificate and download its .p12 (opened with the password), revoke it, and find the
refused SDK call in the audit search. Every page is saved as a full-page screenshot under
test-artifacts/admin/, and no page may log a console error (a CSP violation is one) or fetch
anything from outside the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, spki_hash, trust
from tests.e2e.fixtures_stream import wait_until
from tests.support.gateway import ADMIN_PASSWORD, GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "/.garrison/admin/"
STEP_MS = 30_000
P12_PASSWORD = "p12-password-for-e2e"
REVOKE_WAIT_S = 15.0
MESSAGES: Any = [{"role": "user", "content": "hello admin"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(["--demo"], tmp_path_factory.mktemp("gw-admin-ui") / "data")
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def shots(artifacts: Path) -> Path:
    folder = artifacts / "admin"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(playwright_driver: Any, gateway: GatewayProcess) -> Iterator[Any]:
    """One signed-out browser page that accepts exactly the gateway's key, with a record of
    console errors and of every URL it requested."""
    browser = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(gateway)}"],
    )
    context = browser.new_context(
        ignore_https_errors=False, accept_downloads=True, viewport={"width": 1360, "height": 860}
    )
    context.set_default_timeout(STEP_MS)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gateway.url)
    page = context.new_page()
    page.problems = []  # type: ignore[attr-defined]
    page.urls = []  # type: ignore[attr-defined]
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("request", lambda r: page.urls.append(r.url))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(f"{r.status} {r.url}"))
    try:
        yield page
    finally:
        context.close()
        browser.close()


def sdk(gw: GatewayProcess, http: httpx.Client, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=key, http_client=http, max_retries=0, timeout=60
    )


def refused(client: openai.OpenAI) -> bool:
    try:
        client.chat.completions.create(model="garrison-demo", messages=MESSAGES)
    except openai.AuthenticationError:
        return True
    return False


def open_p12(page: Any, password: str) -> Any:
    """Download the .p12 the page offers and open it with `password`; its certificate."""
    with page.expect_download() as info:
        page.get_by_test_id("p12-download").click()
    data = Path(info.value.path()).read_bytes()
    key, cert, _chain = pkcs12.load_key_and_certificates(data, password.encode())
    assert key is not None and cert is not None
    return cert


def go(page: Any, gw: GatewayProcess, path: str) -> None:
    response = page.goto(gw.url + ADMIN + path, wait_until="load")
    assert response is not None and response.status == 200, (path, response and response.status)


def flash(page: Any) -> str:
    return str(page.locator("[data-testid=flash]").inner_text())


def shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def submit(page: Any, form: str, button: str | None = None) -> None:
    with page.expect_navigation(wait_until="load"):
        page.locator(f"{form} button[type=submit]" if button is None else button).click()


def test_admin_ui_end_to_end(page: Any, gateway: GatewayProcess, shots: Path) -> None:
    try:
        walk(page, gateway, shots)
    except BaseException:
        shot(page, shots, "failure")  # what the browser showed when a step failed
        raise
    assert page.problems == [], "\n".join(page.problems)
    outside = [u for u in page.urls if not u.startswith((gateway.url, "data:", "blob:"))]
    assert outside == []


def walk(page: Any, gw: GatewayProcess, shots: Path) -> None:
    # -- sign in: the admin URL sends a browser to the real login page and back --
    page.goto(gw.url + ADMIN, wait_until="load")
    assert page.url.startswith(gw.url + "/.garrison/login?next="), page.url
    shot(page, shots, "00_login")
    page.fill("#username", "admin")
    page.fill("#password", ADMIN_PASSWORD)
    with page.expect_navigation(url=gw.url + ADMIN, wait_until="load"):
        page.click("button[type=submit]")
    assert page.get_by_test_id("signed-in-as").inner_text() == "admin"
    page.problems.clear()  # the login page is not the admin UI's (its /favicon.ico hits `/`)
    assert page.locator(".stat").count() == 4
    shot(page, shots, "01_overview")

    # -- a user --
    go(page, gw, "users")
    form = "[data-testid=create-user]"
    page.fill(f"{form} input[name=name]", "alice")
    page.fill(f"{form} input[name=email]", "alice@example.test")
    page.fill(f"{form} input[name=password]", "alice-password-0123")
    page.fill(f"{form} input[name=roles]", "user")
    submit(page, form)
    assert flash(page) == "User alice created."
    row = page.locator("tr[data-user=alice]")
    assert "Active" in row.inner_text() and "user" in row.inner_text()
    shot(page, shots, "02_users")
    with page.expect_navigation(wait_until="load"):
        row.get_by_role("link", name="Manage").click()
    assert page.url == gw.url + ADMIN + "users/edit?name=alice"
    shot(page, shots, "02b_user_edit")

    # -- an API key, used with the openai SDK --
    go(page, gw, "keys")
    form = "[data-testid=create-key]"
    page.fill(f"{form} input[name=name]", "alice-notebook")
    page.fill(f"{form} input[name=owner]", "alice")
    page.fill(f"{form} input[name=scopes]", "chat")
    page.fill(f"{form} input[name=rate]", "600/minute")
    submit(page, form)
    secret = page.get_by_test_id("key-secret").input_value()
    assert re.fullmatch(r"gk_[A-Za-z0-9]{12}_\S+", secret), secret
    key_id = secret[3:15]
    shot(page, shots, "03_key_secret")
    page.get_by_role("button", name="Copy").click()  # admin.js, allowed by the CSP
    page.get_by_role("button", name="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret

    with httpx.Client(verify=trust(gw)) as http:
        client = sdk(gw, http, secret)
        done = client.chat.completions.create(model="garrison-demo", messages=MESSAGES)
        assert done.choices[0].message.content == "You said: hello admin"

        go(page, gw, "keys")
        assert secret[16:] not in page.content()  # the secret never shows again
        row = page.locator(f"tr[data-key='{key_id}']")
        assert "Active" in row.inner_text()
        shot(page, shots, "04_keys")
        go(page, gw, f"keys/edit?id={key_id}")
        assert "600/minute" in page.locator("input[name=rate]").input_value()
        shot(page, shots, "04b_key_manage")
        go(page, gw, "keys")
        with page.expect_navigation(wait_until="load"):
            row.get_by_role("link", name="Revoke").click()
        shot(page, shots, "05_key_revoke_confirm")
        submit(page, "", "[data-testid=confirm]")
        assert flash(page) == f"Key {key_id} revoked."
        assert "Revoked" in page.locator(f"tr[data-key='{key_id}']").inner_text()

        # Every worker drops the key from its cache at its next poll of the store's change
        # feed (POLL_SECONDS, a quarter second): wait for that, generously bounded.
        assert wait_until(lambda: refused(client), timeout=REVOKE_WAIT_S), "revoked key works"
        with pytest.raises(openai.AuthenticationError) as refused_call:
            client.chat.completions.create(model="garrison-demo", messages=MESSAGES)
        assert refused_call.value.status_code == 401

    # -- a client certificate: issue, download the .p12 once, revoke --
    go(page, gw, "certs")
    form = "[data-testid=issue-cert]"
    page.fill(f"{form} input[name=name]", "alice-laptop")
    page.fill(f"{form} input[name=roles]", "user")
    page.fill(f"{form} input[name=p12_password]", P12_PASSWORD)
    submit(page, form)
    shot(page, shots, "06_cert_issued")
    with page.expect_download() as info:
        page.get_by_test_id("p12-download").click()
    download = info.value
    assert download.suggested_filename == "alice-laptop.p12"
    p12 = Path(download.path()).read_bytes()
    key, cert, _chain = pkcs12.load_key_and_certificates(p12, P12_PASSWORD.encode())
    assert key is not None and cert is not None
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert name == "alice-laptop"
    serial = format(cert.serial_number, "x")

    go(page, gw, "certs")
    assert "data:application/x-pkcs12" not in page.content()  # offered once, on one page
    row = page.locator(f"tr[data-serial='{serial}']")
    assert "Active" in row.inner_text()
    with page.expect_navigation(wait_until="load"):
        row.get_by_role("link", name="Revoke").click()
    page.select_option("select[name=reason]", "keyCompromise")
    submit(page, "", "[data-testid=confirm]")
    assert flash(page) == "Certificate revoked."
    assert "Revoked" in page.locator(f"tr[data-serial='{serial}']").inner_text()
    shot(page, shots, "07_certs")

    # -- no password typed: one is generated and shown once; renewing supersedes the old one --
    page.fill(f"{form} input[name=name]", "bob-phone")
    submit(page, form)
    first = open_p12(page, page.get_by_test_id("p12-password").input_value())
    go(page, gw, f"certs/renew?serial={format(first.serial_number, 'x')}")
    shot(page, shots, "07b_cert_renew")
    submit(page, "form[action$='certs/renew']")
    assert "Certificate renewed" in page.locator(".reveal h2").inner_text()
    second = open_p12(page, page.get_by_test_id("p12-password").input_value())
    assert second.serial_number != first.serial_number
    go(page, gw, "certs")
    old = page.locator(f"tr[data-serial='{format(first.serial_number, 'x')}']").inner_text()
    new = page.locator(f"tr[data-serial='{format(second.serial_number, 'x')}']").inner_text()
    assert "Revoked" in old and "Superseded" in old
    assert "Active" in new
    shot(page, shots, "07c_certs_renewed")

    # -- sessions --
    go(page, gw, "sessions")
    assert "this browser" in page.get_by_test_id("sessions-table").inner_text()
    shot(page, shots, "08_sessions")

    # -- the refused SDK call, found in the audit search --
    go(page, gw, "audit")
    search = "[data-testid=audit-search]"
    page.fill(f"{search} input[name=status]", "401")
    page.fill(f"{search} input[name=route]", "/v1/chat/completions")
    submit(page, search)
    results = page.get_by_test_id("audit-results").locator("tbody tr")
    assert results.count() >= 1
    text = results.first.inner_text()
    assert "401" in text and "/v1/chat/completions" in text and "request" in text
    shot(page, shots, "09_audit")

    # -- the overview again, now with traffic --
    go(page, gw, "")
    assert int(page.get_by_test_id("stat-requests").inner_text().replace(",", "")) > 0
    upstream_health = page.locator("section.card table tbody tr td .badge").first
    assert upstream_health.text_content() == "healthy"  # the upstream answered: known, up
    assert upstream_health.get_attribute("class") == "badge ok"
    shot(page, shots, "10_overview_after")
    page.set_viewport_size({"width": 420, "height": 860})  # a phone: one column, nav on top
    go(page, gw, "keys")
    shot(page, shots, "11_keys_narrow")

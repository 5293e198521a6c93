"""Real Chromium (Debian's, via Playwright) using the UIs through the gateway over HTTPS.

Chromium ignores SSL_CERT_FILE, so each browser is launched with
`--ignore-certificate-errors-spki-list` holding the hash of the key the gateway serves: every
other certificate error still fails the navigation (ignore_https_errors stays False).
The Gradio UI is exercised at `/` and under `/app/` (see test_peers_gradio for root_path), the
demo page at `/` (`garrison up --demo`) and under `/demo/`. `garrison up --demo` protects `/`
by default, so that page is reached by signing in through the gateway's login form first; the
routed gateway's routes are explicitly public. A screenshot of each lands in test-artifacts/.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, log_in, spki_hash
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEP_TIMEOUT_MS = 30_000
WATCH_LAST_BOT = """([box, sel]) => {
  window.__seen = [];
  const root = document.querySelector(box);
  new MutationObserver(() => {
    const els = root.querySelectorAll(sel);
    if (!els.length) return;
    const text = els[els.length - 1].innerText.trim();
    if (window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  }).observe(root, { subtree: true, childList: true, characterData: true });
}"""
LAST_TEXT_IS = """([sel, want]) => {
  const els = document.querySelectorAll(sel);
  return els.length > 0 && els[els.length - 1].innerText.trim() === want;
}"""


@pytest.fixture(scope="module")
def browser(
    playwright_driver: Any, routed_gateway: GatewayProcess, demo_gateway: GatewayProcess
) -> Iterator[Any]:
    """One Chromium that accepts exactly the two gateways' keys."""
    spkis = ",".join(spki_hash(gw) for gw in (routed_gateway, demo_gateway))
    browser = playwright_driver.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spkis}"],
    )
    try:
        yield browser
    finally:
        browser.close()


def assert_streamed(seen: list[str], final: str) -> None:
    """A partial answer was painted before the final one: the stream was not buffered.

    The observer may merge neighbouring updates, so any proper prefix counts."""
    assert seen and seen[-1] == final, seen
    assert all(final.startswith(t) for t in seen), seen
    assert any(len(t) < len(final) for t in seen), seen


class Traffic:
    """Every request the page makes and every error response, to catch leaks and breakage."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.errors: list[tuple[int, str]] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("response", lambda r: r.status >= 400 and self.errors.append((r.status, r.url)))

    def outside(self, prefix: str) -> list[str]:
        return [
            u
            for u in self.urls
            if u.split(":", 1)[0] in ("http", "https", "ws", "wss") and not u.startswith(prefix)
        ]


@pytest.mark.parametrize(("path", "shot"), [("/", "gradio_root"), ("/app/", "gradio_subpath")])
def test_gradio_ui_through_gateway(
    browser: Any,
    routed_gateway: GatewayProcess,
    artifacts: Path,
    tmp_path: Path,
    path: str,
    shot: str,
) -> None:
    context = browser.new_context(ignore_https_errors=False)
    page = context.new_page()
    traffic = Traffic(page)
    try:
        resp = page.goto(routed_gateway.url + path, wait_until="load")
        assert resp is not None and resp.status == 200

        page.locator("#rev-in textarea").fill("hello gradio")
        page.locator("#rev-box").get_by_role("button", name="Submit").click()
        page.wait_for_function(
            "() => document.querySelector('#rev-out textarea')?.value === 'oidarg olleh'",
            timeout=STEP_TIMEOUT_MS,
        )

        data = hashlib.sha256(shot.encode()).digest() * 40_000
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
        page.screenshot(path=str(artifacts / f"{shot}.png"), full_page=True)
    finally:
        context.close()
    assert_streamed(seen, final)
    assert traffic.errors == []
    assert traffic.outside(routed_gateway.url + path) == []


@pytest.mark.parametrize(
    ("which", "path", "shot", "protected"),
    [("demo", "/", "demo_page", True), ("routed", "/demo/", "demo_page_subpath", False)],
)
def test_demo_page_through_gateway(
    browser: Any,
    request: pytest.FixtureRequest,
    artifacts: Path,
    tmp_path: Path,
    which: str,
    path: str,
    shot: str,
    protected: bool,
) -> None:
    """`garrison up --demo` at `/` (protected: sign in first), and the standalone demo app under
    a stripped, public `/demo/`."""
    gw: GatewayProcess = request.getfixturevalue(f"{which}_gateway")
    context = browser.new_context(ignore_https_errors=False)
    page = context.new_page()
    traffic = Traffic(page)
    try:
        if protected:
            log_in(page, gw, path)
        resp = page.goto(gw.url + path, wait_until="load")
        assert resp is not None and resp.status == 200
        page.wait_for_function(
            "() => document.querySelector('#health').textContent === 'health: ok'",
            timeout=STEP_TIMEOUT_MS,
        )
        page.evaluate(WATCH_LAST_BOT, ["#log", ".msg.bot"])
        page.fill("#prompt", "hello from chromium")
        page.click("#send")
        final = "You said: hello from chromium"
        page.wait_for_function(LAST_TEXT_IS, arg=[".msg.bot.done", final], timeout=STEP_TIMEOUT_MS)
        seen = [t for t in page.evaluate("window.__seen") if t]
        usage = page.inner_text("#usage")

        data = b"\x89PNG fake image " * 200_000
        upload = tmp_path / "face.png"
        upload.write_bytes(data)
        page.set_input_files("#file", str(upload))
        page.click("#upload")
        page.wait_for_selector("#upload-result[data-sha256]", timeout=STEP_TIMEOUT_MS)
        digest = page.get_attribute("#upload-result", "data-sha256")
        page.screenshot(path=str(artifacts / f"{shot}.png"), full_page=True)
    finally:
        context.close()
    assert_streamed(seen, final)
    assert usage == "usage: 4 prompt + 5 completion = 9 tokens"
    assert digest == hashlib.sha256(data).hexdigest()
    assert traffic.errors == []
    assert traffic.outside(gw.url + path) == []

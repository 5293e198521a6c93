"""A real Gradio app behind the gateway, driven by the real `gradio_client`.

Two Gradio processes sit behind one gateway: one at `/`, one under `/app/` with
`strip_prefix = true`. Gradio (checked with 6.x) builds its public root URL from
X-Forwarded-Host and X-Forwarded-Proto but ignores X-Forwarded-Prefix, so the sub-path app is
launched with `root_path="/app"`; with it, the UI's `/gradio_api/*` calls, the queue's SSE
stream and uploads all stay under `/app/`. gradio_client (httpx) trusts the gateway's CA through
SSL_CERT_FILE, which httpx honours, exactly as a user would set it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from tests.e2e.conftest import ca_file, trust
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PATHS = ["/", "/app/"]


@pytest.fixture
def client_for(
    routed_gateway: GatewayProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], Client]]:
    """Make gradio_client Clients for a gateway path; close them (and their heartbeats) after."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file(routed_gateway)))
    made: list[Client] = []

    def make(path: str) -> Client:
        client = Client(routed_gateway.url + path, verbose=False, download_files=False)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("path", PATHS)
def test_config_root_is_the_public_https_url(routed_gateway: GatewayProcess, path: str) -> None:
    """Gradio's own idea of its URL must be the gateway's, or the UI calls the wrong place."""
    with httpx.Client(verify=trust(routed_gateway)) as http:
        resp = http.get(routed_gateway.url + path + "config")
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["root"] == routed_gateway.url + path.rstrip("/")


@pytest.mark.parametrize("path", PATHS)
def test_predict_through_gateway(client_for: Callable[[str], Client], path: str) -> None:
    client = client_for(path)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/reverse", "/digest", "/chat"} <= set(endpoints)
    assert client.predict("Garrison guards Gradio", api_name="/reverse") == "oidarG sdraug nosirraG"


@pytest.mark.parametrize("path", PATHS)
def test_streaming_chat_through_gateway(client_for: Callable[[str], Client], path: str) -> None:
    client = client_for(path)
    job = client.submit("tokens arrive one by one", api_name="/chat")
    final = job.result(timeout=60)
    outputs = job.outputs()  # each item is one streamed update, in order
    assert outputs == [
        "Echo:",
        "Echo: tokens",
        "Echo: tokens arrive",
        "Echo: tokens arrive one",
        "Echo: tokens arrive one by",
        "Echo: tokens arrive one by one",
    ]
    assert final == "Echo: tokens arrive one by one"


@pytest.mark.parametrize("path", PATHS)
def test_upload_through_gateway(
    client_for: Callable[[str], Client], path: str, tmp_path: Path
) -> None:
    data = hashlib.sha256(path.encode()).digest() * (3 * 1024 * 1024 // 32 + 7)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    client = client_for(path)
    got = client.predict(handle_file(str(src)), api_name="/digest")
    assert got == f"{len(data)} {hashlib.sha256(data).hexdigest()}"

"""Fixtures of the demo's browser tests: the real search API (Triton + FAISS index) in a
thread, the demo on a free port, and Debian's Chromium driven by Playwright."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections get refused by a
# closed network and slow it down; --no-sandbox because tests may run as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("Chromium is not installed (`make browser` installs Debian's)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    yield context.new_page()
    context.close()


@pytest.fixture(scope="session")
def search_api(tmp_path_factory, triton_server, synth_data) -> str:
    """URL of a real search API serving a flat index of `synth_data` embedded by Triton's `tiny`."""
    from server.api.app import create_app
    from server.index.build import build_index
    from tests.servers import served_in_thread

    indexes = tmp_path_factory.mktemp("indexes")
    build_index("tiny", synth_data, indexes / "synth", index_type="flat",
                triton_url=triton_server.grpc_url, protocol="grpc")
    with served_in_thread(create_app(indexes, triton_server.grpc_url, "grpc"), ready=True) as url:
        yield url


@pytest.fixture
def launch_demo():
    """Factory: launch_demo(api_url) -> URL of the Gradio demo, served on a free port."""
    from demo import app
    from server.triton import free_port

    launched = []

    def launch(api_url: str) -> str:
        port = free_port()
        launched.append(app.launch(api_url, port=port, block=False))
        return f"http://127.0.0.1:{port}/"

    yield launch
    for blocks in launched:
        blocks.close()

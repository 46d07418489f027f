"""The demo's Text tab in a real browser, in front of the real API: the index's trained prompts
offered, a search by one of them showing the nearest patches, and an index whose encoder has no
text tower answered with the API's own sentence."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:::gradio.queueing")]

TIMEOUT_MS = 30_000
CAPTION = re.compile(r"^#(\d+) (\S+) · similarity (-?\d+\.\d\d)$")


@pytest.fixture(scope="module")
def text_api(text_triton) -> str:
    from server.api.app import create_app
    from tests.servers import served_in_thread

    info, indexes = text_triton
    with served_in_thread(create_app(indexes, info.grpc_url), ready=True) as url:
        yield url


def test_text_tab_searches_with_a_trained_prompt_and_explains_a_refusal(page, text_api, launch_demo, tmp_path):
    page.goto(launch_demo(text_api))
    page.get_by_role("tab", name="Text").click()
    expect(page.locator("#text-index-dropdown input")).to_have_value("clipped", timeout=TIMEOUT_MS)
    page.locator("#text-query textarea").fill("a histopathology image of tumour cells")
    page.click("#text-search-button")
    items = page.locator("#text-results .gallery-item")
    expect(items).to_have_count(10, timeout=TIMEOUT_MS)
    captions = [CAPTION.match(t.strip()) for t in page.locator("#text-results .caption-label").all_inner_texts()]
    assert all(captions) and [int(c[1]) for c in captions] == list(range(1, 11))
    scores = [float(c[3]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    expect(page.locator("#text-status")).to_contain_text("10 results from index", timeout=TIMEOUT_MS)

    # The index of an encoder without a text tower: the API's sentence, naming the encoders that have one.
    page.locator("#text-index-dropdown input").click()
    page.get_by_role("option", name="plain").click()
    expect(page.locator("#text-status")).to_contain_text("has no text tower", timeout=TIMEOUT_MS)
    page.click("#text-search-button")
    expect(page.locator("#text-status")).to_contain_text("text search works with: clip, conch, plip, quiltnet",
                                                         timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "demo_text.png"), full_page=True)

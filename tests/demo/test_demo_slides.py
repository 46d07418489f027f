"""The demo's Slides tab in a real browser, in front of the real API (Triton `tiny` + FAISS)
serving an index of synthetic whole slides: choose a slide, see the other slides ranked
with boxes drawn, click one and see the query tile and the matched tile side by side."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:::gradio.queueing")]

CAPTION = re.compile(r"^#(\d+) (slide_\d{4}) · (\S+) · score (-?\d+\.\d\d)$")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def slides_api(tmp_path_factory, triton_server) -> str:
    from server.api.app import create_app
    from server.index.build import build_index
    from tests.servers import served_in_thread
    from training.data.prepare_slides import prepare_slides
    from training.data.synthetic_slides import synthesize_slides

    root = tmp_path_factory.mktemp("demo_slides")
    synthesize_slides(root / "slides", 4, classes=2, size=2048, seed=8)
    prepare_slides(root / "slides", root / "tiles", tile=128, mpp=1.0, mosaic_minimum=8)
    build_index("tiny", root / "tiles", root / "indexes" / "wsi", triton_url=triton_server.grpc_url, batch=64)
    with served_in_thread(create_app(root / "indexes", triton_server.grpc_url), ready=True) as url:
        yield url


def test_slides_tab_ranks_slides_and_compares_tiles(page, slides_api, launch_demo, tmp_path):
    page.goto(launch_demo(slides_api))
    page.get_by_role("tab", name="Slides").click()
    expect(page.locator("#slide-index-dropdown input")).to_have_value("wsi", timeout=TIMEOUT_MS)
    expect(page.locator("#slide-dropdown input")).to_have_value(re.compile(r"^slide_0000"), timeout=TIMEOUT_MS)
    page.click("#slide-search-button")

    items = page.locator("#slide-results .gallery-item")
    expect(items).to_have_count(3, timeout=TIMEOUT_MS)  # every other slide; never the query itself
    page.wait_for_function(
        "[...document.querySelectorAll('#slide-results .gallery-item img')]"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=TIMEOUT_MS)
    captions = [CAPTION.match(t.strip()) for t in page.locator("#slide-results .caption-label").all_inner_texts()]
    assert all(captions) and [int(c[1]) for c in captions] == [1, 2, 3]
    assert "slide_0000" not in [c[2] for c in captions]
    scores = [float(c[4]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    assert "Majority vote of the 3 slides" in page.inner_text("#slide-vote")
    expect(page.locator("#slide-query img")).to_have_count(1, timeout=TIMEOUT_MS)

    items.first.click()
    for tile in ("#slide-query-tile img", "#slide-match-tile img"):
        expect(page.locator(tile)).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator("#slide-pair")).to_contain_text("similarity", timeout=TIMEOUT_MS)
    assert captions[0][2] in page.inner_text("#slide-pair")
    page.screenshot(path=str(tmp_path / "demo_slides.png"), full_page=True)

"""The Gradio demo in a real browser, in front of the real search API (Triton + FAISS).

Headless Chromium uploads a database tile, sets k, clicks Search and reads what a person
would see: k captioned results in rank order, the majority vote and the timings. Another
points the demo at a dead port and checks the page says so in plain words.
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
from playwright.sync_api import expect

from histoseek.dataset import read_dataset

# Gradio's queue calls pandas APIs that pandas 3 deprecates: not ours to fix.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:::gradio.queueing")]

CAPTION = re.compile(r"^#(\d+) (\S+) · similarity (-?\d+\.\d\d)$")
VOTE = re.compile(r"Majority vote: (\S+) \((\d+)/(\d+)\)")
TIMEOUT_MS = 30_000


def _upload(page, path) -> None:
    page.locator("#query-image input[type=file]").set_input_files(str(path))
    page.locator("#query-image img").first.wait_for(timeout=TIMEOUT_MS)  # the preview: upload done


def _set_k(page, k: int) -> None:
    number = page.locator("#k-slider input[type=number]")
    number.fill(str(k))
    number.press("Enter")
    expect(page.locator("#k-slider input[type=range]")).to_have_value(str(k), timeout=TIMEOUT_MS)


def test_search_shows_ranked_results(page, search_api, launch_demo, synth_data, tmp_path):
    dataset = read_dataset(synth_data)
    labels = set(dataset.labels)
    query = dataset.items[0]
    k = 5

    page.goto(launch_demo(search_api))
    # The index list is filled from /v1/indexes when the page loads.
    expect(page.locator("#index-dropdown input")).to_have_value(re.compile("^synth"), timeout=TIMEOUT_MS)
    _upload(page, dataset.absolute(query))
    _set_k(page, k)
    page.click("#search-button")
    items = page.locator("#results-gallery .gallery-item")
    expect(items).to_have_count(k, timeout=TIMEOUT_MS)
    # Every thumbnail was fetched and decoded by the browser.
    page.wait_for_function(
        "[...document.querySelectorAll('#results-gallery .gallery-item img')]"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=TIMEOUT_MS)

    captions = page.locator("#results-gallery .caption-label").all_inner_texts()
    parsed = [CAPTION.match(text.strip()) for text in captions]
    assert all(parsed), captions
    ranks = [int(m[1]) for m in parsed]
    found = [m[2] for m in parsed]
    scores = [float(m[3]) for m in parsed]
    assert ranks == list(range(1, k + 1))
    assert set(found) <= labels, (found, labels)
    assert all(-1.0 <= s <= 1.0 for s in scores) and scores == sorted(scores, reverse=True), scores
    # The query is itself in the index: it comes first, identical.
    assert found[0] == query.label and scores[0] >= 0.99, captions[0]

    vote = VOTE.search(page.inner_text("#vote"))
    assert vote, page.inner_text("#vote")
    counts = Counter(found)
    assert vote[1] in labels and int(vote[2]) == counts[vote[1]] == max(counts.values()) and int(vote[3]) == k
    timings = page.inner_text("#timings")
    assert all(stage in timings for stage in ("decode", "preprocess", "embed", "search", "total")), timings
    assert f"{k} results" in page.inner_text("#status")

    screenshot = tmp_path / "demo_search.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")


def test_label_filter_returns_only_items_of_the_chosen_label(page, search_api, launch_demo, synth_data):
    dataset = read_dataset(synth_data)
    query = dataset.items[0]
    other = sorted(set(dataset.labels) - {query.label})[0]  # the query's own label is filtered out

    page.goto(launch_demo(search_api))
    expect(page.locator("#index-dropdown input")).to_have_value(re.compile("^synth"), timeout=TIMEOUT_MS)
    _upload(page, dataset.absolute(query))
    _set_k(page, 6)
    choice = page.locator("#label-filter input")
    choice.click()
    page.get_by_role("option", name=other, exact=True).click(timeout=TIMEOUT_MS)  # offered from /v1/indexes
    page.keyboard.press("Escape")
    page.click("#search-button")
    items = page.locator("#results-gallery .gallery-item")
    expect(items).to_have_count(6, timeout=TIMEOUT_MS)
    captions = page.locator("#results-gallery .caption-label").all_inner_texts()
    found = [CAPTION.match(text.strip())[2] for text in captions]
    assert found == [other] * 6, captions
    assert f"6 results labelled {other}" in page.inner_text("#status")


def test_api_down_shows_a_readable_error(page, launch_demo, synth_data):
    from server.triton import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    page.goto(launch_demo(dead))
    status = page.locator("#status")
    expect(status).to_contain_text("Could not list the indexes", timeout=TIMEOUT_MS)
    page.click("#search-button")
    expect(status).to_contain_text("Upload an image or pick an example first", timeout=TIMEOUT_MS)
    _upload(page, next(synth_data.rglob("*.png")))
    page.click("#search-button")
    expect(status).to_contain_text("Search failed", timeout=TIMEOUT_MS)
    text = status.inner_text()
    assert "Cannot reach the search API" in text and dead in text, text
    assert "Traceback" not in page.inner_text("body")
    assert page.locator("#results-gallery .gallery-item").count() == 0


def test_client_reports_api_errors_readably(search_api, synth_data):
    from PIL import Image

    from demo.client import ApiError, SearchClient

    client = SearchClient(search_api)
    image = Image.open(next(synth_data.rglob("*.png"))).convert("RGB")
    with pytest.raises(ApiError, match=r"answered 404: .*'nope'"):
        client.search(image, "nope", 3)
    client.close()


def test_demo_imports_no_torch_or_training():
    import subprocess
    import sys

    code = ("import sys, demo.app; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'training', 'server')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_marking_results_and_searching_again_changes_the_ranking(page, search_api, launch_demo, synth_data,
                                                                  tmp_path):
    dataset = read_dataset(synth_data)
    query = dataset.items[0]
    page.goto(launch_demo(search_api))
    expect(page.locator("#index-dropdown input")).to_have_value(re.compile("^synth"), timeout=TIMEOUT_MS)
    _upload(page, dataset.absolute(query))
    _set_k(page, 8)
    page.click("#search-button")
    expect(page.locator("#results-gallery .gallery-item")).to_have_count(8, timeout=TIMEOUT_MS)
    before = page.locator("#results-gallery .caption-label").all_inner_texts()
    # The results of another label are not what this pathologist wants; those of the query's are.
    marks = page.locator("#mark-not-relevant label").all_inner_texts()
    assert len(marks) == 8, marks
    unwanted = [m for m in marks if m.split()[1] != query.label]
    wanted = [m for m in marks if m.split()[1] == query.label]
    assert unwanted and wanted, marks
    for mark in unwanted:
        page.locator("#mark-not-relevant label", has_text=mark).click()
    for mark in wanted:
        page.locator("#mark-relevant label", has_text=mark).click()
    page.click("#refine-button")
    expect(page.locator("#status")).to_contain_text(f"refined with {len(wanted)} liked and {len(unwanted)} not liked",
                                                    timeout=TIMEOUT_MS)
    after = page.locator("#results-gallery .caption-label").all_inner_texts()
    assert len(after) == 8 and after != before, (before, after)
    found = [CAPTION.match(text.strip())[2] for text in after]
    assert found.count(query.label) >= sum(m.split()[1] == query.label for m in marks), (before, after)
    # The marks shown again are the page's: results still on screen stay ticked.
    ticked = page.locator("#mark-relevant input:checked").count()
    assert ticked >= 1
    page.screenshot(path=str(tmp_path / "demo_refine.png"), full_page=True)

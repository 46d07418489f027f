"""Slide search end to end: synthetic slides -> prepare -> Triton (`tiny`) + FAISS index ->
`histoseek search slide` and the API (slide search, slide list, thumbnail, region).

The tiny model embeds raw pixels, so these tests check mechanics, not retrieval quality
(benchmarks/bench_slides.py measures that with a trained encoder): a copy of an indexed
slide must find that slide first with its tiles at the same coordinates, a slide of the
index must never find itself, and every picture must come from a slide the index records.
"""
from __future__ import annotations

import io
import shutil
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from server.index.build import build_index
from server.index.folder import IndexFolder
from server.slides.search import rank_slides
from server.index.store import Item, Store
from tests.servers import assert_json_error

TILE, MPP = 128, 1.0  # 256 level-0 px per tile on 0.5 µm/px slides


def test_rank_slides_is_the_median_of_best_matches():
    # Two query tiles; slide 7 is the best match of both, slide 3 of one only.
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.95, 0.6, 0.5, 0.2]], np.float32)
    slides = np.array([[7, 3, 7, -1], [7, 7, 5, 3]])
    codes, totals, where = rank_slides(scores, slides, k=5)
    assert codes.tolist() == [7, 5, 3]
    assert totals[0] == pytest.approx(np.median([0.9, 0.95]))
    # Slide 5 is missing from the first tile's neighbours: it counts at that tile's floor (0.7).
    assert totals[1] == pytest.approx(np.median([0.7, 0.5]))
    assert totals[2] == pytest.approx(np.median([0.8, 0.2]))
    assert where[:, 0].tolist() == [0, 0] and where[:, 1].tolist() == [-1, 2]
    assert len(rank_slides(scores, np.full_like(slides, -1), 3)[0]) == 0


@pytest.fixture(scope="module")
def slide_data(tmp_path_factory) -> tuple[Path, Path]:
    """(slides folder, prepared dataset) of 6 synthetic slides of 3 labels."""
    from training.data.prepare_slides import prepare_slides
    from training.data.synthetic_slides import synthesize_slides

    root = tmp_path_factory.mktemp("slide_search")
    synthesize_slides(root / "slides", 6, classes=3, size=2048, seed=5)
    prepare_slides(root / "slides", root / "tiles", tile=TILE, mpp=MPP, mosaic_minimum=8)
    return root / "slides", root / "tiles"


@pytest.fixture(scope="module")
def slide_index(tmp_path_factory, slide_data, triton_server) -> Path:
    indexes = tmp_path_factory.mktemp("slide_indexes") / "indexes"
    build_index("tiny", slide_data[1], indexes / "slides", triton_url=triton_server.grpc_url, batch=64)
    return indexes / "slides"


@pytest.mark.slow
def test_index_keeps_slides_coordinates_and_mosaic(slide_index, slide_data):
    store = IndexFolder(slide_index).store
    records = store.slides()
    assert [r.slide for r in records] == [f"slide_{i:04d}" for i in range(6)]
    assert all(Path(r.file).is_file() and (r.tile, r.mpp, r.slide_mpp) == (TILE, MPP, 0.5) for r in records)
    items = store.slide_items("slide_0001")
    mosaic = store.slide_items("slide_0001", mosaic_only=True)
    assert 8 <= len(mosaic) < len(items) and all(i.mpp == MPP and i.x % 256 == 0 for i in items)
    assert store.slide("../../etc/passwd") is None and store.slide("slide_0001").label == records[1].label


@pytest.mark.slow
def test_a_copy_of_an_indexed_slide_finds_it_at_the_same_places(slide_index, slide_data, triton_server, tmp_path,
                                                                 capsys):
    from histoseek_cli.main import main

    original = next(slide_data[0].glob("*/slide_0002.tiff"))
    copy = shutil.copy(original, tmp_path / "query.tiff")
    main(["search", "slide", "--index", str(slide_index), "--slide", str(copy), "-k", "3", "--json",
          "--triton-url", triton_server.grpc_url])
    import json

    answer = json.loads(capsys.readouterr().out)
    top = answer["results"][0]
    assert top["slide"] == "slide_0002" and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert all((m["query_x"], m["query_y"]) == (m["x"], m["y"]) for m in top["matches"])
    assert len(answer["results"]) == 3 and answer["query_tiles"] >= 8
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_a_slide_of_the_index_never_finds_itself(slide_index, triton_server, capsys):
    from histoseek_cli.main import main

    for slide in ("slide_0000", "slide_0004"):
        main(["search", "slide", "--index", str(slide_index), "--slide-id", slide, "-k", "10",
              "--triton-url", triton_server.grpc_url, "--json"])
        import json

        answer = json.loads(capsys.readouterr().out)
        found = [r["slide"] for r in answer["results"]]
        assert slide not in found and len(found) == 5  # every other slide
        store = IndexFolder(slide_index).store
        for result in answer["results"]:  # matched tiles are the archive slide's own items
            for match in result["matches"]:
                item = store.lookup([match["id"]])[match["id"]]
                assert (item.group, item.x, item.y) == (result["slide"], match["x"], match["y"])


@pytest.fixture(scope="module")
def api(slide_index, triton_server):
    from server.api.app import create_app
    from tests.servers import served_in_thread

    with served_in_thread(create_app(slide_index.parent, triton_server.grpc_url)) as url:
        yield url


@pytest.mark.slow
def test_api_slide_search_by_id_and_by_upload(api, slide_data):
    answer = httpx.post(f"{api}/v1/search/slides", data={"slide_id": "slide_0003", "k": "4"}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"] == "slide_0003" and "slide_0003" not in [r["slide"] for r in body["results"]]
    assert len(body["results"]) == 4 and body["vote"]["label"]
    assert body["results"][0]["thumbnail_url"].startswith("/v1/slides/slides/")

    original = next(slide_data[0].glob("*/slide_0005.tiff"))
    with open(original, "rb") as f:
        answer = httpx.post(f"{api}/v1/search/slides", files={"slide": ("mine.tiff", f)}, data={"k": "2"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["slide"] == "slide_0005" and answer.json()["query"] == "mine.tiff"


@pytest.mark.slow
def test_api_slide_search_errors(api):
    url = f"{api}/v1/search/slides"
    assert_json_error(httpx.post(url, data={"slide_id": "nope"}), 404, "no slide")
    assert_json_error(httpx.post(url, data={"k": "3"}), 422, "either")
    assert_json_error(httpx.post(url, files={"slide": ("a.tiff", b"not a slide")}), 400, "OpenSlide")
    assert_json_error(httpx.post(url, data={"slide_id": "slide_0001", "k": "0"}),
                      422, "k must be")


@pytest.mark.slow
def test_api_lists_slides_and_serves_thumbnails_and_regions(api, slide_data):
    from histoseek.slides.reader import Slide

    listed = httpx.get(f"{api}/v1/slides/slides").json()
    assert [s["slide"] for s in listed] == [f"slide_{i:04d}" for i in range(6)]
    thumb = httpx.get(f"{api}/v1/slides/slides/slide_0001/thumbnail", params={"size": 200})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (200, 200)
    assert float(thumb.headers["x-thumbnail-scale"]) == pytest.approx(2048 / 200)

    region = httpx.get(f"{api}/v1/slides/slides/slide_0001/region", params={"x": 512, "y": 768, "size": 64})
    assert region.status_code == 200
    with Slide(next(slide_data[0].glob("*/slide_0001.tiff"))) as slide:
        expected = slide.read(512, 768, 0, (64, 64)).astype(float)
    got = np.asarray(Image.open(io.BytesIO(region.content)).convert("RGB")).astype(float)
    assert np.abs(got - expected).mean() < 8  # JPEG

    base = f"{api}/v1/slides/slides"
    for path, params, status, message in [
        ("slide_0001/region", {"x": 0, "y": 0, "size": 5000}, 422, "size must be"),
        ("slide_0001/region", {"x": 99999, "y": 0}, 422, "inside the slide"),
        ("slide_0001/region", {"x": 0, "y": 0, "level": 9}, 422, "level must be"),
        ("slide_0001/thumbnail", {"size": 100000}, 422, "size must be"),
        ("..%2F..%2Fetc%2Fpasswd/thumbnail", {}, 404, "no slide|not an endpoint"),
        ("%2Fetc%2Fpasswd/region", {"x": 0, "y": 0}, 404, "no slide|not an endpoint"),
        ("slide_0001.tiff/thumbnail", {}, 404, "no slide"),
    ]:
        assert_json_error(httpx.get(f"{base}/{path}", params=params), status, message)
    assert_json_error(httpx.get(f"{api}/v1/slides/other/slide_0001/thumbnail"), 404, "no index")


@pytest.mark.slow
def test_patch_search_says_which_slide_and_where(api, slide_data):
    tile = next((slide_data[1]).glob("*/slide_0002_*.png"))
    answer = httpx.post(f"{api}/v1/search", files={"image": ("t.png", tile.read_bytes())}, data={"k": "1"})
    assert answer.status_code == 200, answer.text
    (hit,) = answer.json()["results"]
    assert hit["slide"] == "slide_0002" and f"_x{hit['x']}_y{hit['y']}.png" in tile.name


def test_stores_built_before_slides_still_read_and_grow(tmp_path):
    path = tmp_path / "items.sqlite"
    with sqlite3.connect(path) as conn:  # the schema of indexes built before whole slides
        conn.executescript("""
            CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT NOT NULL,
                "group" TEXT NOT NULL, split TEXT NOT NULL DEFAULT '', x INTEGER NOT NULL DEFAULT 0,
                y INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '', thumbnail BLOB NOT NULL);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('build_id', 'b'), ('generation', '0'), ('next_id', '0');
            INSERT INTO items VALUES (0, 'a.png', 'tumour', 'g', '', 1, 2, 's', x'00');""")
    store = Store(path)
    assert store.lookup([0])[0] == Item(0, "a.png", "tumour", "g", "", 1, 2, "s")
    store.insert([Item(1, "b.png", "stroma", "h", mpp=0.5, mosaic=1)], [b"\x00"])
    assert store.lookup([1])[1].label == "stroma" and store.slides() == [] and store.slide("g") is None
    assert [i.id for i in store.slide_items("g", mosaic_only=True)] == [0]

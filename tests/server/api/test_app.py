"""The search API over a real uvicorn server (and TestClient where simpler), real Triton, real FAISS."""
from __future__ import annotations

import io
import json
import shutil
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.api.app import Settings, create_app
from server.index.folder import MANIFEST_FILE
from server.triton import free_port
from tests.images import png
from tests.servers import assert_json_error, served_in_thread

pytestmark = pytest.mark.slow  # every test here talks to the session's Triton or a server


@pytest.fixture(scope="module")
def api(indexes_dir, triton_server) -> str:
    """The app served by uvicorn on a free loopback port, in a background thread."""
    with served_in_thread(create_app(indexes_dir, triton_server.grpc_url)) as url:
        yield url



def test_search_returns_the_image_itself_first(client, synth_data):
    query = synth_data / "stroma" / "stroma_0003.png"
    response = client.post("/v1/search", files={"image": ("q.png", query.read_bytes(), "image/png")},
                           data={"k": "5"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["index"], body["k"], len(body["results"])) == ("tissue", 5, 5)
    first = body["results"][0]
    assert first["rank"] == 1 and first["label"] == "stroma" and first["score"] == pytest.approx(1.0, abs=1e-5)
    assert first["source"] == first["group"] == "stroma-000"  # the synthetic source image
    assert set(first) == {"rank", "id", "score", "label", "group", "source", "image_url"}
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert body["vote"]["label"] in {"tumour", "stroma", "lymphocytes"} and 0 < body["vote"]["share"] <= 1
    assert set(body["timings_ms"]) == {"decode", "preprocess", "embed", "search", "total"}

    thumbnail = client.get(first["image_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (64, 64)


def test_jpeg_and_tiff_queries_are_accepted(client, synth_data):
    image = Image.open(synth_data / "tumour" / "tumour_0000.png")
    for fmt in ("JPEG", "TIFF"):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        response = client.post("/v1/search", files={"image": (f"q.{fmt.lower()}", buffer.getvalue())},
                               data={"index": "tissue"})
        assert response.status_code == 200 and len(response.json()["results"]) == 10


def test_indexes(client):
    (entry,) = client.get("/v1/indexes").json()
    assert entry["name"] == "tissue" and entry["encoder"] == "tiny" and entry["type"] == "flat"
    assert entry["count"] == 24 and entry["dimension"] == 16
    assert entry["labels"] == ["lymphocytes", "stroma", "tumour"]


def test_add_search_and_delete_an_item(client, indexes_dir):
    pixels = np.full((40, 40, 3), (20, 200, 20), np.uint8)
    added = client.post("/v1/indexes/tissue/items", files={"image": ("green.png", png(pixels))},
                        data={"label": "green", "group": "slide-9"})
    assert added.status_code == 201, added.text
    item_id = added.json()["id"]
    assert added.json()["image_url"] == f"/v1/items/tissue/{item_id}/image"

    found = client.post("/v1/search", files={"image": ("q.png", png(pixels))}, data={"k": "3"}).json()
    assert (found["results"][0]["id"], found["results"][0]["label"]) == (item_id, "green")
    assert found["results"][0]["group"] == "slide-9"
    assert client.get(f"/v1/items/tissue/{item_id}/image").status_code == 200
    assert "green" in client.get("/v1/indexes").json()[0]["labels"]

    deleted = client.delete(f"/v1/indexes/tissue/items/{item_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    found = client.post("/v1/search", files={"image": ("q.png", png(pixels))}, data={"k": "3"}).json()
    assert item_id not in [r["id"] for r in found["results"]]
    gone = client.get(f"/v1/items/tissue/{item_id}/image")
    assert gone.status_code == 404 and f"no item {item_id}" in gone.json()["error"]
    assert client.delete(f"/v1/indexes/tissue/items/{item_id}").status_code == 404
    assert json.loads((indexes_dir / "tissue" / MANIFEST_FILE).read_text())["count"] == 24


def test_health_ready_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "indexes": ["tissue"]}
    client.post("/v1/search", files={"image": ("q.png", b"not an image")})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'histoseek_requests_total{endpoint="/healthz",method="GET",status="200"}' in text
    assert 'histoseek_requests_total{endpoint="/v1/search",method="POST",status="400"}' in text
    assert 'histoseek_request_duration_seconds_bucket{endpoint="/readyz"' in text
    assert 'histoseek_search_stage_seconds_count{stage="embed"}' in text


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/search", "/v1/indexes", "/v1/items/{index}/{item_id}/image", "/readyz"} <= set(paths)


def test_searches_while_items_are_added_and_removed(client, synth_data):
    query = (synth_data / "tumour" / "tumour_0001.png").read_bytes()
    failures: list[str] = []

    def search_repeatedly():
        for _ in range(15):
            response = client.post("/v1/search", files={"image": ("q.png", query)}, data={"k": "5"})
            if response.status_code != 200 or response.json()["results"][0]["score"] < 0.999:
                failures.append(response.text)

    readers = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for reader in readers:
        reader.start()
    for i in range(5):
        pixels = np.full((16, 16, 3), 40 * i, np.uint8)
        added = client.post("/v1/indexes/tissue/items", files={"image": ("x.png", png(pixels))}, data={"label": "x"})
        assert client.delete(f"/v1/indexes/tissue/items/{added.json()['id']}").status_code == 200
    for reader in readers:
        reader.join()
    assert failures == []


# -- errors: JSON with a status that says whose fault it is ------------------------------------

@pytest.fixture(scope="module")
def test_client(indexes_dir, triton_server):
    settings = Settings(max_upload_bytes=200_000, max_pixels=1_000_000, max_k=50)
    with TestClient(create_app(indexes_dir, triton_server.grpc_url, settings=settings)) as test_client:
        yield test_client


@pytest.mark.parametrize("files, data, status, message", [
    ({"image": ("q.png", b"not an image")}, {}, 400, "not a readable image"),
    ({"image": ("q.png", png(np.zeros((30, 30, 3), np.uint8))[:60])}, {}, 400, "corrupt or truncated"),
    ({"image": ("q.png", b"")}, {}, 400, "empty"),
    ({"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))}, {"index": "nope"}, 404, "no index named 'nope'.*tissue"),
    ({"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))}, {"k": "0"}, 422, "k must be between 1 and 50"),
    ({"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))}, {"k": "51"}, 422, "k must be between 1 and 50"),
    ({"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))}, {"k": "ten"}, 422, "k: .*integer"),
    ({}, {}, 415, "send the image as multipart/form-data"),
    ({"image": ("big.png", png(np.zeros((1001, 1000, 3), np.uint8)))}, {}, 413, "more than the limit of 1,000,000"),
    ({"image": ("big.bin", bytes(210_000))}, {}, 413, "big.bin is larger than 0.2 MB"),  # read, then refused
    ({"image": ("big.bin", bytes(300_000))}, {}, 413, "request is larger than 0.2 MB"),  # refused unread
])
def test_bad_requests_get_json_errors(test_client, files, data, status, message):
    assert_json_error(test_client.post("/v1/search", files=files, data=data), status, message)


@pytest.mark.parametrize("path", [
    "/v1/items/nope/0/image",
    "/v1/items/..%2F..%2Fetc/0/image",
    "/v1/items/tissue/9999/image",
    "/v1/items/tissue/-1/image",
    "/nowhere",
])
def test_unknown_index_item_or_path_is_404_json(test_client, path):
    response = test_client.get(path)
    assert response.status_code == 404 and "error" in response.json()


def test_add_needs_a_label_and_an_image(test_client):
    response = test_client.post("/v1/indexes/tissue/items", files={"image": ("q.png", b"junk")})
    assert response.status_code == 422 and "label: Field required" in response.json()["error"]
    response = test_client.post("/v1/indexes/tissue/items", files={"image": ("q.png", b"junk")}, data={"label": "a"})
    assert response.status_code == 400 and "not a readable image" in response.json()["error"]


def test_triton_down_is_503_and_readyz_says_why(indexes_dir):
    dead = f"localhost:{free_port()}"
    with TestClient(create_app(indexes_dir, dead, settings=Settings(triton_timeout_s=5))) as down:
        ready = down.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "index tissue" in ready.json()["not_ready"] and "histoseek triton start" in ready.json()["error"]
        search = down.post("/v1/search", files={"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))})
        assert search.status_code == 503 and "Triton is not reachable" in search.json()["error"]
        assert down.post("/v1/search", files={"image": ("q.png", b"junk")}).status_code == 400
        assert down.get("/healthz").status_code == 200
        assert down.get("/v1/indexes").status_code == 200  # served from the index alone


def test_index_of_another_model_version_is_refused(tmp_path, indexes_dir, triton_server):
    shutil.copytree(indexes_dir / "tissue", tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / MANIFEST_FILE).read_text())
    (tmp_path / "old" / MANIFEST_FILE).write_text(json.dumps({**manifest, "model_sha256": "ab" * 32}))
    with TestClient(create_app(tmp_path, triton_server.grpc_url)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "ab" * 32 in ready.json()["error"]
        search = client.post("/v1/search", files={"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))})
        assert search.status_code == 503
        assert f"sha256 {'ab' * 32}, but Triton serves 'tiny' with sha256 {manifest['model_sha256']}" in search.json()["error"]


def test_several_indexes_need_a_name(tmp_path, indexes_dir, triton_server):
    for name in ("a", "b"):
        shutil.copytree(indexes_dir / "tissue", tmp_path / name)
    (tmp_path / ".a.embedding").mkdir()  # a build's resume folder is not an index
    with TestClient(create_app(tmp_path, triton_server.grpc_url)) as client:
        assert [i["name"] for i in client.get("/v1/indexes").json()] == ["a", "b"]
        query = {"image": ("q.png", png(np.zeros((8, 8, 3), np.uint8)))}
        response = client.post("/v1/search", files=query)
        assert response.status_code == 400 and "loaded indexes: a, b" in response.json()["error"]
        assert client.post("/v1/search", files=query, data={"index": "b"}).json()["index"] == "b"


def test_no_indexes_is_not_ready(tmp_path, triton_server):
    with TestClient(create_app(tmp_path, triton_server.grpc_url)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no index folders" in ready.json()["error"]


# -- metadata filters -------------------------------------------------------------------------

def _search(client, path, **data) -> httpx.Response:
    return client.post("/v1/search", files={"image": ("q.png", path.read_bytes(), "image/png")}, data=data)


def test_search_filters_by_label_and_leaves_out_the_querys_group(client, synth_data):
    query = synth_data / "stroma" / "stroma_0003.png"
    body = _search(client, query, k="6", labels=["tumour", "lymphocytes"]).json()
    assert body["filter"] == {"labels": ["tumour", "lymphocytes"]}
    assert len(body["results"]) == 6 and {r["label"] for r in body["results"]} <= {"tumour", "lymphocytes"}
    assert [r["rank"] for r in body["results"]] == list(range(1, 7))

    own = _search(client, query, k="5").json()["results"][0]["group"]  # the query itself is indexed
    body = _search(client, query, k="5", query_group=own).json()
    assert body["filter"] == {"exclude_groups": [own]}
    assert len(body["results"]) == 5 and own not in {r["group"] for r in body["results"]}
    assert body["results"][0]["score"] < 0.999  # no longer the query's own tile

    every_stroma = _search(client, query, k="50", labels="stroma").json()["results"]
    expected = [r["id"] for r in every_stroma if r["group"] != own][:5]  # the same ranking, own group left out
    body = _search(client, query, k="5", labels="stroma", exclude_groups=own, exclude_sources="nothing").json()
    assert [r["id"] for r in body["results"]] == expected and {r["label"] for r in body["results"]} == {"stroma"}
    assert _search(client, query, k="5", labels="no such label").json()["results"] == []


@pytest.mark.parametrize("data, message", [
    ({"labels": ""}, "blank"),
    ({"labels": [f"l{i}" for i in range(101)]}, "more than 100"),
    ({"exclude_groups": "a\x00b"}, "control character"),
    ({"query_group": "x" * 300}, "characters long"),
])
def test_hostile_filters_get_422_with_a_message(client, synth_data, data, message):
    assert_json_error(_search(client, synth_data / "stroma" / "stroma_0003.png", k="5", **data), 422, message)

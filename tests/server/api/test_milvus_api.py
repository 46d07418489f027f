"""A Milvus-backed index served beside a FAISS-backed one by the same API: search, filters,
add/remove, and an outage of Milvus (503 with a message, then recovery) while FAISS serves on.
Real Triton, real FAISS, Milvus Lite's server as its own process on loopback."""
from __future__ import annotations

import shutil

import httpx
import pytest

from server.api.app import create_app
from server.index.build import build_index
from server.index.folder import IndexFolder
from server.search_command import search_image_command
from server.triton import free_port
from tests import milvus_server
from tests.servers import assert_json_error, served_in_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def milvus(tmp_path_factory):
    """(data folder, port, process holder) of a Milvus server the tests may stop and restart."""
    data, port = tmp_path_factory.mktemp("milvus") / "data", free_port()
    running = {"process": milvus_server.start(data, port)}
    yield data, port, running
    milvus_server.stop(running["process"])


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tissue_index, synth_data, triton_server, milvus):
    folder = tmp_path_factory.mktemp("side_by_side") / "indexes"
    shutil.copytree(tissue_index, folder / "faiss_flat")
    build_index("tiny", synth_data, folder / "milvus_hnsw", index_type="hnsw", triton_url=triton_server.grpc_url,
                batch=8, backend="milvus", backend_options={"uri": milvus_server.uri(milvus[1])})
    return folder


@pytest.fixture(scope="module")
def api(indexes, triton_server):
    with served_in_thread(create_app(indexes, triton_server.grpc_url)) as url:
        yield url



def _search(client, path, index, **data) -> httpx.Response:
    return client.post("/v1/search", files={"image": ("q.png", path.read_bytes(), "image/png")},
                       data={"index": index, **data})


def _ranking(response: httpx.Response) -> list[tuple[int, str]]:
    assert response.status_code == 200, response.text
    return [(r["id"], r["label"]) for r in response.json()["results"]]


def test_both_backends_serve_the_same_answers(client, synth_data):
    listed = {i["name"]: i for i in client.get("/v1/indexes").json()}
    assert set(listed) == {"faiss_flat", "milvus_hnsw"} and listed["milvus_hnsw"]["count"] == 24
    for query in sorted(synth_data.glob("*/*_0002.png")):
        faiss_hits = _ranking(_search(client, query, "faiss_flat", k="8"))
        assert _ranking(_search(client, query, "milvus_hnsw", k="8")) == faiss_hits


def test_filters_are_the_same_on_both_backends(client, synth_data):
    query = synth_data / "stroma" / "stroma_0003.png"
    own = _search(client, query, "faiss_flat", k="1").json()["results"][0]["group"]
    for filters in ({"labels": ["tumour", "lymphocytes"]}, {"query_group": own},
                    {"labels": "stroma", "exclude_groups": own}, {"exclude_labels": ["stroma", "tumour"]},
                    {"sources": "no such source"}):
        expected = _ranking(_search(client, query, "faiss_flat", k="6", **filters))
        assert _ranking(_search(client, query, "milvus_hnsw", k="6", **filters)) == expected, filters
    body = _search(client, query, "milvus_hnsw", k="6", labels=["tumour"]).json()
    assert body["filter"] == {"labels": ["tumour"]} and {r["label"] for r in body["results"]} == {"tumour"}
    assert_json_error(_search(client, query, "milvus_hnsw", k="6", labels='x"\n'), 422, "control character")


def test_add_and_remove_through_the_api(client, synth_data):
    new = synth_data / "tumour" / "tumour_0001.png"
    added = client.post("/v1/indexes/milvus_hnsw/items", files={"image": ("new.png", new.read_bytes())},
                        data={"label": "added", "group": "new-patient"})
    assert added.status_code == 201, added.text
    new_id = added.json()["id"]
    assert new_id >= 24
    hits = _search(client, new, "milvus_hnsw", k="3", labels="added").json()["results"]
    assert [(h["id"], h["group"]) for h in hits] == [(new_id, "new-patient")]
    assert client.delete(f"/v1/indexes/milvus_hnsw/items/{new_id}").status_code == 200
    assert _search(client, new, "milvus_hnsw", k="3", labels="added").json()["results"] == []
    assert new_id not in [h["id"] for h in _search(client, new, "milvus_hnsw", k="30").json()["results"]]


def test_milvus_outage_is_a_503_and_the_api_recovers(client, synth_data, milvus):
    data, port, running = milvus
    query = synth_data / "lymphocytes" / "lymphocytes_0000.png"
    before = _ranking(_search(client, query, "milvus_hnsw", k="5"))
    milvus_server.stop(running["process"])
    try:
        assert_json_error(_search(client, query, "milvus_hnsw", k="5"), 503, "cannot reach Milvus")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "milvus_hnsw" in ready.text and "faiss_flat" not in ready.text
        assert _ranking(_search(client, query, "faiss_flat", k="5")) == before  # FAISS serves on
    finally:
        running["process"] = milvus_server.start(data, port)
    assert _ranking(_search(client, query, "milvus_hnsw", k="5")) == before
    assert client.get("/readyz").status_code == 200


def test_the_api_follows_a_rebuild_of_a_served_milvus_index(client, indexes, synth_data, triton_server, milvus):
    build_index("tiny", synth_data, indexes / "milvus_hnsw", index_type="ivf_flat", triton_url=triton_server.grpc_url,
                batch=8, backend="milvus", backend_options={"uri": milvus_server.uri(milvus[1])})
    listed = {i["name"]: i for i in client.get("/v1/indexes").json()}
    assert (listed["milvus_hnsw"]["type"], listed["milvus_hnsw"]["count"]) == ("ivf_flat", 24)
    for query in sorted(synth_data.glob("*/*_0005.png")):
        expected = _ranking(_search(client, query, "faiss_flat", k="8", exclude_labels="tumour"))
        assert _ranking(_search(client, query, "milvus_hnsw", k="8", exclude_labels="tumour")) == expected


def test_cli_builds_a_milvus_lite_index_and_searches_it_with_filters(tmp_path, synth_data, triton_server):
    lite = tmp_path / "vectors.db"  # Milvus Lite: embedded, a folder on this machine
    out = build_index("tiny", synth_data, tmp_path / "indexes" / "lite", index_type="ivf_flat",
                      triton_url=triton_server.grpc_url, batch=8, backend="milvus", backend_options={"uri": str(lite)})
    folder = IndexFolder(out)
    info = folder.info()
    folder.close()
    assert (info["backend"], info["index_type"], info["count"]) == ("milvus", "ivf_flat", 24)
    query = synth_data / "tumour" / "tumour_0004.png"
    from server.index.filters import ItemFilter

    answer = search_image_command(out, query, k=4, where=ItemFilter(labels=("stroma",)),
                                  triton_url=triton_server.grpc_url, protocol="grpc")
    assert len(answer["results"]) == 4 and {r["label"] for r in answer["results"]} == {"stroma"}

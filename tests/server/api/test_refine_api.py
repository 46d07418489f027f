"""`/v1/search/refine` over a real uvicorn server, real Triton and a real FAISS index: the
ranking is Rocchio's update of the query by the marked items' stored vectors, with filters;
bad marks are 422 with what to do."""
from __future__ import annotations

import numpy as np
import pytest

from histoseek.imaging import load_model_input
from server.api.app import create_app
from server.embedder import Embedder
from server.index.backends.faiss_backend import stored_vectors
from server.refine import MAX_MARKED, refined_query
from server.search_command import search_image_command
from tests.servers import assert_json_error, served_in_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(indexes_dir, triton_server) -> str:
    with served_in_thread(create_app(indexes_dir, triton_server.grpc_url)) as url:
        yield url


QUERY = "stroma/stroma_0003.png"


def _refine(client, synth_data, relevant=(), not_relevant=(), **fields):
    data = {"k": "10", "relevant": [str(i) for i in relevant], "not_relevant": [str(i) for i in not_relevant],
            **fields}
    return client.post("/v1/search/refine", data=data,
                       files={"image": ("q.png", (synth_data / QUERY).read_bytes(), "image/png")})


def test_refined_ranking_is_rocchio_over_the_stored_vectors(client, synth_data, tissue_index, triton_server):
    first = client.post("/v1/search", data={"k": "10"},
                        files={"image": ("q.png", (synth_data / QUERY).read_bytes(), "image/png")}).json()
    # A user's marks: the stroma results are what they want, the others not.
    relevant = [r["id"] for r in first["results"] if r["label"] == "stroma"]
    not_relevant = [r["id"] for r in first["results"] if r["label"] != "stroma"]
    assert relevant and not_relevant
    response = _refine(client, synth_data, relevant, not_relevant)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["timings_ms"]) == {"marked", "decode", "preprocess", "embed", "search", "total"}

    # The same ranking computed here from the index file and Triton's embedding of the query.
    database = stored_vectors(tissue_index)
    query = Embedder(triton_server.grpc_url, "tiny").embed(load_model_input(synth_data / QUERY, 8)[None])[0]
    vector = refined_query(query, database[relevant], database[not_relevant])
    scores = database @ vector
    expected = np.argsort(-scores, kind="stable")[:10]
    assert [r["id"] for r in body["results"]] == expected.tolist()
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores[expected], atol=1e-4)
    assert [r["id"] for r in body["results"]] != [r["id"] for r in first["results"]], "the marks changed nothing"
    stroma_before = sum(r["label"] == "stroma" for r in first["results"][:5])
    assert sum(r["label"] == "stroma" for r in body["results"][:5]) >= stroma_before


def test_refine_takes_the_search_filters(client, synth_data):
    response = _refine(client, synth_data, relevant=[0], labels=["tumour"], k="3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert {r["label"] for r in body["results"]} == {"tumour"} and len(body["results"]) == 3
    assert body["filter"]["labels"] == ["tumour"]


def test_marks_that_cannot_refine_are_422(client, synth_data):
    cases = [
        ({}, "mark at least one result"),
        ({"relevant": [1, 2], "not_relevant": [2]}, "marked both relevant and not relevant"),
        ({"relevant": list(range(MAX_MARKED + 1))}, f"at most {MAX_MARKED} items"),
        ({"relevant": [3, 9999]}, "holds no item 9999"),
    ]
    for marks, message in cases:
        assert_json_error(_refine(client, synth_data, **marks), 422, message)
    response = client.post("/v1/search/refine", data={"relevant": ["two"]},
                           files={"image": ("q.png", (synth_data / QUERY).read_bytes(), "image/png")})
    assert response.status_code == 422


def test_the_command_line_refines_as_the_api_does(client, synth_data, indexes_dir, triton_server, capsys):
    import json

    from histoseek_cli.main import main

    marks = {"relevant": [1, 4], "not_relevant": [20]}
    api = _refine(client, synth_data, **marks).json()
    cli = search_image_command(indexes_dir / "tissue", synth_data / QUERY, k=10, where=None,
                               triton_url=triton_server.grpc_url, protocol="grpc", **marks)
    assert [r["id"] for r in cli["results"]] == [r["id"] for r in api["results"]]
    main(["search", "image", "--index", str(indexes_dir / "tissue"), "--image", str(synth_data / QUERY),
          "--relevant", "1", "4", "--not-relevant", "20", "--triton-url", triton_server.grpc_url, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in printed["results"]] == [r["id"] for r in api["results"]]


def test_ids_beyond_the_store_range_are_422_not_500(client, synth_data):
    assert_json_error(_refine(client, synth_data, relevant=[2**63]), 422, "whole numbers from 0 to")
    assert_json_error(_refine(client, synth_data, not_relevant=[-1]), 422, "whole numbers from 0 to")

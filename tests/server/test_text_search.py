"""Search by text end to end: a clip checkpoint's two towers exported into one repository, a real
Triton, an index built through it, and `POST /v1/search/text` (with filters, and its refusals),
beside an index whose encoder has no text tower; `histoseek search text` on the same index."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from demo.client import ApiError, SearchClient
from server.api.app import create_app
from server.embedder import ModelNotFound
from server.index.folder import ModelMismatch
from server.text_search import (MAX_TEXT_CHARS, InvalidText, NoTextTower, TextEmbedder, TextSearch, check_text,
                                has_text_family, search_text_command)
from tests.servers import assert_json_error, served_in_thread


@pytest.fixture(scope="module")
def api(text_triton):
    info, indexes = text_triton
    with served_in_thread(create_app(indexes, info.grpc_url)) as url:
        yield url


@pytest.mark.slow
def test_text_search_returns_ranked_results_and_respects_filters(api, text_triton):
    with httpx.Client(base_url=api, timeout=30) as client:
        answer = client.post("/v1/search/text", data={"text": "a histopathology image of tumour cells",
                                                      "index": "clipped", "k": "5"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["index"] == "clipped" and body["k"] == 5 and len(body["results"]) == 5
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-5 for s in scores)
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
        assert set(body["timings_ms"]) == {"tokenize", "embed", "search", "total"}
        assert client.get(body["results"][0]["image_url"]).headers["content-type"] == "image/jpeg"

        # The same filters as /v1/search, applied inside the search: k results whenever k match.
        only = client.post("/v1/search/text", data={"text": "stroma", "index": "clipped", "k": "8",
                                                    "labels": ["stroma", "tumour"], "exclude_labels": "tumour"})
        assert only.status_code == 200, only.text
        assert [r["label"] for r in only.json()["results"]] == ["stroma"] * 8
        assert only.json()["filter"] == {"labels": ["stroma", "tumour"], "exclude_labels": ["tumour"]}

        # What the text model gives is what the API ranks by: its embedding, searched by inner product.
        info, indexes = text_triton
        embedder = TextEmbedder(info.grpc_url, "clip_text")
        spec = embedder.text_spec()
        assert spec["prompts"]["tumour"] == "a histopathology image of tumour cells"
        assert spec["tokenizer"]["kind"] == "clip_bpe" and spec["tokenizer"]["context_length"] == 32
        cli = search_text_command(indexes / "clipped", "  a histopathology image of tumour cells ", k=5, where=None,
                                  triton_url=info.grpc_url, protocol="grpc")
        assert [r["id"] for r in cli["results"]] == [r["id"] for r in body["results"]]
        np.testing.assert_allclose([r["score"] for r in cli["results"]], scores, atol=1e-5)


@pytest.mark.slow
def test_the_trained_prompts_are_listed_and_the_demo_client_searches_with_them(api):
    answer = httpx.get(f"{api}/v1/indexes/clipped/prompts", timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"index": "clipped", "encoder": "clip", "prompts": {
        "lymphocytes": "a histopathology image of lymphocytes", "stroma": "a histopathology image of stroma",
        "tumour": "a histopathology image of tumour cells"}}
    assert_json_error(httpx.get(f"{api}/v1/indexes/plain/prompts", timeout=30), 400, "has no text tower")
    client = SearchClient(api)
    try:
        assert client.text_prompts("clipped")["tumour"] == "a histopathology image of tumour cells"
        found = client.search_text("a histopathology image of stroma", "clipped", 4, labels=["stroma"])
        assert [r["label"] for r in found["results"]] == ["stroma"] * 4
        with pytest.raises(ApiError, match="400: index 'plain''s encoder 'tiny' has no text tower"):
            client.search_text("stroma", "plain", 4)
    finally:
        client.close()


@pytest.mark.slow
def test_an_index_without_a_text_tower_is_refused_with_the_encoders_that_have_one(api):
    with httpx.Client(base_url=api, timeout=30) as client:
        response = client.post("/v1/search/text", data={"text": "tumour", "index": "plain"})
        assert_json_error(response, 400, r"index 'plain''s encoder 'tiny' has no text tower; text search works "
                                         r"with: clip, conch, plip, quiltnet")
        # The image search of that index still works.
        assert client.get("/v1/indexes").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("text, message", [
    ("", "the text is empty"),
    ("   \n ", "the text is empty"),
    ("x" * (MAX_TEXT_CHARS + 1), f"at most {MAX_TEXT_CHARS}"),
    ("cell " * 40, "takes 42 tokens; this text tower reads at most 32"),
    ("tumour\x00cells", "control characters"),
])
def test_bad_texts_get_422(api, text, message):
    response = httpx.post(f"{api}/v1/search/text", data={"text": text, "index": "clipped"}, timeout=30)
    assert_json_error(response, 422, message)


@pytest.mark.slow
def test_a_missing_text_field_and_bad_k_get_422(api):
    assert_json_error(httpx.post(f"{api}/v1/search/text", data={"index": "clipped"}, timeout=30), 422,
                      "the text is empty")
    assert_json_error(httpx.post(f"{api}/v1/search/text", data={"text": "tumour", "index": "clipped", "k": "0"},
                                 timeout=30), 422, "k must be between 1")
    assert_json_error(httpx.post(f"{api}/v1/search/text", data={"text": "tumour", "index": "nope"}, timeout=30),
                      404, "no index named 'nope'")


def test_text_families_name_their_variants():
    assert has_text_family("clip") and has_text_family("quiltnet-b-32") and has_text_family("conch")
    assert not has_text_family("dml") and not has_text_family("clipper") and not has_text_family("tiny")


def test_check_text_trims_and_bounds():
    assert check_text("  tubular adenoma \n") == "tubular adenoma"
    for bad in (None, "", " ", "a" * (MAX_TEXT_CHARS + 1), "bell\x07"):
        with pytest.raises(InvalidText):
            check_text(bad)


def test_an_encoder_with_a_text_tower_that_triton_lacks_says_how_to_export_it(monkeypatch):
    class Folder:
        name, manifest = "crc", {"encoder": "clip", "model_sha256": "abc"}

    class Core:
        folder = Folder()

        class embedder:  # noqa: N801 (a stand-in for the image Embedder's attributes)
            url, protocol, model, timeout = "localhost:1", "grpc", "clip", 1.0

    def missing(self):
        raise ModelNotFound("no model")

    monkeypatch.setattr(TextEmbedder, "text_spec", missing)
    with pytest.raises(NoTextTower, match="has a text tower, but Triton at localhost:1 does not serve 'clip_text'"):
        TextSearch().text_spec(Core())
    monkeypatch.setattr(TextEmbedder, "text_spec", lambda self: {"image_model_sha256": "other"})
    # A text tower exported with another image model than the index's would rank in another space.
    with pytest.raises(ModelMismatch, match="different spaces"):
        TextSearch().text_spec(Core())

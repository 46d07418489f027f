"""Search by text end to end: a clip checkpoint's two towers exported into one repository, a real
Triton, an index built through it, and `POST /v1/search/text` (with filters, and its refusals),
beside an index whose encoder has no text tower; `histoseek search text` on the same index."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from export.export_checkpoint import export_checkpoint
from export.repository import write_model_version
from server import triton
from server.api.app import create_app
from server.embedder import ModelNotFound
from server.index.build import build_index
from server.index.folder import ModelMismatch
from server.text_search import (MAX_TEXT_CHARS, InvalidText, NoTextTower, TextEmbedder, TextSearch, check_text,
                                search_text_command)
from tests.export.test_text_export import tiny_clip_checkpoint
from tests.servers import assert_json_error, distinct_free_ports, served_in_thread

LABELS = ("lymphocytes", "stroma", "tumour")  # synth_data's classes


@pytest.fixture(scope="module")
def text_triton(tmp_path_factory, synth_data, tiny_onnx, served_specs):
    """Triton serving an untrained scratch `clip` (image and text towers) and the contract's `tiny`
    (no text tower), and an index of synth_data by each: (TritonInfo, indexes folder)."""
    work = tmp_path_factory.mktemp("text_search")
    ckpt = tiny_clip_checkpoint(work / "ckpt", synth_data, labels=LABELS, class_names={"tumour": "tumour cells"})
    repo = work / "repo"
    export_checkpoint(ckpt, repo, force=True)  # random weights may embed alike: irrelevant here
    write_model_version(repo, served_specs["tiny"], tiny_onnx)
    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    info = triton.start(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                        run_dir=work / "run")
    try:
        indexes = work / "indexes"
        build_index("clip", synth_data, indexes / "clipped", triton_url=info.grpc_url, batch=8, repo=repo)
        build_index("tiny", synth_data, indexes / "plain", triton_url=info.grpc_url, batch=8, repo=repo)
        yield info, indexes
    finally:
        triton.stop(work / "run")


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

"""Index folders against a real Triton and real FAISS: build, search, add, remove, resume, repair."""
from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from export.repository import model_checksum
from histoseek.errors import HistoseekError
from histoseek.imaging import load_model_input
from server.embedder import Embedder
from server.index.backends.faiss_backend import FAISS_FILE
from server.index.build import add_items, build_index
from server.index.folder import MANIFEST_FILE, IndexFolder, ModelMismatch, UnknownItems, index_info, remove_items
from server.index.types import new_faiss_index
from server.search import SearchCore


def make_tiles(root: Path, classes: int = 3, per_class: int = 30, size: int = 24, seed: int = 0) -> Path:
    """Folder-per-class tiles: a class colour, a tile's own shift of it and a smooth pattern, so
    classes separate and every tile has distinct neighbours (not near-duplicates)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, size)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        base = rng.integers(70, 186, 3)
        for i in range(per_class):
            slope = rng.normal(0, 40, (2, 3))
            pattern = ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
            pixels = base + rng.normal(0, 15, 3) + pattern + rng.normal(0, 10, (size, size, 3))
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"tile_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return make_tiles(tmp_path_factory.mktemp("tiles") / "data")


@pytest.fixture(scope="module")
def grpc_url(triton_server) -> str:
    return triton_server.grpc_url


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiles, grpc_url) -> dict[str, Path]:
    """One index of each type over `tiles`, built once; tests that edit one work on a copy."""
    root = tmp_path_factory.mktemp("indexes")
    return {kind: build_index("tiny", tiles, root / kind, index_type=kind, triton_url=grpc_url, batch=16)
            for kind in ("flat", "hnsw", "ivfpq", "pq")}


@pytest.fixture
def editable(built, tmp_path):
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(built[kind], tmp_path / kind))
    return copy


@pytest.fixture(scope="module")
def tile_embeddings(tiles, grpc_url) -> tuple[list[Path], np.ndarray]:
    """Every tile and its Triton embedding, in build order (sorted class folders, sorted files)."""
    paths = sorted(tiles.glob("*/*.png"))
    embedder = Embedder(grpc_url, "tiny")
    return paths, embedder.embed(np.stack([load_model_input(p, 8) for p in paths]))


@pytest.mark.slow
def test_manifest_and_store(built, tiles, triton_repo):
    manifest = json.loads((built["flat"] / MANIFEST_FILE).read_text())
    assert manifest["encoder"] == "tiny" and manifest["dimension"] == 16 and manifest["input_size"] == 8
    assert manifest["model_sha256"] == model_checksum(triton_repo / "tiny" / "1")
    assert manifest["model_version"] == 1 and manifest["metric"] == "inner_product"
    assert manifest["count"] == 90 and manifest["index_type"] == "flat"
    folder = IndexFolder(built["flat"])
    item = folder.store.lookup([0])[0]
    assert (item.label, Path(item.path)) == ("class0", (tiles / "class0" / "tile_000.png").resolve())
    thumbnail = Image.open(io.BytesIO(folder.store.thumbnail(0)))
    assert thumbnail.format == "JPEG" and thumbnail.size == (24, 24)
    assert not list(built["flat"].parent.glob(".*embedding"))  # resume folder removed when done


@pytest.mark.slow
def test_database_image_finds_itself_first(built, tiles, grpc_url):
    core = SearchCore(IndexFolder(built["flat"]), Embedder(grpc_url, "tiny"))
    outcome = core.search((tiles / "class1" / "tile_007.png").read_bytes(), k=5)
    first = outcome.hits[0]
    assert first.item.path.endswith("class1/tile_007.png") and first.score == pytest.approx(1.0, abs=1e-5)
    assert outcome.vote == ("class1", 1.0)
    assert set(outcome.timings_ms) == {"decode", "preprocess", "embed", "search", "total"}


@pytest.mark.slow
def test_flat_equals_brute_force(built, tile_embeddings):
    _, vectors = tile_embeddings
    hits = IndexFolder(built["flat"]).search(vectors[::9], k=10)
    expected = vectors[::9] @ vectors.T
    for row, found in zip(expected, hits):
        order = np.argsort(-row, kind="stable")[:10]
        assert [h.id for h in found] == order.tolist()
        np.testing.assert_allclose([h.score for h in found], row[order], atol=1e-5)


# The tiny test model maps every tile to nearly the same direction (cosine > 0.9 across
# classes), and 90 items train only 4-bit PQ codes (2 bytes per item for pq): recall is asserted loosely, and
# that it keeps what retrieval needs (the tile itself in its top 10, the exact precision).
@pytest.mark.slow
@pytest.mark.parametrize("kind, min_recall, self_rank, found", [("hnsw", 0.95, 1, 1.0), ("ivfpq", 0.3, 10, 0.6), ("pq", 0.3, 10, 0.5)])
def test_approximate_index_recall_against_flat(built, tile_embeddings, kind, min_recall, self_rank, found):
    paths, vectors = tile_embeddings
    exact = IndexFolder(built["flat"]).search(vectors, k=10)
    approximate = IndexFolder(built[kind]).search(vectors, k=10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approximate, exact)])
    found_self = np.mean([i in [h.id for h in a[:self_rank]] for i, a in enumerate(approximate)])
    precision = {name: np.mean([h.item.label == p.parent.name for p, hits in zip(paths, found) for h in hits])
                 for name, found in (("exact", exact), (kind, approximate))}
    print(f"{kind}: recall@10 against flat {recall:.3f}, self in top {self_rank} {found_self:.3f}, "
          f"P@10 {precision[kind]:.3f} (exact {precision['exact']:.3f})")
    assert recall >= min_recall and found_self >= found and precision[kind] >= precision["exact"] - 0.2


@pytest.fixture
def one_faiss_thread():
    # k-means in OpenMP threads crawls when the test machine's few cores are busy.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("kind, min_recall", [("hnsw", 0.95), ("ivfpq", 0.6), ("pq", 0.5)])
def test_approximate_parameters_on_spread_embeddings(kind, min_recall, one_faiss_thread):
    """What the chosen HNSW/IVFPQ parameters give on clustered 64-d vectors, like a real encoder's."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 64))
    vectors = (centres[rng.integers(0, 30, 1000)] + 0.5 * rng.standard_normal((1000, 64))).astype(np.float32)
    faiss.normalize_L2(vectors)
    index, params = new_faiss_index(kind, 64, vectors)
    index.add_with_ids(vectors, np.arange(1000, dtype=np.int64))
    exact = np.argsort(-(vectors[:200] @ vectors.T), axis=1)[:, :10]
    found = index.search(vectors[:200], 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    print(f"{kind} {params}: recall@10 {recall:.3f}")
    assert recall >= min_recall


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "pq"])
def test_add_then_remove(editable, tmp_path, grpc_url, kind):
    index_dir = editable(kind)
    new = tmp_path / "new.png"
    Image.fromarray(np.full((24, 24, 3), (250, 10, 120), np.uint8)).save(new)

    (new_id,) = add_items(index_dir, [new], label="magenta", triton_url=grpc_url)
    assert new_id == 90
    core = SearchCore(IndexFolder(index_dir), Embedder(grpc_url, "tiny"))
    hits = core.search(new.read_bytes(), k=10).hits
    if kind in ("ivfpq", "pq"):  # PQ codes trained on other colours place an outlier only roughly
        assert new_id in [h.id for h in hits]
    else:
        assert (hits[0].id, hits[0].item.label) == (new_id, "magenta") and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert index_info(index_dir)["count"] == 91

    assert remove_items(index_dir, [new_id, 12345]) == 1
    folder = IndexFolder(index_dir)
    assert new_id not in [h.id for h in SearchCore(folder, Embedder(grpc_url, "tiny")).search(new.read_bytes(), 10).hits]
    assert folder.store.thumbnail(new_id) is None
    info = index_info(index_dir)
    assert info["count"] == 90 and info["tombstones"] == (1 if kind == "hnsw" else 0)
    # Removed ids are never handed out again.
    assert add_items(index_dir, [new], label="magenta", triton_url=grpc_url) == [91]


@pytest.mark.slow
def test_add_dataset_folder_and_edits_seen_by_an_open_reader(editable, tiles, grpc_url, tile_embeddings):
    index_dir = editable("flat")
    reader = IndexFolder(index_dir)  # e.g. the API, while the CLI edits the folder
    _, vectors = tile_embeddings
    ids = add_items(index_dir, tiles, triton_url=grpc_url)
    assert ids == list(range(90, 180))
    assert {h.id for h in reader.search(vectors[:1], k=2)[0]} == {0, 90}  # the tile and its copy
    remove_items(index_dir, list(range(90, 180)))
    assert [h.id for h in reader.search(vectors[:1], k=2)[0]][0] == 0 and len(reader.search(vectors[:1], 200)[0]) == 90


@pytest.mark.slow
def test_concurrent_writers_take_turns(editable):
    """Two handles on one folder (like the API and the CLI) adding at once: no id is lost or doubled."""
    index_dir = editable("flat")
    handles = [IndexFolder(index_dir), IndexFolder(index_dir)]
    vectors = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    item = IndexFolder(index_dir).store.lookup([0])[0]
    added: list[int] = []

    def add_five(folder: IndexFolder) -> None:
        for _ in range(5):
            added.extend(folder.add(vectors, [item], [b"jpeg"]))

    threads = [threading.Thread(target=add_five, args=(handle,)) for handle in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(added) == list(range(90, 100))
    assert index_info(index_dir)["count"] == 100 and index_info(index_dir)["vectors"] == 100


@pytest.mark.slow
def test_single_images_need_a_label_and_must_exist(built, tiles, grpc_url):
    with pytest.raises(HistoseekError, match="need a label"):
        add_items(built["flat"], [tiles / "class0" / "tile_000.png"], triton_url=grpc_url)
    with pytest.raises(HistoseekError, match="missing or not image files .*nowhere.png"):
        add_items(built["flat"], [tiles / "nowhere.png"], label="x", triton_url=grpc_url)


def test_build_never_replaces_a_folder_that_is_not_an_index(tmp_path):
    data = make_tiles(tmp_path / "data", classes=1, per_class=2)
    (tmp_path / "indexes" / "other").mkdir(parents=True)
    with pytest.raises(HistoseekError, match="not an index folder.*indexes/<name>"):
        build_index("tiny", data, tmp_path / "indexes", triton_url="localhost:1")
    with pytest.raises(HistoseekError, match="outside the dataset folder"):
        build_index("tiny", data, data / "index", triton_url="localhost:1")
    assert (tmp_path / "indexes" / "other").is_dir()


@pytest.mark.slow
def test_interrupted_build_resumes_and_equals_an_uninterrupted_one(tmp_path, tiles, grpc_url, built, monkeypatch):
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real_embed = Embedder.embed

    def embed_then_crash(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # like Ctrl-C during the third batch
        return real_embed(self, images)

    monkeypatch.setattr(Embedder, "embed", embed_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_index("tiny", tiles, out, triton_url=grpc_url, batch=16)
    assert not out.exists()
    assert len(list((tmp_path / ".resumed.embedding").glob("batch_*.npz"))) == 2

    calls["n"] = 10  # no more crashes; count the batches embedded on the rerun
    build_index("tiny", tiles, out, triton_url=grpc_url, batch=16)
    assert calls["n"] == 10 + 4  # 90 tiles in 6 batches of 16, 2 of them reused

    fresh = faiss.read_index(str(built["flat"] / FAISS_FILE))
    resumed = faiss.read_index(str(out / FAISS_FILE))
    np.testing.assert_array_equal(faiss.vector_to_array(fresh.id_map), faiss.vector_to_array(resumed.id_map))
    np.testing.assert_allclose(fresh.index.reconstruct_n(0, 90), resumed.index.reconstruct_n(0, 90), atol=1e-6)
    assert IndexFolder(out).store.lookup(range(90)) == IndexFolder(built["flat"]).store.lookup(range(90))
    assert not (tmp_path / ".resumed.embedding").exists()


@pytest.mark.slow
def test_checksum_and_dimension_mismatch_are_refused(editable, tiles, grpc_url, triton_repo):
    index_dir = editable("flat")
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())
    (index_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "model_sha256": "0" * 64}))
    core = SearchCore(IndexFolder(index_dir), Embedder(grpc_url, "tiny"))
    served = model_checksum(triton_repo / "tiny" / "1")
    with pytest.raises(ModelMismatch, match=f"sha256 0{{64}}, but Triton serves 'tiny' with sha256 {served}.*rebuild"):
        core.search((tiles / "class0" / "tile_000.png").read_bytes(), k=3)
    with pytest.raises(ModelMismatch, match="sha256"):
        add_items(index_dir, [tiles / "class0" / "tile_000.png"], label="x", triton_url=grpc_url)

    (index_dir / MANIFEST_FILE).write_text(json.dumps({**manifest, "dimension": 32}))
    with pytest.raises(ModelMismatch, match="32-dimensional .* returns 16-dimensional"):
        SearchCore(IndexFolder(index_dir), Embedder(grpc_url, "tiny")).verify_model()


@pytest.mark.slow
def test_crash_between_the_two_writes_is_repaired_at_load(editable):
    index_dir = editable("flat")
    index = faiss.read_index(str(index_dir / FAISS_FILE))
    # A crashed add: its vector reached index.faiss, its row never reached the store.
    index.add_with_ids(np.ones((1, 16), np.float32) / 4, np.array([500], np.int64))
    # Tampering the other way: a row whose vector is gone.
    index.remove_ids(np.array([3], np.int64))
    faiss.write_index(index, str(index_dir / FAISS_FILE))

    folder = IndexFolder(index_dir)

    repaired = faiss.read_index(str(index_dir / FAISS_FILE))
    assert 500 not in faiss.vector_to_array(repaired.id_map) and repaired.ntotal == 89
    assert folder.store.count() == 89 and 3 not in folder.store.lookup([3])
    assert folder.store.next_id() == 501  # the crashed add's id is never handed out again


@pytest.mark.slow
def test_hnsw_orphans_stay_as_tombstones_and_ids_move_past_them(editable, grpc_url, tiles):
    index_dir = editable("hnsw")
    index = faiss.read_index(str(index_dir / FAISS_FILE))
    index.add_with_ids(np.ones((1, 16), np.float32) / 4, np.array([90], np.int64))  # a crashed add
    faiss.write_index(index, str(index_dir / FAISS_FILE))
    folder = IndexFolder(index_dir)
    assert all(h.id != 90 for h in folder.search(np.ones((1, 16), np.float32) / 4, k=5)[0])
    assert add_items(index_dir, [tiles / "class0" / "tile_000.png"], label="x", triton_url=grpc_url) == [91]


@pytest.mark.slow
def test_info(built):
    info = index_info(built["ivfpq"])
    assert info["index_type"] == "ivfpq" and info["count"] == 90 and info["tombstones"] == 0
    assert set(info["index_params"]) == {"nlist", "M", "nbits", "nprobe"}
    # PQ codes (4 bytes here) + id take far less than the flat index's 16 floats + id.
    assert info["index_bytes_per_item"] < index_info(built["flat"])["index_bytes_per_item"]
    # 4 sub-quantizers of 4 bits: 2 bytes of codes per item, against 16 floats (64 bytes) for flat.
    pq = index_info(built["pq"])
    assert (pq["index_params"]["M"], pq["index_params"]["nbits"], pq["code_bytes_per_item"]) == (4, 4, 2)
    assert index_info(built["flat"])["code_bytes_per_item"] == 4 * 16
    assert info["size_on_disk_bytes"] > 0


@pytest.mark.slow
def test_ivfpq_needs_enough_items_and_unknown_types_are_named(tmp_path, grpc_url):
    small = make_tiles(tmp_path / "small", classes=2, per_class=5)
    with pytest.raises(HistoseekError, match="at least 64 items.*flat index"):
        build_index("tiny", small, tmp_path / "idx", index_type="ivfpq", triton_url=grpc_url)
    with pytest.raises(HistoseekError, match="flat, hnsw, ivfpq"):
        build_index("tiny", small, tmp_path / "idx", index_type="lsh", triton_url=grpc_url)


def test_not_an_index_folder(tmp_path):
    with pytest.raises(HistoseekError, match="not an index folder.*index build"):
        IndexFolder(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "pq"])
def test_stored_vectors_by_id(built, tile_embeddings, kind):
    """What refinement reads: each id's vector (decoded codes for the PQ types), unknown ids named."""
    folder = IndexFolder(built[kind])
    ids = [5, 0, 89, 5]
    vectors = folder.vectors(ids)
    expected = tile_embeddings[1][ids]
    assert vectors.shape == expected.shape and vectors.dtype == np.float32
    cosine = np.sum(vectors * expected, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > (0.9999 if kind in ("flat", "hnsw") else 0.8), cosine
    with pytest.raises(UnknownItems, match="holds no item 90, 1000"):
        folder.vectors([1, 90, 1000])

"""The Milvus backend on a real Milvus Lite (embedded, and as a server process): random unit
vectors and items, no Triton. Approximate indexes are checked against an exact numpy search."""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histoseek.atomic import staged_directory
from histoseek.errors import HistoseekError
from server.index.backends import backend_class, milvus_backend
from server.index.backends.base import BackendUnavailable
from server.index.backends.milvus_backend import MilvusBackend
from server.index.backends.milvus_connection import Target
from server.index.filters import ItemFilter
from server.index.store import Item
from server.triton import free_port
from tests import milvus_server

REPO = Path(__file__).resolve().parents[3]
DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def collection(n: int, dim: int = DIM, clusters: int = 8, seed: int = 0,
               draws: int | None = None) -> tuple[np.ndarray, list[Item]]:
    """Clustered unit vectors (as embeddings of labelled tiles are) and items whose label is
    their cluster, in groups of 10 and three sources. `draws`: other vectors around the
    same cluster centres (queries)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    rng = rng if draws is None else np.random.default_rng(draws)
    cluster = rng.integers(0, clusters, n)
    vectors = unit(centers[cluster] + 0.7 * rng.standard_normal((n, dim)))
    items = [Item(i, f"/tiles/{i}.png", f"class{cluster[i]}", f"slide{i // 10}", source=f"site{i % 3}")
             for i in range(n)]
    return vectors, items


def exact(vectors: np.ndarray, items: list[Item], queries: np.ndarray, k: int,
          where: ItemFilter | None) -> tuple[np.ndarray, np.ndarray]:
    """Numpy's top k among the items `where` admits: (scores, ids), padded with -1."""
    allowed = np.array([i for i, item in enumerate(items)
                        if where is None or where.matches(item.label, item.group, item.source)], np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    if len(allowed):
        sims = queries @ vectors[allowed].T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores[:, :order.shape[1]] = np.take_along_axis(sims, order, axis=1)
        ids[:, :order.shape[1]] = allowed[order]
    return scores, ids


def build(root: Path, name: str, vectors: np.ndarray, items: list[Item], index_type: str = "flat",
          **options) -> tuple[Path, dict]:
    """An index folder's Milvus part, written in a staging folder then renamed as a build does."""
    staging = root / f".{name}.staging.x1y2"
    staging.mkdir(parents=True)
    manifest = {"index_type": index_type, "dimension": vectors.shape[1], "index_params": options.pop("params", {})}
    manifest.update(MilvusBackend.create(staging, manifest, vectors, items, options))
    final = root / name
    staging.rename(final)
    (final / "manifest.json").write_text(json.dumps(manifest))
    return final, manifest


@pytest.fixture
def opened():
    """Open backends, closed after the test (a Lite database stays locked while open)."""
    backends = []

    def open_(folder: Path, manifest: dict) -> MilvusBackend:
        backend = MilvusBackend.open(folder, manifest, None)
        backends.append(backend)
        return backend

    yield open_
    for backend in backends:
        backend.close()


def test_create_and_open_round_trip(tmp_path, opened, monkeypatch):
    # Small messages and pages: inserts, searches, listings and deletes go in several parts.
    monkeypatch.setattr(milvus_backend, "MESSAGE_BYTES", 70 * (4 * DIM + 4 * milvus_backend.TEXT_BYTES))
    monkeypatch.setattr(milvus_backend, "PAGE", 64)
    vectors, items = collection(300)
    folder, manifest = build(tmp_path, "crc", vectors, items)
    section = manifest["milvus"]
    assert manifest["backend"] == "milvus" and backend_class("milvus") is MilvusBackend
    assert section["uri"] == "milvus.db" and (folder / "milvus.db").is_dir()  # inside the folder, relative
    assert section["collection"].startswith("histoseek_crc_b") and section["owner"] == str(folder)
    assert section["index_type"] == "FLAT" and manifest["index_params"] == {}
    backend = opened(folder, manifest)
    backend.check_available()
    assert np.array_equal(backend.held_ids(), np.arange(300))
    assert backend.first_free_id(0) == 300 and backend.first_free_id(400) == 400 and not backend.needs_repair(np.arange(300))
    info = backend.info()
    assert info["vectors"] == 300 and info["tombstones"] == 0 and info["code_bytes_per_item"] == 4 * DIM
    assert info["index_bytes_per_item"] > 4 * DIM and info["collection"] == section["collection"]
    assert info["uri"] == str(folder / "milvus.db")
    # Milvus's IP "distance" is the inner product itself: an item finds itself first, at 1.
    scores, ids = backend.search(vectors[:5], 3, [None] * 5)
    assert np.array_equal(ids[:, 0], np.arange(5))
    expected, _ = exact(vectors, items, vectors[:5], 3, None)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    _, ids = backend.search(vectors, 1, [None] * 300)
    assert np.array_equal(ids[:, 0], np.arange(300))
    backend.remove(np.arange(0, 300, 2))
    assert np.array_equal(backend.held_ids(), np.arange(1, 300, 2))
    assert backend.first_free_id(0) == 300  # 150 ids, more than a page: found by bisection
    backend.remove(np.arange(101, 300, 2))
    assert backend.first_free_id(0) == 100  # 50 ids, a page: listed


FILTERS = [
    None,
    ItemFilter(labels=("class2",)),
    ItemFilter(labels=("class1", "class5"), exclude_sources=("site0",)),
    ItemFilter(groups=("slide3", "slide7", "slide12")),  # 30 items: fewer than k=40
    ItemFilter(exclude_groups=tuple(f"slide{i}" for i in range(0, 40, 2))),
    ItemFilter(sources=("site1",), exclude_labels=("class0", "class3")),
    ItemFilter(labels=("class4",), groups=("slide2",)),  # a handful, or none
    ItemFilter(labels=("no such class",)),  # nothing
]


def test_flat_search_is_exact_with_filters(tmp_path, opened):
    vectors, items = collection(400)
    backend = opened(*build(tmp_path, "crc", vectors, items))
    queries = unit(np.random.default_rng(1).standard_normal((6, DIM)))
    k = 40
    for where in FILTERS:
        scores, ids = backend.search(queries, k, [where] * len(queries))
        want_scores, want_ids = exact(vectors, items, queries, k, where)
        assert np.array_equal(ids, want_ids), where
        np.testing.assert_allclose(scores[ids >= 0], want_scores[want_ids >= 0], atol=1e-5)
        assert np.all(scores[ids < 0] == -np.inf)
    # One filter per query in one call: each query gets exactly its own filter's results.
    mixed = [FILTERS[i % len(FILTERS)] for i in range(len(queries) * 2)]
    twice = np.concatenate([queries, queries])
    _, ids = backend.search(twice, k, mixed)
    for row, where in enumerate(mixed):
        assert np.array_equal(ids[row], exact(vectors, items, twice[row:row + 1], k, where)[1][0])


@pytest.mark.parametrize("index_type", ["hnsw", "ivf_flat", "ivf_sq8"])
def test_approximate_recall_and_filtered_k(tmp_path, opened, monkeypatch, index_type):
    vectors, items = collection(3000, dim=64, clusters=20)
    folder, manifest = build(tmp_path, "big", vectors, items, index_type)
    backend = opened(folder, manifest)
    chosen = manifest["index_params"]
    if index_type == "hnsw":
        assert chosen == {"M": 32, "ef_search": 64} and manifest["milvus"]["build_params"]["efConstruction"] == 80
    else:
        assert chosen == {"nlist": 76, "nprobe": 9} and manifest["milvus"]["build_params"] == {"nlist": 76}
    queries = collection(100, dim=64, clusters=20, draws=99)[0]
    _, ids = backend.search(queries, 10, [None] * 100)
    _, want = exact(vectors, items, queries, 10, None)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    assert recall >= 0.9, recall
    # Filters admitting a few items of a far cluster: the probed lists or the graph's beam
    # reach too few of them. Still k results whenever k are allowed: IVF searches every list;
    # HNSW scores the few allowed items exactly (exactly the true top k), or, when they are
    # too many to fetch (here: none may be fetched), searches with a beam as wide as the collection.
    filters = (ItemFilter(labels=("class3",), sources=("site2",)), ItemFilter(groups=("slide5", "slide250")))
    for fetch_limit in ((milvus_backend.EXACT_BYTES, 0) if index_type == "hnsw" else (milvus_backend.EXACT_BYTES,)):
        monkeypatch.setattr(milvus_backend, "EXACT_BYTES", fetch_limit)
        for where in filters:
            allowed = sum(where.matches(i.label, i.group, i.source) for i in items)
            scores, ids = backend.search(queries[:20], 25, [where] * 20)
            assert np.all((ids >= 0).sum(axis=1) == min(25, allowed))
            assert all(where.matches(items[i].label, items[i].group, items[i].source) for i in ids[ids >= 0])
            if index_type == "hnsw" and fetch_limit:
                want_scores, want_ids = exact(vectors, items, queries[:20], 25, where)
                assert np.array_equal(ids, want_ids)
                np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_add_remove(tmp_path, opened):
    vectors, items = collection(200)
    backend = opened(*build(tmp_path, "crc", vectors, items, "hnsw"))
    more, new = collection(20, seed=5)
    new = [replace(item, id=500 + n, label="added") for n, item in enumerate(new)]
    backend.add(more, new)
    assert backend.first_free_id(0) == 520 and backend.info()["vectors"] == 220
    _, ids = backend.search(more[:3], 1, [None] * 3)
    assert ids[:, 0].tolist() == [500, 501, 502]
    _, ids = backend.search(vectors[:2], 30, [ItemFilter(labels=("added",))] * 2)
    assert sorted(ids[0][ids[0] >= 0].tolist()) == list(range(500, 520))
    backend.remove(np.array([500, 501, 0, 99_999]))  # an id without a vector is ignored
    assert backend.info()["vectors"] == 217
    held = backend.held_ids()
    assert 500 not in held and 0 not in held and 502 in held
    _, ids = backend.search(np.concatenate([more[:2], vectors[:1]]), 10, [None] * 3)
    assert not set(ids.ravel().tolist()) & {0, 500, 501}


def test_repair_removes_orphans_and_reports_lost_rows(tmp_path, opened):
    vectors, items = collection(100)
    backend = opened(*build(tmp_path, "crc", vectors, items, "ivf_flat"))
    rows = np.concatenate([np.arange(10, 100), [150, 151]])  # 0-9: vectors without a row; 150, 151: rows without
    assert backend.needs_repair(rows)
    lost = backend.repair(rows)
    assert lost.tolist() == [150, 151]
    assert np.array_equal(backend.held_ids(), np.arange(10, 100))
    assert not backend.needs_repair(np.arange(10, 100))
    _, ids = backend.search(vectors[:10], 5, [None] * 10)
    assert ids.min() >= 10


HOSTILE = ['" or id > 0 or label == "', 'quote"inside', "single'quote", "back\\slash", "trailing\\",
           '\\" or 1==1 or \\"', "日本語 ラベル", "emoji 🔬", "] or label in [", "a\\u0041", "${x}", "{label}"]


def test_hostile_filter_values_match_literally(tmp_path, opened):
    vectors, items = collection(len(HOSTILE) * 6)
    items = [replace(item, label=HOSTILE[i % len(HOSTILE)], group=HOSTILE[(i + 1) % len(HOSTILE)],
                     source=HOSTILE[(i + 2) % len(HOSTILE)]) for i, item in enumerate(items)]
    backend = opened(*build(tmp_path, "crc", vectors, items))
    query, k = vectors[:1], len(items)
    for value in HOSTILE:
        for where in (ItemFilter(labels=(value,)), ItemFilter(groups=(value,)), ItemFilter(sources=(value,)),
                      ItemFilter(exclude_labels=(value,)), ItemFilter(labels=(value, "plain"), exclude_groups=(value,))):
            _, ids = backend.search(query, k, [where])
            assert np.array_equal(ids, exact(vectors, items, query, k, where)[1]), (value, where)
    # Values that match nothing never widen the results.
    for value in ('" or 1 == 1 or label == "', "back\\\\slash", "日本語", "${x", "A"):
        _, ids = backend.search(query, k, [ItemFilter(labels=(value,))])
        assert (ids < 0).all(), value


def test_second_process_gets_the_lock_message(tmp_path, opened):
    vectors, items = collection(50)
    folder, manifest = build(tmp_path, "crc", vectors, items)
    backend = opened(folder, manifest)
    backend.check_available()  # this process now holds the Lite database
    script = ("import json, sys\nfrom pathlib import Path\nfrom server.index.backends.milvus_backend import MilvusBackend\n"
              "folder = Path(sys.argv[1])\n"
              "backend = MilvusBackend.open(folder, json.loads((folder / 'manifest.json').read_text()), None)\n"
              "try:\n    backend.check_available()\n    print('OPENED', backend.info()['vectors'])\n"
              "except Exception as exc:\n    print(type(exc).__name__, exc)\nbackend.close()\n")

    def other_process() -> str:
        done = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    out = other_process()
    assert out.startswith("BackendUnavailable") and "is open in another process (the API?)" in out, out
    assert "add and remove items through the API while it serves, or run a Milvus server" in out
    backend.close()  # releases the database: the other process can open it now
    assert other_process() == "OPENED 50"
    backend.check_available()  # and this one reopens it on its next call


def test_unavailable_then_recovers_without_reopening(tmp_path, opened, monkeypatch):
    port = free_port()
    data = tmp_path / "milvus-data"
    server = milvus_server.start(data, port)
    try:
        vectors, items = collection(200)
        # Credentials in the URI are used, never written (Milvus Lite's server ignores them).
        monkeypatch.delenv("MILVUS_TOKEN", raising=False)
        folder, manifest = build(tmp_path, "crc", vectors, items, "hnsw",
                                 uri=f"http://root:s3cret@127.0.0.1:{port}/?token=abc")
        assert manifest["milvus"]["uri"] == milvus_server.uri(port)
        assert "s3cret" not in json.dumps(manifest) and "abc" not in json.dumps(manifest)
        backend = opened(folder, manifest)
        before = backend.search(vectors[:4], 5, [None, ItemFilter(labels=("class1",)), None, None])
        milvus_server.stop(server)
        for call in (backend.check_available, lambda: backend.search(vectors[:4], 5, [None] * 4),
                     backend.held_ids, backend.info):
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match=r"cannot reach Milvus at http://127\.0\.0\.1:\d+ .*"
                                                         r"start it or fix --milvus-uri"):
                call()
            assert time.monotonic() - started < 60  # bounded by the client's timeouts, not hung
        server = milvus_server.start(data, port)
        backend.check_available()
        after = backend.search(vectors[:4], 5, [None, ItemFilter(labels=("class1",)), None, None])
        assert np.array_equal(after[1], before[1])
        backend.add(vectors[:1], [replace(items[0], id=1000)])
        assert backend.info()["vectors"] == 201
    finally:
        milvus_server.stop(server)
    # Nothing answers at all: reported at the first call, not at opening.
    lonely = MilvusBackend.open(folder, {**manifest, "milvus": {**manifest["milvus"], "uri": milvus_server.uri(
        free_port())}}, None)
    with pytest.raises(BackendUnavailable, match="start it or fix --milvus-uri"):
        lonely.check_available()
    lonely.close()


def test_rebuild_never_destroys_the_old_index(tmp_path, opened, monkeypatch):
    """A database shared by several indexes (here a Lite path outside the folders)."""
    shared = str(tmp_path / "shared.db")
    vectors, items = collection(120)
    folder, first = build(tmp_path, "crc", vectors, items, uri=shared)
    assert first["milvus"]["uri"] == shared
    old = first["milvus"]["collection"]
    # A rebuild that fails half-way leaves the old folder and its collection as they were.
    monkeypatch.setattr(MilvusBackend, "add", lambda self, v, i: (_ for _ in ()).throw(HistoseekError("boom")))
    staging = tmp_path / ".crc.staging.q1"
    staging.mkdir()
    with pytest.raises(HistoseekError, match="boom"):
        MilvusBackend.create(staging, {"index_type": "flat", "dimension": DIM}, vectors, items, {"uri": shared})
    monkeypatch.undo()
    backend = opened(folder, first)
    assert backend.info()["vectors"] == 120
    names = backend._connection.client().list_collections()
    assert names == [old]  # the failed build dropped its own collection
    backend.close()
    # A successful rebuild (written where the caller names the final folder): the old
    # collection stays until the new folder is opened.
    staging = tmp_path / "work-in-progress"
    staging.mkdir()
    second = {"index_type": "flat", "dimension": DIM}
    second.update(MilvusBackend.create(staging, second, vectors[:60], items[:60], {"uri": shared, "index_name": "crc"}))
    assert second["milvus"]["owner"] == str(folder) and second["milvus"]["collection"] > old
    assert opened(folder, first).info()["vectors"] == 120  # the old folder still searches
    renewed = opened(folder, second)
    assert renewed.info()["vectors"] == 60
    assert renewed._connection.client().list_collections() == [second["milvus"]["collection"]]
    # A moved index folder is still the same index: rebuilt where it now is, it replaces its collection.
    (folder / "manifest.json").write_text(json.dumps(second))
    moved = folder.rename(tmp_path / "crc-moved")
    staging = tmp_path / ".crc-moved.staging.q4"
    staging.mkdir()
    third = {"index_type": "flat", "dimension": DIM}
    third.update(MilvusBackend.create(staging, third, vectors[:10], items[:10], {"uri": shared}))
    assert third["milvus"]["owner"] == str(folder) and third["milvus"]["collection"].startswith("histoseek_crc_b")
    shutil.rmtree(moved)
    staging.rename(moved)
    assert opened(moved, third).info()["vectors"] == 10
    assert renewed._connection.client().list_collections() == [third["milvus"]["collection"]]
    # Another index may not take this index's collection name.
    staging = tmp_path / ".other.staging.q3"
    staging.mkdir()
    with pytest.raises(HistoseekError, match="already holds collection histoseek_crc_b.* give this index another "
                                             "collection name"):
        MilvusBackend.create(staging, {"index_type": "flat", "dimension": DIM}, vectors, items,
                             {"uri": shared, "collection": "histoseek_crc"})


def test_rebuilt_folder_opens_while_the_old_one_is_open(tmp_path, opened):
    """A Lite database inside the folder is replaced with it: a process that still has the
    old folder open (the API) opens the new one at the same path beside it."""
    vectors, items = collection(80)
    out = tmp_path / "crc"
    manifests = []
    for count in (80, 30):
        with staged_directory(out) as folder:
            manifest = {"index_type": "flat", "dimension": DIM}
            manifest.update(MilvusBackend.create(folder, manifest, vectors[:count], items[:count], {}))
            manifests.append(manifest)
        if count == 80:
            old = opened(out, manifest)
            assert old.info()["vectors"] == 80
    new = opened(out, manifests[1])
    assert new.info()["vectors"] == 30 and new.collection != old.collection
    with open(out / "milvus.db" / "LOCK", "a") as lock:  # the new database is held, as the old one was
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    old.close()
    _, ids = new.search(vectors[:3], 1, [None] * 3)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_refusals(tmp_path):
    vectors, items = collection(10)
    staging = tmp_path / ".crc.staging.z"
    staging.mkdir()

    def create(index_type="flat", manifest_params=None, **options):
        MilvusBackend.create(staging, {"index_type": index_type, "dimension": DIM, "index_params": manifest_params},
                             vectors, items, options)

    with pytest.raises(HistoseekError, match=r"--backend faiss --type pq"):
        create("pq", codebooks=np.zeros((4, 16, 8), np.float32))
    with pytest.raises(HistoseekError, match=r"--backend faiss --type pq"):
        create("pq")
    for cluster_only in ("ivf_pq", "diskann", "gpu_cagra"):
        with pytest.raises(HistoseekError, match=f"index type {cluster_only} needs a Milvus server"):
            create(cluster_only)
    with pytest.raises(HistoseekError, match="no index type 'ivfpq'; Milvus calls it ivf_pq"):
        create("ivfpq")
    with pytest.raises(HistoseekError, match=r"unknown index parameters \['efc'\]"):
        create("hnsw", {"efc": 3})
    with pytest.raises(HistoseekError, match="nlist do not apply to a milvus hnsw index"):
        create("hnsw", {"nlist": 3})
    with pytest.raises(HistoseekError, match="neither a server URI"):
        create(uri=str(tmp_path / "milvus.sqlite"))
    with pytest.raises(HistoseekError, match="has scheme 'ftp'"):
        create(uri="ftp://host:19530")
    with pytest.raises(HistoseekError, match="must start with a letter"):
        create(collection="1-bad name")
    assert not (staging / "milvus.db").exists() or not any((staging / "milvus.db" / "collections").glob("*"))


def test_uri_keeps_no_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("MILVUS_TOKEN", raising=False)
    target = Target.parse("https://user:pa%40ss@milvus.example.org:19530/histo/?token=t#x", tmp_path)
    assert target.public == "https://milvus.example.org:19530/histo" and not target.lite
    assert target.token == "user:pa@ss"
    monkeypatch.setenv("MILVUS_TOKEN", "from-env")
    assert Target.parse("http://user:pw@[::1]:19530", tmp_path) == Target(
        "http://[::1]:19530", "http://[::1]:19530", "from-env", False)
    lite = Target.parse("sub/x.db", tmp_path)
    assert lite.lite and lite.public == str(tmp_path / "sub" / "x.db") and lite.token == ""


def test_vectors_by_id(tmp_path, opened):
    vectors, items = collection(50)
    folder, manifest = build(tmp_path, "crc", vectors, items)
    backend = opened(folder, manifest)
    np.testing.assert_allclose(backend.vectors([7, 0, 49, 7]), vectors[[7, 0, 49, 7]], atol=1e-6)
    assert backend.vectors([]).shape == (0, DIM)
    with pytest.raises(KeyError) as missing:
        backend.vectors([3, 50, 99])
    assert missing.value.args[0] == [50, 99]

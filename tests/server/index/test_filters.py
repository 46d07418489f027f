"""Metadata filters applied inside the FAISS search: exactly the matching items, in rank order,
k of them whenever k match (checked against an exact search over the filtered set)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.index.build import write_index_folder
from server.index.fields import InvalidField
from server.index.filters import MAX_VALUES, ItemFilter, from_lists, milvus_expression
from server.index.folder import IndexFolder
from server.index.store import Item

DIM, LABELS, GROUPS, SOURCES = 16, ("tumour", "stroma", "mucosa", "debris"), 40, ("bach", "crc", "bracs")


def collection(n: int = 800, seed: int = 0) -> tuple[np.ndarray, list[Item]]:
    """Clustered unit vectors (one cluster per label) and their items: group = slide, 20 tiles each."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(LABELS), size=n)
    centres = rng.normal(size=(len(LABELS), DIM))
    vectors = (centres[labels] + rng.normal(scale=0.8, size=(n, DIM))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [Item(i, f"tile_{i}.png", LABELS[labels[i]], f"slide-{i % GROUPS}", source=SOURCES[i % 3])
             for i in range(n)]
    return vectors, items


def write_folder(path: Path, vectors: np.ndarray, items: list[Item], index_type: str, params: dict | None = None):
    manifest = {"format": 1, "encoder": "tiny", "model_sha256": "0" * 64, "dimension": DIM, "metric": "inner_product",
                "backend": "faiss", "index_type": index_type, "index_params": params or {}}
    write_index_folder(path, manifest, vectors, items, [b"jpeg"] * len(items))
    return IndexFolder(path)


def exact(vectors: np.ndarray, items: list[Item], query: np.ndarray, k: int, where: ItemFilter | None) -> list[int]:
    allowed = [i.id for i in items if where is None or where.matches(i.label, i.group, i.source)]
    scores = vectors[allowed] @ query
    return [allowed[j] for j in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[Item]]:
    return collection()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data) -> dict[str, IndexFolder]:
    root = tmp_path_factory.mktemp("filtered")
    vectors, items = data
    return {kind: write_folder(root / kind, vectors, items, kind) for kind in ("flat", "hnsw", "ivfpq", "pq")}


FILTERS = {
    "one label": ItemFilter(labels=("stroma",)),
    "two labels, one source": ItemFilter(labels=("stroma", "debris"), sources=("crc",)),
    "not two labels": ItemFilter(exclude_labels=("tumour", "mucosa")),
    "one slide (2.5 %)": ItemFilter(groups=("slide-7",)),
    "not the query's slide": ItemFilter(exclude_groups=("slide-3",)),
    "everything but two slides of one label": ItemFilter(labels=("tumour",), exclude_groups=("slide-1", "slide-2")),
    "no source matches": ItemFilter(sources=("tcga",)),
}


@pytest.mark.parametrize("name", FILTERS)
def test_flat_filters_return_exactly_the_matching_items_in_rank_order(folders, data, name):
    vectors, items = data
    where = FILTERS[name]
    for query in vectors[::97]:
        hits = folders["flat"].search(query[None], k=25, where=where)[0]
        expected = exact(vectors, items, query, 25, where)
        assert [h.id for h in hits] == expected
        assert all(where.matches(h.item.label, h.item.group, h.item.source) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq", "pq"])
@pytest.mark.parametrize("name", FILTERS)
def test_approximate_indexes_return_k_matching_items_whenever_k_match(folders, data, kind, name):
    vectors, items = data
    where = FILTERS[name]
    matching = sum(where.matches(i.label, i.group, i.source) for i in items)
    overlap = []
    for query in vectors[::97]:
        hits = folders[kind].search(query[None], k=25, where=where)[0]
        assert len(hits) == min(25, matching), (kind, name)  # never fewer because of the filter
        assert all(where.matches(h.item.label, h.item.group, h.item.source) for h in hits)
        assert len({h.id for h in hits}) == len(hits)
        expected = exact(vectors, items, query, 25, where)
        overlap.append(len({h.id for h in hits} & set(expected)) / len(expected) if expected else 1.0)
    # Restricted to few items the search is exact (hnsw) or exact in code space (pq's codes).
    floor = {"hnsw": 0.9, "ivfpq": 0.5, "pq": 0.5}[kind]
    assert np.mean(overlap) >= floor, (kind, name, np.mean(overlap))


def test_hnsw_graph_search_with_a_selector_keeps_recall(folders, data, monkeypatch):
    """Above HNSW_EXACT_MAX_ITEMS allowed items the graph itself is searched with the selector."""
    from server.index.backends import faiss_backend

    monkeypatch.setattr(faiss_backend, "HNSW_EXACT_MAX_ITEMS", 0)
    vectors, items = data
    for where in (ItemFilter(sources=("crc",)), ItemFilter(exclude_groups=("slide-3",)),
                  ItemFilter(groups=tuple(f"slide-{g}" for g in range(4)))):
        matching = sum(where.matches(i.label, i.group, i.source) for i in items)
        overlap = []
        for query in vectors[::37]:
            hits = folders["hnsw"].search(query[None], k=10, where=where)[0]
            assert len(hits) == min(10, matching) and all(where.matches(h.item.label, h.item.group, h.item.source)
                                                          for h in hits)
            overlap.append(len({h.id for h in hits} & set(exact(vectors, items, query, 10, where))) / 10)
        assert np.mean(overlap) >= 0.9, (where, np.mean(overlap))


def test_one_filter_per_query_excludes_each_querys_own_group(folders, data):
    vectors, items = data
    queries = [0, 1, 2, 3]
    filters = [ItemFilter(exclude_groups=(items[q].group,)) for q in queries]
    rows = folders["flat"].search(vectors[queries], k=30, where=filters)
    for q, hits, where in zip(queries, rows, filters):
        assert items[q].group not in {h.item.group for h in hits}
        assert [h.id for h in hits] == exact(vectors, items, vectors[q], 30, where)


def test_hnsw_tombstones_never_take_a_result_place(tmp_path, data):
    vectors, items = data
    folder = write_folder(tmp_path / "hnsw", vectors, items, "hnsw")
    query = vectors[5]
    nearest = [h.id for h in folder.search(query[None], k=40)[0]]
    folder.remove(nearest[:30])  # HNSW keeps their vectors as tombstones
    assert folder.info()["tombstones"] == 30
    hits = folder.search(query[None], k=20)[0]
    assert len(hits) == 20 and not {h.id for h in hits} & set(nearest[:30])
    live = [i for i in items if i.id not in set(nearest[:30])]
    expected = exact(vectors, live, query, 20, None)
    assert len({h.id for h in hits} & set(expected)) >= 18


def test_filters_see_items_added_after_opening(tmp_path, data):
    vectors, items = data
    folder = write_folder(tmp_path / "flat", vectors[:100], items[:100], "flat")
    where = ItemFilter(labels=("new",))
    assert folder.search(vectors[:1], k=5, where=where) == [[]]
    (new_id,) = IndexFolder(tmp_path / "flat").add(vectors[:1], [Item(-1, "n.png", "new", "g")], [b"j"])
    assert [h.id for h in folder.search(vectors[:1], k=5, where=where)[0]] == [new_id]


# -- validation: a filter is bounded before any work ------------------------------------------

@pytest.mark.parametrize("lists, message", [
    ({"labels": ["x"] * (MAX_VALUES + 1)}, "more than"),
    ({"groups": [""]}, "blank"),
    ({"exclude_sources": ["a\nb"]}, "control character"),
    ({"labels": ["x" * 201]}, "characters long"),
    ({"colour": ["red"]}, "unknown filter fields"),
])
def test_hostile_filters_are_refused_with_a_message(lists, message):
    with pytest.raises(InvalidField, match=message):
        from_lists(**lists)


def test_empty_lists_are_no_filter_and_duplicates_collapse():
    assert from_lists(labels=None, groups=[]) is None
    assert from_lists(labels=["a", "a", "b"]).labels == ("a", "b")


@pytest.mark.parametrize("value", ['x" or id > 0 or label == "', "back\\slash", "a'b", "uni é 中"])
def test_milvus_expressions_keep_values_inside_their_literals(value):
    expression = milvus_expression(ItemFilter(labels=(value,), exclude_groups=("g",)),
                                   {"label": "label", "group": "group", "source": "source"})
    literal = expression.removeprefix("label in [").split("] and group not in")[0]
    import json
    assert json.loads(literal) == value and expression.endswith('group not in ["g"]')


def test_an_open_folder_follows_a_rebuild(tmp_path, data):
    """The API keeps its folders open while the CLI rebuilds one (here flat -> pq)."""
    vectors, items = data
    stroma = ItemFilter(labels=("stroma",))
    folder = write_folder(tmp_path / "index", vectors[:200], items[:200], "flat")
    assert folder.search(vectors[:1], k=3, where=stroma)[0]
    write_folder(tmp_path / "index", vectors[:300], items[:300], "pq")
    hits = folder.search(vectors[:1], k=3, where=stroma)[0]
    assert len(hits) == 3 and {h.item.label for h in hits} == {"stroma"}
    assert folder.manifest["index_type"] == "pq" and folder.info()["count"] == 300
    assert folder.remove([0]) == 1
    reopened = IndexFolder(tmp_path / "index")  # the manifest on disk is the rebuilt one, edited
    assert (reopened.manifest["index_type"], reopened.manifest["count"]) == ("pq", 299)


def test_the_source_filter_matches_the_source_results_show(tmp_path, data):
    vectors, _ = data
    items = [Item(i, f"/tiles/t{i}.png", "x", f"g{i}", source="" if i % 2 else "scanner-a") for i in range(10)]
    folder = write_folder(tmp_path / "index", vectors[:10], items, "flat")
    hits = folder.search(vectors[:1], k=10, where=ItemFilter(sources=("/tiles/t3.png", "scanner-a")))[0]
    assert {h.id for h in hits} == {0, 2, 3, 4, 6, 8}  # an item without a source shows (and matches) its path


def test_filters_made_by_the_system_hold_any_stored_value():
    long_group = "/" + "d" * 250  # e.g. a folder-per-class dataset's group: the image's absolute path
    assert ItemFilter(exclude_groups=(long_group,)).exclude_groups == (long_group,)
    with pytest.raises(InvalidField, match="characters long"):
        from_lists(exclude_groups=[long_group])  # from a client it is refused

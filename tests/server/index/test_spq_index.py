"""SPQ's own codebooks in a FAISS IndexPQ: codes and asymmetric-distance scores equal a
direct numpy computation of SPQ's encoding and retrieval."""
import math

import faiss
import numpy as np
import pytest

from histoseek.errors import HistoseekError
from server.index.types import code_bytes_per_item, new_faiss_index

M, K, SUB = 4, 256, 8
DIM = M * SUB


def spq_descriptors(n: int, rng) -> np.ndarray:
    """What the exported SPQ model returns: unit sub-vectors scaled by 1/sqrt(M)."""
    x = rng.standard_normal((n, M, SUB))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True) / math.sqrt(M)).reshape(n, DIM).astype(np.float32)


@pytest.fixture
def spq_index():
    rng = np.random.default_rng(0)
    codebooks = rng.standard_normal((M, K, SUB)).astype(np.float32)  # as trained: not yet unit-norm
    database = spq_descriptors(500, rng)
    index, params = new_faiss_index("pq", DIM, database, codebooks=codebooks)
    index.add_with_ids(database, np.arange(1000, 1500, dtype=np.int64))
    return index, params, codebooks, database, spq_descriptors(20, rng)


def test_faiss_codes_are_spq_hard_assignments(spq_index):
    index, params, codebooks, database, _ = spq_index
    words = codebooks / np.linalg.norm(codebooks, axis=-1, keepdims=True)
    # SPQ encodes each sub-vector by the codeword of highest cosine similarity.
    expected = np.argmax(np.einsum("nmd,mkd->nmk", database.reshape(-1, M, SUB), words), axis=-1)
    pq = faiss.downcast_index(index.index)
    codes = faiss.vector_to_array(pq.codes).reshape(len(database), M)
    np.testing.assert_array_equal(codes, expected)
    assert params == {"M": M, "nbits": 8, "codebooks": "encoder"}
    assert code_bytes_per_item(index) == M  # 32 bits per item


def test_faiss_scores_are_spq_asymmetric_distances(spq_index):
    index, _, codebooks, database, queries = spq_index
    words = codebooks / np.linalg.norm(codebooks, axis=-1, keepdims=True)
    codes = np.argmax(np.einsum("nmd,mkd->nmk", database.reshape(-1, M, SUB), words), axis=-1)
    # Asymmetric distance: the float query against each item's codewords, sub-space by
    # sub-space; with the 1/sqrt(M) scaling it is the mean sub-space cosine similarity.
    lookup = np.einsum("qmd,mkd->qmk", queries.reshape(-1, M, SUB) * math.sqrt(M), words)  # cosines
    scores = lookup[:, np.arange(M)[None, :], codes].sum(-1) / M  # [queries, items]
    expected_ids = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    got_scores, got_ids = index.search(queries, 10)
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, expected_ids, 1), atol=1e-5)
    np.testing.assert_array_equal(got_ids, expected_ids + 1000)


def test_codebooks_that_do_not_fit_the_descriptor_are_refused():
    vectors = np.zeros((10, DIM), np.float32)
    with pytest.raises(HistoseekError, match="do not fit"):
        new_faiss_index("pq", DIM, vectors, codebooks=np.ones((3, K, SUB), np.float32))

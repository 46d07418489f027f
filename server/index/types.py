"""The FAISS index types an index folder can hold, built with their parameters.

All compare by inner product (the encoders' outputs are unit vectors, so it is cosine):
- `flat`: exact; 4·D bytes per item.
- `hnsw`: graph search (M links per node, efSearch candidates per query); exact vectors.
- `ivfpq`: inverted lists (nlist, nprobe searched) over product-quantized residuals.
- `pq`: product quantization, M sub-quantizers of 2^bits centroids, searched exhaustively
  with asymmetric distance (query in float, items as codes). FAISS fits the centroids
  by k-means, except for an encoder that learnt its own (SPQ): its codebooks are loaded
  as they are, so items are stored as exactly the codes the encoder was trained with.
Parameters left unset get defaults that suit the collection's size; the chosen values go
into the manifest; the search-time ones are applied on load (nprobe) or per search
(efSearch, raised to the number of results a search fetches).
"""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from histoseek.errors import HistoseekError

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "pq")
PARAMETERS = ("nlist", "nprobe", "M", "nbits", "ef_search")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
# Fewer items cannot train product quantizers of even 16 centroids (4 per centroid).
PQ_MIN_ITEMS = 64


def _default_m(dim: int) -> int:
    # 4 dimensions per sub-quantizer (at most 64 of them); M must divide the dimension.
    return max(d for d in range(1, min(64, max(1, dim // 4)) + 1) if dim % d == 0)


def _check_pq_shape(dim: int, m: int, nbits: int, count: int) -> None:
    if m < 1 or dim % m:
        raise HistoseekError(f"--m {m} must divide the embedding dimension {dim}")
    if not 1 <= nbits <= 16:
        raise HistoseekError(f"--bits per sub-quantizer must be between 1 and 16, got {nbits}")
    if count < 2**nbits:
        raise HistoseekError(f"{2**nbits} centroids per sub-quantizer need at least as many items to train on, "
                             f"this collection has {count}; lower --bits or use a flat index")


def check_index_type(index_type: str, count: int) -> None:
    """Refuse, before any embedding, an index type that cannot be built over `count` items."""
    if index_type not in INDEX_TYPES:
        raise HistoseekError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if index_type == "ivfpq" and count < PQ_MIN_ITEMS:
        raise HistoseekError(
            f"an ivfpq index needs at least {PQ_MIN_ITEMS} items to train its quantizers, this dataset "
            f"has {count}; build a flat index instead (exact, and fast at this size)"
        )


def new_faiss_index(index_type: str, dim: int, training: np.ndarray, params: dict | None = None,
                    codebooks: np.ndarray | None = None) -> tuple[faiss.Index, dict]:
    """An empty index of `index_type` (trained on `training` where it needs training) and
    the parameters chosen. `codebooks` `[M, K, D/M]`: an encoder's own PQ codebooks."""
    params = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = set(params) - set(PARAMETERS)
    if unknown:
        raise HistoseekError(f"unknown index parameters {sorted(unknown)}; known: {', '.join(PARAMETERS)}")
    n = len(training)
    check_index_type(index_type, n)
    ip = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {}
    if index_type == "hnsw":
        m, ef = params.get("M", HNSW_M), params.get("ef_search", HNSW_EF_SEARCH)
        hnsw = faiss.IndexHNSWFlat(dim, m, ip)
        hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = max(HNSW_EF_CONSTRUCTION, ef), ef
        # IDMap2 gives HNSW our ids; it cannot remove, so removals become tombstones.
        return faiss.IndexIDMap2(hnsw), {"M": m, "ef_search": ef}
    if index_type == "pq" and codebooks is not None:
        return _learnt_pq(dim, codebooks), {"M": codebooks.shape[0], "nbits": int(math.log2(codebooks.shape[1])),
                                            "codebooks": "encoder"}
    m = params.get("M", _default_m(dim))
    nbits = params.get("nbits", min(8, int(math.log2(max(2, n // 4)))))  # >= 4 points per centroid
    _check_pq_shape(dim, m, nbits, n)
    if index_type == "pq":
        pq = faiss.IndexPQ(dim, m, nbits, ip)
        pq.pq.cp.min_points_per_centroid = 1  # sizes were checked above
        pq.train(training)
        return faiss.IndexIDMap2(pq), {"M": m, "nbits": nbits, "codebooks": "k-means"}
    # ivfpq keeps its own ids (an IDMap over IVF would mis-map ids after remove_ids).
    # ~39 training points per coarse centroid (faiss's own minimum), up to 4*sqrt(n) lists.
    nlist = params.get("nlist", max(1, min(int(4 * math.sqrt(n)), n // 39)))
    if not 1 <= nlist <= n:
        raise HistoseekError(f"--nlist must be between 1 and the number of items ({n}), got {nlist}")
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, ip)
    index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
    index.train(training)
    index.nprobe = min(nlist, params.get("nprobe", max(8, nlist // 8)))
    return index, {"nlist": nlist, "M": m, "nbits": nbits, "nprobe": index.nprobe}


def _learnt_pq(dim: int, codebooks: np.ndarray) -> faiss.Index:
    m, k, sub = codebooks.shape
    if m * sub != dim or k & (k - 1):
        raise HistoseekError(f"codebooks of shape {codebooks.shape} do not fit {dim}-dimensional descriptors")
    index = faiss.IndexPQ(dim, m, int(math.log2(k)), faiss.METRIC_INNER_PRODUCT)
    # The served descriptor's sub-vectors have norm 1/sqrt(M) (unit overall): codewords the
    # same, so FAISS's nearest-centroid encoding picks the codeword of highest cosine and
    # inner products are mean sub-space cosines, as in SPQ's own retrieval.
    centroids = (codebooks / np.linalg.norm(codebooks, axis=-1, keepdims=True) / math.sqrt(m)).astype(np.float32)
    faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    return faiss.IndexIDMap2(index)


def apply_search_params(index: faiss.Index, index_type: str, params: dict) -> faiss.Index:
    """Search-time parameters that FAISS does not save in the file (nprobe)."""
    if index_type == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    return index


def search_parameters(index_type: str, params: dict, fetch: int) -> faiss.SearchParameters | None:
    """Per-search parameters: HNSW must explore at least as many candidates as it returns."""
    if index_type == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(params.get("ef_search", HNSW_EF_SEARCH), fetch))
    return None


def searchable_copy(index: faiss.Index, index_type: str) -> faiss.Index:
    """The index on the GPUs when faiss-gpu sees any (for searching; edits stay on the CPU)."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and index_type != "hnsw":
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except RuntimeError as exc:  # a type faiss-gpu does not implement (e.g. IndexPQ)
            log.info("searching the %s index on the CPU: %s", index_type, exc)
    return index


def code_bytes_per_item(index: faiss.Index) -> int:
    """Bytes one item's stored representation takes (codes or vector, without ids and graph links)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):  # the graph stores full vectors in its storage index
        inner = faiss.downcast_index(inner.storage)
    if isinstance(inner, faiss.IndexIVF):  # codes in the inverted lists, without the list number
        return int(inner.code_size)
    return int(inner.sa_code_size())

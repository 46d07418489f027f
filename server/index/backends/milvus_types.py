"""The Milvus index types an index folder can use, and their parameters.

Users name them as `--type` (lower case); Milvus names them in capitals. All compare by
inner product (IP: the encoders' unit vectors, so cosine); Milvus's IP "distance" is the
similarity itself, larger is better.

Milvus Lite (a local `*.db` path) builds:
- `flat`: exact; 4·D bytes per item.
- `hnsw`: graph (M links per node, efConstruction at build, ef candidates per search).
- `ivf_flat`: inverted lists (nlist built, nprobe searched) of full vectors.
- `ivf_sq8`: inverted lists of 8-bit scalar-quantized vectors (D bytes per item).
A Milvus server (standalone or cluster, `http://HOST:19530`) also builds, passed through
with the same parameter names: `ivf_pq` (M sub-quantizers of nbits, Milvus's `m`/`nbits`),
`scann`, `diskann` (graph on disk; ef_search is its `search_list`), and on a GPU build of
Milvus `gpu_brute_force`, `gpu_ivf_flat`, `gpu_ivf_pq`, `gpu_cagra` (M is its
`graph_degree`, ef_search its `itopk_size`). Milvus Lite 3.2 refuses IVF_PQ only once
10,000 rows are flushed and silently builds nothing below that, so these are refused up
front for a Lite URI. SPQ's own codebooks are a FAISS feature (`--backend faiss --type pq`).

The project's parameter names (`M`, `ef_search`, `nlist`, `nprobe`, `nbits`) are mapped to
Milvus's; unset ones get the defaults of the FAISS backend for the same collection size
(server/index/types.py), and the chosen values go into the manifest.
"""
from __future__ import annotations

import math

from histoseek.errors import HistoseekError

# The FAISS backend's (server/index/types.py), copied: a Milvus-only install never loads faiss.
PARAMETERS = ("nlist", "nprobe", "M", "nbits", "ef_search")
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64


def _default_m(dim: int) -> int:
    # 4 dimensions per sub-quantizer (at most 64 of them); M must divide the dimension.
    return max(d for d in range(1, min(64, max(1, dim // 4)) + 1) if dim % d == 0)


# project name -> (Milvus name, project parameters it takes)
LITE_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "flat": ("FLAT", ()),
    "hnsw": ("HNSW", ("M", "ef_search")),
    "ivf_flat": ("IVF_FLAT", ("nlist", "nprobe")),
    "ivf_sq8": ("IVF_SQ8", ("nlist", "nprobe")),
}
SERVER_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ivf_pq": ("IVF_PQ", ("nlist", "nprobe", "M", "nbits")),
    "scann": ("SCANN", ("nlist", "nprobe")),
    "diskann": ("DISKANN", ("ef_search",)),
    "gpu_brute_force": ("GPU_BRUTE_FORCE", ()),
    "gpu_ivf_flat": ("GPU_IVF_FLAT", ("nlist", "nprobe")),
    "gpu_ivf_pq": ("GPU_IVF_PQ", ("nlist", "nprobe", "M", "nbits")),
    "gpu_cagra": ("GPU_CAGRA", ("M", "ef_search")),
}
INDEX_TYPES = (*LITE_TYPES, *SERVER_TYPES)
MAX_TOP_K = 16_384  # Milvus's limit on results per query (and on ef/search_list beyond it)
_IVF = ("ivf_flat", "ivf_sq8", "ivf_pq", "scann", "gpu_ivf_flat", "gpu_ivf_pq")
_PQ = ("ivf_pq", "gpu_ivf_pq")
_EXACT = ("flat", "gpu_brute_force")


def milvus_name(index_type: str) -> str:
    return {**LITE_TYPES, **SERVER_TYPES}[index_type][0]


def check_index_type(index_type: str, lite: bool) -> None:
    """Refuse, before any work, a type this backend (or Milvus Lite) cannot build."""
    if index_type == "pq" or index_type == "ivfpq":
        hint = ("use the FAISS backend (--backend faiss --type pq): SPQ's own codebooks and k-means PQ "
                "are FAISS indexes" if index_type == "pq" else "Milvus calls it ivf_pq (needs a Milvus server)")
        raise HistoseekError(f"the milvus backend has no index type {index_type!r}; {hint}")
    if index_type not in INDEX_TYPES:
        raise HistoseekError(f"unknown milvus index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if lite and index_type in SERVER_TYPES:
        raise HistoseekError(
            f"index type {index_type} needs a Milvus server (standalone or cluster): Milvus Lite builds only "
            f"{', '.join(LITE_TYPES)}; pass --milvus-uri http://HOST:19530 or choose one of those")


def choose_params(index_type: str, dim: int, count: int, asked: dict | None) -> tuple[dict, dict]:
    """(the project's parameters chosen, for the manifest; Milvus's build parameters)."""
    asked = {key: value for key, value in (asked or {}).items() if value is not None}
    unknown = set(asked) - set(PARAMETERS)
    if unknown:
        raise HistoseekError(f"unknown index parameters {sorted(unknown)}; known: {', '.join(PARAMETERS)}")
    takes = {**LITE_TYPES, **SERVER_TYPES}[index_type][1]
    inapplicable = set(asked) - set(takes)
    if inapplicable:
        raise HistoseekError(f"{', '.join(sorted(inapplicable))} do not apply to a milvus {index_type} index "
                             f"(its parameters: {', '.join(takes) or 'none'})")
    for key, value in asked.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HistoseekError(f"index parameter {key} must be a whole number of at least 1, got {value!r}")
    chosen: dict = {}
    if index_type in _IVF:
        # ~39 vectors per list (faiss's own minimum for training), up to 4*sqrt(n) lists.
        nlist = asked.get("nlist", max(1, min(int(4 * math.sqrt(count)), count // 39)))
        if nlist > 65_536:
            raise HistoseekError(f"--nlist must be at most 65536 in Milvus, got {nlist}")
        chosen = {"nlist": nlist, "nprobe": min(nlist, asked.get("nprobe", max(8, nlist // 8)))}
    if index_type in _PQ:
        m, nbits = asked.get("M", _default_m(dim)), asked.get("nbits", 8)
        if dim % m:
            raise HistoseekError(f"--m {m} must divide the embedding dimension {dim}")
        if nbits > 16:
            raise HistoseekError(f"--bits per sub-quantizer must be between 1 and 16, got {nbits}")
        chosen.update(M=m, nbits=nbits)
    if index_type in ("hnsw", "gpu_cagra"):
        chosen = {"M": asked.get("M", HNSW_M), "ef_search": asked.get("ef_search", HNSW_EF_SEARCH)}
    if index_type == "diskann":
        chosen = {"ef_search": asked.get("ef_search", HNSW_EF_SEARCH)}
    return chosen, build_params(index_type, chosen)


def build_params(index_type: str, chosen: dict) -> dict:
    """Milvus's build parameters for the project's chosen ones."""
    if index_type == "hnsw":
        return {"M": chosen["M"], "efConstruction": max(HNSW_EF_CONSTRUCTION, chosen["ef_search"])}
    if index_type == "gpu_cagra":
        return {"graph_degree": chosen["M"], "intermediate_graph_degree": 2 * chosen["M"]}
    build = {"nlist": chosen["nlist"]} if "nlist" in chosen else {}
    if index_type in _PQ:
        build.update(m=chosen["M"], nbits=chosen["nbits"])
    return build


def search_params(index_type: str, chosen: dict, k: int, depth: int = 0) -> dict:
    """Milvus's search parameters for k results. `depth` > 0: a deeper search, for a query
    whose filter left it short of k although `depth` items are allowed (every IVF list, a
    beam as wide as the allowed items, up to Milvus's limit)."""
    if index_type in _IVF:
        return {"nprobe": chosen["nlist"] if depth else chosen["nprobe"]}
    beam = min(MAX_TOP_K, max(chosen.get("ef_search", 0), k, depth))
    if index_type == "hnsw":
        return {"ef": beam}  # HNSW needs ef >= k
    if index_type == "diskann":
        return {"search_list": beam}
    if index_type == "gpu_cagra":
        return {"itopk_size": beam}
    return {}


def exact(index_type: str) -> bool:
    return index_type in _EXACT


def graph(index_type: str) -> bool:
    return index_type in ("hnsw", "diskann", "gpu_cagra")


def code_bytes_per_item(index_type: str, dim: int, chosen: dict) -> int | None:
    """Bytes of one item's stored representation (None: Milvus does not say, e.g. SCANN)."""
    if index_type == "ivf_sq8":
        return dim
    if index_type in _PQ:
        return math.ceil(chosen["M"] * chosen["nbits"] / 8)
    if index_type == "scann":
        return None
    return 4 * dim  # full float32 vectors (DISKANN: on disk, with PQ codes in memory besides)

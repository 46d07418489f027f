"""The Milvus backend: an index folder's vectors in a Milvus collection (pymilvus MilvusClient).

Where the collection lives (`options["uri"]` at build time, `manifest["milvus"]["uri"]` after):
a Milvus Lite path ending in `.db`, or a Milvus server's `http://HOST:19530` (milvus_connection.py).
Without a URI the Lite database is `milvus.db` inside the index folder, so the folder stays
self-contained (copied, moved and replaced whole); in the manifest a relative path is
relative to the index folder. One process at a time holds a Lite database: the CLI cannot
edit an index whose database the API holds open (it is told so).

Builds never overwrite a collection. Each build writes a new one named
`<base>_b<build id>` (base: `options["collection"]`, else `histoseek_<index folder name>`),
tagged with the index it belongs to (`histoseek.index`: the index folder's final path at
its first build, kept by its rebuilds) in the collection's properties, so that:
- a failed build leaves the old folder and its collection untouched;
- a base name tagged with another index is refused (two indexes never share collections);
- the builds an index has superseded are dropped once its new folder is opened (the
  collections older than the manifest's), and the leftovers of failed builds by the next
  build. A copied index folder therefore shares its collection with the original: rebuild
  the copy (with its own name) rather than copy it.

Searches apply filters inside Milvus as boolean expressions on the scalar fields (server/index/
filters.py `milvus_expression`). Approximate indexes can come back short of k when a filter
admits few items: the graph or the probed lists reach too few of them. Such queries are
searched again, deeper (every IVF list; a beam as wide as the collection, up to Milvus's
16,384), when Milvus counts more allowed items than were returned; a graph search still
short is answered by scoring the allowed items exactly, when they are few. A graph index
under a filter scores the items exactly from the start when at most EXACT_MAX_ITEMS are
admitted, and otherwise widens its beam by the share of items the filter admits.

Consistency is Strong: a search sees every write made before it, and counts are exact
without flushing (flushes seal segments and are rate-limited on a server: only a build
flushes).
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from histoseek.errors import HistoseekError
from server.index.backends import milvus_types as types
from server.index.backends.base import VectorBackend, by_filter, no_results
from server.index.backends.catalog import CurrentCatalog
from server.index.backends.milvus_connection import (CALL_TIMEOUT_S, CONNECT_TIMEOUT_S, NOT_FOUND, SLOW_TIMEOUT_S,
                                               Connection, Target)
from server.index.fields import MAX_ID, MAX_TEXT_CHARS
from server.index.filters import FIELDS, ItemFilter, milvus_expression
from server.index.store import Item, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

LITE_DEFAULT = "milvus.db"  # inside the index folder, when no URI is given
MESSAGE_BYTES = 8 << 20  # per insert or search request (Milvus accepts 64 MiB by default)
PAGE = 8192  # ids per page of a listing, and per delete
# Queries a filtered search left short of k although more items are allowed: those items
# are scored exactly when their vectors take at most this much (and Milvus returns them all).
EXACT_BYTES = 32 << 20
# A graph index under a filter admitting at most this many items scores them exactly from
# the start; above, a beam widened by the filter's share is faster and as good (100k items,
# a filter admitting 1 %, Milvus Lite: exact over the 1,000 fetched vectors 199 ms a query,
# HNSW with ef 6,400 61 ms, both recall@10 1.0).
EXACT_MAX_ITEMS = 256
COLUMNS = {field: field for field in FIELDS}  # scalar field of each filterable item field
# VARCHAR max_length counts UTF-8 bytes on a Milvus server (characters in Lite 3.2);
# a character is at most 4 bytes.
TEXT_BYTES, PATH_BYTES = 4 * MAX_TEXT_CHARS, 65_535
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUILD = r"_b\d{20}[0-9a-f]{4}"
OWNER_PROPERTY = "histoseek.index"


# -- the backend --------------------------------------------------------------------------

class MilvusBackend(VectorBackend):
    name = "milvus"
    index_types = types.INDEX_TYPES

    @classmethod
    def create(cls, folder: Path, manifest: dict, vectors: np.ndarray, items: list[Item], options: dict) -> dict:
        """options: `uri` (default: `milvus.db` in the index folder), `collection` (the base of
        the collection's name; default `histoseek_<index name>`), `index_name` or `index_dir`
        (the folder's final name, a sibling of `folder`, or path; default: read from the
        staging folder's name `.<name>.staging.*`), `index_params` (asked, over the manifest's).
        Returns `backend`, `index_params` (chosen) and `milvus` (uri without secrets,
        collection, owner, build, Milvus's index type and parameters)."""
        cls.validate(manifest, options, len(items), folder)
        folder, index_type, dim = Path(folder), manifest["index_type"], int(manifest["dimension"])
        target = Target.parse(options.get("uri") or folder / LITE_DEFAULT, Path.cwd())
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(items), dim):
            raise HistoseekError(f"{len(items)} items need vectors shaped [{len(items)}, {dim}], "
                                 f"got {list(vectors.shape)}")
        asked = {**(manifest.get("index_params") or {}), **(options.get("index_params") or {})}
        chosen, build = types.choose_params(index_type, dim, len(items), asked)
        final = _final_path(folder, options)
        keep, owner = _current_build(final, target)
        # A rebuild keeps its index's owner and name, wherever the folder moved since.
        owner = owner or str(final)
        base = options.get("collection") or (keep.rsplit("_b", 1)[0] if keep else _base_name(final.name))
        if not _NAME.fullmatch(base) or len(base) > 200:
            raise HistoseekError(f"Milvus collection name {base!r} must start with a letter or _ and hold only "
                                 "letters, digits and _ (at most 200 characters)")
        # Fixed width, so that names sort as builds were made (to the microsecond).
        build_id = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S%f") + secrets.token_hex(2)
        collection = f"{base}_b{build_id}"
        connection = Connection(target, must_exist=False)
        try:
            client = connection.client()
            _claim_base(connection, base, owner, keep)
            try:
                connection.call("create the collection", lambda c: _create_collection(
                    c, collection, dim, types.milvus_name(index_type), build, owner, build_id))
                # No owner: a backend that is building must not tidy away the builds it supersedes
                # (the old folder still uses its collection until the new one replaces it).
                backend = cls(folder, target, collection, index_type, chosen, dim, connection)
                backend.add(vectors, items)
                connection.call("flush the collection", lambda c: c.flush(collection, timeout=SLOW_TIMEOUT_S),
                                collection)
                stored = backend._count("")
                if stored != len(items):
                    raise HistoseekError(f"Milvus at {target.public} holds {stored} of the {len(items)} vectors "
                                         f"written to {collection}; build the index again")
            except BaseException:
                try:  # a failed build leaves no collection behind (the old index keeps its own)
                    if client.has_collection(collection, timeout=CALL_TIMEOUT_S):
                        client.drop_collection(collection, timeout=CALL_TIMEOUT_S)
                except Exception:  # e.g. Milvus went away; the next build of this index drops it
                    log.warning("could not drop the unfinished collection %s", collection, exc_info=True)
                raise
        finally:
            connection.drop()
        uri, inside = target.public, Path(os.path.abspath(folder))
        if target.lite and Path(uri).is_relative_to(inside):
            uri = str(Path(uri).relative_to(inside))
        return {"backend": cls.name, "index_params": chosen,
                "milvus": {"uri": uri, "collection": collection, "owner": owner, "build": build_id,
                           "index_type": types.milvus_name(index_type), "build_params": build, "metric_type": "IP"}}

    @classmethod
    def validate(cls, manifest: dict, options: dict, count: int, folder: Path | None = None) -> None:
        if options.get("codebooks") is not None:
            raise HistoseekError("an encoder's own PQ codebooks (SPQ) are searched by the FAISS backend; "
                                 "build with --backend faiss --type pq")
        uri = options.get("uri") or (Path(folder) / LITE_DEFAULT if folder else LITE_DEFAULT)
        target = Target.parse(uri, Path.cwd())
        types.check_index_type(manifest["index_type"], target.lite)
        asked = {**(manifest.get("index_params") or {}), **(options.get("index_params") or {})}
        types.choose_params(manifest["index_type"], int(manifest["dimension"]), count, asked)

    @classmethod
    def open(cls, folder: Path, manifest: dict, store: Store) -> "MilvusBackend":
        """The backend of an index folder; Milvus is first reached on the first call."""
        section = manifest.get("milvus") or {}
        if not section.get("uri") or not section.get("collection"):
            raise HistoseekError(f"{folder}/manifest.json names no Milvus collection; rebuild the index")
        target = Target.parse(section["uri"], Path(folder))
        backend = cls(Path(folder), target, section["collection"], manifest["index_type"],
                      manifest.get("index_params") or {}, int(manifest["dimension"]),
                      Connection(target, must_exist=True), section.get("owner"))
        backend._catalog = CurrentCatalog(store) if store is not None else None
        return backend

    def __init__(self, folder: Path, target: Target, collection: str, index_type: str, params: dict, dim: int,
                 connection: Connection, owner: str | None = None):
        self.path, self.target, self.collection = folder, target, collection
        self.index_type, self.params, self.dim = index_type, params, dim
        self._connection, self._owner = connection, owner
        self._tidied = owner is None
        self._catalog: CurrentCatalog | None = None  # the folder's rows (None while building)

    def _call(self, what: str, fn: Callable[[MilvusClient], T]) -> T:
        if not self._tidied:
            self._tidied = True
            self._drop_superseded()
        return self._connection.call(what, fn, self.collection)

    def _drop_superseded(self) -> None:
        """Drop the collections of this index's earlier builds (its folder now names this one)."""
        try:
            client = self._connection.client()
            for name in _builds_of(client, self.collection.rsplit("_b", 1)[0]):
                if name < self.collection and _owner_of(client, name) == self._owner:
                    log.info("dropping %s, the collection of an earlier build of %s", name, self._owner)
                    client.drop_collection(name, timeout=CALL_TIMEOUT_S)
        except (MilvusException, grpc.RpcError, HistoseekError) as exc:  # tidying; the next opening retries
            self._tidied = False
            log.info("could not drop earlier builds of %s: %s", self._owner, exc)

    # -- reading ----------------------------------------------------------------------------

    def check_available(self) -> None:
        exists = self._call("answer", lambda c: c.has_collection(self.collection, timeout=CONNECT_TIMEOUT_S))
        if not exists:
            raise self._connection.translate(MilvusException(NOT_FOUND, "collection not found"), "search",
                                             self.collection)

    def search(self, vectors: np.ndarray, k: int,
               filters: Sequence[ItemFilter | None]) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not 1 <= k <= types.MAX_TOP_K:
            raise HistoseekError(f"k must be between 1 and {types.MAX_TOP_K} (Milvus's limit), got {k}")
        scores, ids = no_results(len(vectors), k)
        for where, rows in by_filter(filters).items():
            expr = milvus_expression(where, COLUMNS) if where is not None else ""
            params = types.search_params(self.index_type, self.params, k)
            allowed = None  # items `where` admits, counted when needed
            if expr and types.graph(self.index_type):
                # A graph walk under a filter misses admitted items even when it comes back
                # full (HNSW, a filter admitting 1 % of 100k: recall@10 0.82): the few are
                # scored exactly (their vectors travel, so only a few), else the beam is
                # widened by the share of items the filter admits, as the FAISS backend does.
                allowed = self._admitted(where, expr)
                if allowed <= EXACT_MAX_ITEMS:
                    self._exact_into(vectors, rows, k, expr, scores, ids)
                    continue
                beam = max(self.params.get("ef_search", 0), k) * self._admitted(None, "") // max(1, allowed)
                params = types.search_params(self.index_type, self.params, k, depth=beam)
            self._search_into(vectors, rows, k, expr, params, scores, ids)
            if types.exact(self.index_type) or ids[rows, -1].min() >= 0:
                continue
            # Some came back short: are more items allowed than they found?
            allowed = self._admitted(where, expr) if allowed is None else allowed
            short = [row for row in rows if (ids[row] >= 0).sum() < min(k, allowed)]
            few = self._few(allowed)
            if short and not (few and types.graph(self.index_type)):
                # Every IVF list; a beam as wide as the collection (up to Milvus's limit).
                depth = self._count("") if expr else allowed
                deeper = types.search_params(self.index_type, self.params, k, depth=depth)
                self._search_into(vectors, short, k, expr, deeper, scores, ids)
                short = [row for row in short if (ids[row] >= 0).sum() < min(k, allowed)]
            if short and few:
                self._exact_into(vectors, short, k, expr, scores, ids)
        return scores, ids

    def _admitted(self, where: ItemFilter | None, expr: str) -> int:
        """How many items `where` (as the expression `expr`) admits: counted from the folder's
        rows, as a count in Milvus Lite scans every row in Python; by Milvus without a folder."""
        if self._catalog is None:
            return self._count(expr)
        catalog = self._catalog.get()
        return len(catalog.ids) if where is None else len(catalog.allowed(where))

    def _few(self, allowed: int) -> bool:
        """Whether `allowed` items are few enough to fetch and score exactly."""
        return allowed <= types.MAX_TOP_K and allowed * 4 * self.dim <= EXACT_BYTES

    def _exact_into(self, vectors: np.ndarray, rows: list[int], k: int, expr: str, scores: np.ndarray,
                    ids: np.ndarray) -> None:
        """Exact scores of the (few) items `expr` admits, for queries a graph search left
        short: it walks through the items a filter excludes and can stop before it reaches
        those it admits (when the filter follows the embedding's own clusters, a label).
        Scoring them is exact, and cheaper than a beam as wide as the collection (20,000
        items, a filter admitting 1 %, through IndexFolder on Milvus Lite: p50 42 ms against
        96 ms)."""
        found = self._call("read the allowed vectors", lambda c: c.query(
            self.collection, filter=expr, output_fields=["id", "vector"], limit=types.MAX_TOP_K,
            timeout=CALL_TIMEOUT_S))
        if not found:
            return
        allowed = np.array([row["id"] for row in found], np.int64)
        sims = vectors[rows] @ np.asarray([row["vector"] for row in found], np.float32).T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores[rows, :order.shape[1]] = np.take_along_axis(sims, order, axis=1)
        ids[rows, :order.shape[1]] = allowed[order]

    def _search_into(self, vectors: np.ndarray, rows: list[int], k: int, expr: str, params: dict,
                     scores: np.ndarray, ids: np.ndarray) -> None:
        batch = max(1, min(1024, MESSAGE_BYTES // (4 * self.dim)))
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            found = self._call("search", lambda c: c.search(
                self.collection, data=vectors[part], limit=k, filter=expr, output_fields=["id"],
                search_params={"metric_type": "IP", "params": params}, timeout=CALL_TIMEOUT_S))
            for row, hits in zip(part, found):
                scores[row] = -np.inf
                ids[row] = -1
                for place, hit in enumerate(list(hits)[:k]):
                    ids[row, place], scores[row, place] = int(hit["id"]), float(hit["distance"])

    def _count(self, expr: str) -> int:
        found = self._call("count the vectors", lambda c: c.query(
            self.collection, filter=expr, output_fields=["count(*)"], timeout=CALL_TIMEOUT_S))
        return int(found[0]["count(*)"])

    def _pages(self) -> Iterator[np.ndarray]:
        """The held ids, a page at a time (memory bounded by the page)."""
        iterator = self._call("list the vectors", lambda c: c.query_iterator(
            self.collection, batch_size=PAGE, filter="", output_fields=["id"], timeout=CALL_TIMEOUT_S))
        try:
            while True:
                page = self._call("list the vectors", lambda c: iterator.next())
                if not page:
                    return
                yield np.fromiter((row["id"] for row in page), np.int64, len(page))
        finally:
            iterator.close()

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        wanted = [int(i) for i in ids]
        found = self._call("read vectors", lambda c: c.get(self.collection, ids=wanted, output_fields=["vector"],
                                                           timeout=CALL_TIMEOUT_S)) if wanted else []
        by_id = {int(row["id"]): row["vector"] for row in found}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise KeyError(missing)
        return np.asarray([by_id[i] for i in wanted], np.float32).reshape(len(wanted), self.dim)

    def held_ids(self) -> np.ndarray:
        pages = list(self._pages())
        return np.sort(np.concatenate(pages)) if pages else np.zeros(0, np.int64)

    def first_free_id(self, above: int) -> int:
        # Usually nothing is held at or above the store's next id: one count says so.
        if not self._count(f"id >= {int(above)}"):
            return int(above)
        # Milvus has no max(): beyond a page of ids, a bisection on counts of `id >= m`
        # (~63 counts of a primary-key range, instead of listing every id on every add).
        if self._count("") <= PAGE:
            held = self.held_ids()
            return max(int(above), int(held.max()) + 1 if len(held) else 0)
        low, high = 0, MAX_ID  # some id >= low; none >= high, unless MAX_ID itself is held
        if self._count(f"id >= {high}"):
            return high + 1
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._count(f"id >= {middle}") else (low, middle)
        return max(int(above), high)

    def needs_repair(self, rows: np.ndarray) -> bool:
        # A count, not a listing (this runs before every write): equal counts with different
        # ids need both a crashed write's leftover vector and a row whose vector was lost,
        # which only tampering with the collection causes.
        return self._count("") != len(rows)

    def info(self) -> dict:
        count = self._count("")
        return {"vectors": count, "tombstones": 0,
                "code_bytes_per_item": types.code_bytes_per_item(self.index_type, self.dim, self.params),
                "index_bytes_per_item": self._bytes_per_item(count),
                "collection": self.collection, "uri": self.target.public}

    def _bytes_per_item(self, count: int) -> float | None:
        """On disk, per vector: knowable for Milvus Lite (its collection's folder), not for a server."""
        folder = Path(self.target.address) / "collections" / self.collection
        if not self.target.lite or not folder.is_dir():
            return None
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return round(size / max(1, count), 1)

    def close(self) -> None:
        self._connection.drop()

    # -- writing (under the folder's write lock) ---------------------------------------------

    def add(self, vectors: np.ndarray, items: list[Item]) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(items), self.dim):
            raise HistoseekError(f"{len(items)} items need vectors shaped [{len(items)}, {self.dim}], "
                                 f"got {list(vectors.shape)}")
        rows = max(1, MESSAGE_BYTES // (4 * self.dim + 4 * TEXT_BYTES))
        for start in range(0, len(items), rows):
            batch = [{"id": item.id, "vector": vector, "label": item.label, "group": item.group,
                      "source": item.shown_source, "path": _clip(item.path, PATH_BYTES)}
                     for item, vector in zip(items[start:start + rows], vectors[start:start + rows])]
            self._call("insert vectors", lambda c: c.insert(self.collection, batch, timeout=CALL_TIMEOUT_S))

    def remove(self, ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        for start in range(0, len(ids), PAGE):
            part = ids[start:start + PAGE].tolist()
            self._call("delete vectors", lambda c: c.delete(self.collection, ids=part, timeout=CALL_TIMEOUT_S))

    def repair(self, rows: np.ndarray) -> np.ndarray:
        held = self.held_ids()
        orphans = np.setdiff1d(held, rows)
        if len(orphans):
            log.warning("%s: removing %d vectors left by an interrupted write", self.path, len(orphans))
            self.remove(orphans)
        return np.setdiff1d(rows, held)


# -- building helpers ---------------------------------------------------------------------

def _final_path(folder: Path, options: dict) -> Path:
    """The index folder's final path: `options["index_dir"]`; else its sibling named
    `options["index_name"]`; else the one a staging folder (`.<name>.staging.<random>`,
    histoseek.atomic.staged_directory) will be renamed to; else `folder` itself."""
    if options.get("index_dir"):
        return Path(os.path.abspath(options["index_dir"]))
    if options.get("index_name"):
        return Path(os.path.abspath(folder.parent / options["index_name"]))
    staged = re.fullmatch(r"\.(.+)\.staging\.[^.]+", folder.name)
    return Path(os.path.abspath(folder.parent / staged.group(1) if staged else folder))


def _base_name(index_name: str) -> str:
    return ("histoseek_" + re.sub(r"[^A-Za-z0-9_]", "_", index_name))[:200]


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (Milvus keeps the path only for people
    browsing the collection; items.sqlite holds it whole)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _current_build(final: Path, target: Target) -> tuple[str | None, str | None]:
    """(collection, owner) of the existing index folder at `final`, when it uses the same Milvus."""
    try:
        manifest = json.loads((final / "manifest.json").read_text())
        section = manifest.get("milvus") or {}
        if manifest.get("backend") == "milvus" and Target.parse(section["uri"], final).public == target.public:
            return section.get("collection"), section.get("owner")
    except (OSError, ValueError, KeyError, TypeError, HistoseekError):
        pass
    return None, None


def _builds_of(client: MilvusClient, base: str) -> list[str]:
    pattern = re.compile(re.escape(base) + _BUILD)
    return sorted(name for name in client.list_collections(timeout=CALL_TIMEOUT_S) if pattern.fullmatch(name))


def _owner_of(client: MilvusClient, collection: str) -> str | None:
    properties = client.describe_collection(collection, timeout=CALL_TIMEOUT_S).get("properties") or {}
    return properties.get(OWNER_PROPERTY)


def _claim_base(connection: Connection, base: str, owner: str, keep: str | None) -> None:
    """Refuse a base name another index uses; drop this index's failed builds' leftovers
    (every build but `keep`, the one its current folder names)."""
    def claim(client: MilvusClient) -> None:
        for name in _builds_of(client, base):
            other = _owner_of(client, name)
            if other != owner:
                raise HistoseekError(
                    f"Milvus at {connection.target.public} already holds collection {name} of "
                    f"{other or 'something other than histoseek'}; give this index another collection name "
                    "(--collection NAME)")
            if name != keep:
                log.info("dropping %s, left by a failed build of %s", name, owner)
                client.drop_collection(name, timeout=CALL_TIMEOUT_S)

    connection.call("list its collections", claim)


def _create_collection(client: MilvusClient, name: str, dim: int, index_type: str, build: dict, owner: str,
                       build_id: str) -> None:
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    for field in FIELDS:
        schema.add_field(COLUMNS[field], DataType.VARCHAR, max_length=TEXT_BYTES)
    schema.add_field("path", DataType.VARCHAR, max_length=PATH_BYTES)
    index = client.prepare_index_params()
    # Nested under "params": pymilvus 3 sends loose keys, which Milvus Lite 3.2 ignores
    # (it builds with its defaults); a Milvus server reads both forms.
    index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params={"params": build})
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong",
                             properties={OWNER_PROPERTY: owner, "histoseek.build": build_id},
                             timeout=SLOW_TIMEOUT_S)


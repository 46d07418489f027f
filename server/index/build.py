"""Embedding image files through Triton into index folders: `index build` and `index add`.

A build is resumable: each finished batch (embeddings + thumbnails) is saved in a hidden
folder next to the output, `.<out>.embedding/`, keyed by the served model's checksum and
the dataset's item list. A rerun after an interruption reuses those batches and embeds
only the rest; a different model or dataset starts over. The folder is removed once the
index folder has been written (atomically, so a crash never leaves half an index).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from histoseek import atomic
from histoseek.dataset import IMAGE_SUFFIXES, DatasetItem, is_image_file, read_dataset, read_slides_table
from histoseek.errors import HistoseekError
from server.index import ray_embedding
from server.embedder import Embedder
from server.index.fields import text_field
from server.index.backends import backend_class
from server.index.prepare import prepare_file
from server.index.folder import MANIFEST_FILE, STORE_FILE, IndexFolder, check_model
from server.index.store import Item, SlideRecord, Store

log = logging.getLogger(__name__)
_STATE = "state.json"


def _embed_batches(paths: list[Path], embedder: Embedder, batch: int, skip: set[int],
                   progress: tqdm) -> Iterator[tuple[int, np.ndarray, list[bytes]]]:
    """(batch number, embeddings, thumbnails) for every batch not in `skip`."""
    size = int(embedder.spec()["input_size"])
    todo = [(number, paths[start:start + batch])
            for number, start in enumerate(range(0, len(paths), batch)) if number not in skip]
    # The next batch is decoded (Pillow releases the GIL) while Triton embeds this one.
    with ThreadPoolExecutor(max_workers=2) as pool:
        def decode(chunk: list[Path]) -> list[Future]:
            return [pool.submit(prepare_file, path, size) for path in chunk]

        upcoming = decode(todo[0][1]) if todo else []
        for position, (number, _) in enumerate(todo):
            prepared = [future.result() for future in upcoming]
            upcoming = decode(todo[position + 1][1]) if position + 1 < len(todo) else []
            embeddings = embedder.embed(np.stack([model_input for model_input, _ in prepared]))
            progress.update(len(prepared))
            yield number, embeddings, [thumbnail for _, thumbnail in prepared]


def _served_model(embedder: Embedder) -> tuple[str | None, int]:
    return embedder.version_checksum(), int(embedder.spec()["embedding_dim"])


def _save_batch(path: Path, embeddings: np.ndarray, thumbnails: list[bytes]) -> None:
    offsets = np.cumsum([0] + [len(t) for t in thumbnails]).astype(np.int64)
    blob = np.frombuffer(b"".join(thumbnails), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, offsets=offsets, thumbnails=blob)  # no pickle: arrays only
    atomic.write_bytes(path, buffer.getvalue())


def _load_batch(path: Path) -> tuple[np.ndarray, list[bytes]]:
    with np.load(path) as batch:
        offsets, blob = batch["offsets"], batch["thumbnails"].tobytes()
        return batch["embeddings"], [blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _staging_for(out: Path, state: dict) -> Path:
    """The resume folder for `state`; emptied when it belongs to another model or dataset."""
    staging = out.parent / f".{out.name}.embedding"
    try:
        previous = json.loads((staging / _STATE).read_text())
    except (OSError, ValueError):
        previous = None
    if previous != state:
        if previous is not None:
            log.info("%s holds embeddings of another model or dataset; starting over", staging)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        atomic.write_json(staging / _STATE, state)
    return staging


def _check_output(out: Path, data: Path) -> None:
    """Refuse an `out` whose replacement (the build swaps in a whole new folder) destroys data."""
    out, data = out.resolve(), data.resolve()
    if out == data or out.is_relative_to(data) or data.is_relative_to(out):
        raise HistoseekError(f"--out {out} must be outside the dataset folder {data} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise HistoseekError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise HistoseekError(f"--out {out} already holds files and is not an index folder (no {MANIFEST_FILE}); "
                             f"it would be replaced: choose a new folder, such as {out}/<name>")


def encoder_codebooks(embedder: Embedder, repo: Path, sha256: str | None) -> np.ndarray | None:
    """The served encoder's own PQ codebooks (SPQ), from the model repository Triton serves."""
    spec = embedder.spec()
    if spec.get("output_kind") != "pq_descriptor":
        return None
    folder = Path(repo) / str(spec["name"]) / str(embedder.version_number())
    try:
        exported = json.loads((folder / "encoder.json").read_text())
        codebooks = np.load(folder / "codebooks.npy")
    except (OSError, ValueError) as exc:
        raise HistoseekError(f"cannot read the codebooks of {spec['name']!r} in {folder} ({exc}); pass --repo, the "
                             "model repository Triton serves") from exc
    if exported.get("model_sha256") != sha256:
        raise HistoseekError(f"{folder} holds another model than the one Triton serves (sha256 differs); pass --repo, "
                             "the model repository Triton serves")
    return codebooks


def build_index(encoder: str, data: Path, out: Path, *, index_type: str = "flat", triton_url: str = "localhost:8001",
                protocol: str = "grpc", batch: int = 32, params: dict | None = None,
                repo: Path = Path("model_repository"), backend: str = "faiss",
                backend_options: dict | None = None, ray: str | None = None, ray_workers: int | None = None,
                ray_engine: str | None = None) -> Path:
    """Embed a dataset folder through Triton and write the index folder `out` atomically;
    its vectors go to `backend` (options: Milvus's `uri` and `collection`). With `ray` (a
    cluster address, "" for a local Ray) the embedding runs on Ray (server/index/ray_embedding.py)."""
    data, out = Path(data), Path(out)
    if batch < 1:
        raise HistoseekError(f"--batch must be at least 1, got {batch}")
    dataset = read_dataset(data)
    store_class = backend_class(backend)
    if index_type not in store_class.index_types:
        raise HistoseekError(f"the {backend} backend has no index type {index_type!r}; choose one of "
                             f"{', '.join(store_class.index_types)}")
    _check_output(out, data)
    embedder = ray_embedding.model_source(encoder, ray=ray, workers=ray_workers, engine=ray_engine,
                                          triton_url=triton_url, protocol=protocol, batch=batch, repo=repo)
    spec = embedder.spec()
    sha256, dim = _served_model(embedder)
    codebooks = encoder_codebooks(embedder, repo, sha256) if index_type == "pq" and backend == "faiss" else None
    asked = {k: v for k, v in (params or {}).items() if v is not None}
    # Whatever the backend would refuse is refused now, not after the embedding.
    store_class.validate({"index_type": index_type, "dimension": dim, "index_params": asked},
                         {**(backend_options or {}), "codebooks": codebooks}, len(dataset))
    paths = [dataset.absolute(item).resolve() for item in dataset.items]
    fingerprint = hashlib.sha256(json.dumps([[str(p), i.label, i.group] for p, i in zip(paths, dataset.items)])
                                 .encode()).hexdigest()
    staging = _staging_for(out, {"encoder": encoder, "model_sha256": sha256, "dimension": dim,
                                 "items": fingerprint, "batch": batch})

    done = {int(p.stem.split("_")[1]) for p in staging.glob("batch_*.npz")}
    with tqdm(total=len(paths), initial=min(len(paths), len(done) * batch), unit="img",
              desc=f"embedding {Path(data).name} with {encoder}") as progress:
        batches = (_embed_batches(paths, embedder, batch, done, progress) if ray is None else
                   ray_embedding.embed_batches(paths, embedder, batch=batch, skip=done, address=ray,
                                               workers=ray_workers, engine=ray_engine, triton_url=triton_url,
                                               protocol=protocol, progress=progress))
        for number, embeddings, thumbnails in batches:
            _save_batch(staging / f"batch_{number:06d}.npz", embeddings, thumbnails)
    if _served_model(embedder)[0] != sha256:
        # Triton loaded another version mid-build; the saved batches say which model made
        # them, so the rerun starts over instead of mixing two models' embeddings.
        raise HistoseekError(f"Triton's model {encoder!r} changed while the index was being built; "
                             "run the build again")

    embeddings, thumbnails = [], []
    for number in range(-(-len(paths) // batch)):
        part, thumbs = _load_batch(staging / f"batch_{number:06d}.npz")
        embeddings.append(part)
        thumbnails.extend(thumbs)
    vectors = np.ascontiguousarray(np.concatenate(embeddings), dtype=np.float32)
    items = [_item(i, str(path), entry) for i, (path, entry) in enumerate(zip(paths, dataset.items))]
    manifest = {
        "format": 1, "encoder": encoder, "model_sha256": sha256, "model_version": embedder.version_number(),
        "dimension": dim, "input_size": int(spec["input_size"]), "metric": "inner_product",
        "weights_origin": spec.get("weights_origin", {}), "backend": backend,
        "index_type": index_type, "index_params": asked,
        "count": len(items), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(data.resolve()),
    }
    write_index_folder(out, manifest, vectors, items, thumbnails, _slide_records(data),
                       {**(backend_options or {}), "codebooks": codebooks})
    shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %d items, %s index in %s", out, len(items), index_type, backend)
    return out


def write_index_folder(out: Path, manifest: dict, vectors: np.ndarray, items: list[Item], thumbnails: list[bytes],
                       slides: list[SlideRecord] = (), options: dict | None = None) -> Path:
    """Write (atomically: a whole new folder swapped in) the index folder `out` holding `items`
    (ids set) with their vectors in the manifest's backend; the manifest gets the backend's keys."""
    store_class = backend_class(manifest.get("backend", "faiss"))
    manifest = {**manifest, "count": len(items)}
    with atomic.staged_directory(out) as folder:
        store = Store.create(folder / STORE_FILE)
        store.insert(items, thumbnails)
        store.add_slides(list(slides))
        manifest.update(store_class.create(folder, manifest, vectors, items, {**(options or {}), "index_name": out.name}))
        atomic.write_json(folder / MANIFEST_FILE, manifest)
    return out


def _item(item_id: int, path: str, entry: DatasetItem) -> Item:
    return Item(item_id, path, entry.label, entry.group, entry.split, entry.x, entry.y, entry.source,
                entry.mpp, entry.mosaic)


def _slide_records(data: Path) -> list[SlideRecord]:
    """The slides a dataset's tiles were cut from (its slides.csv), kept in the index so that
    the API can show them: the only slide files it will ever open."""
    try:
        return [SlideRecord(row["slide"], row["label"], row["file"], int(row["width"]), int(row["height"]),
                            float(row["slide_mpp"]), int(row["tile"]), float(row["mpp"]))
                for row in read_slides_table(data)]
    except (KeyError, ValueError) as exc:
        raise HistoseekError(f"{data}/slides.csv is damaged ({exc}); prepare the slides again") from exc


def add_files(folder: IndexFolder, source: Path | list[Path], *, label: str | None, group: str | None,
              triton_url: str, protocol: str, batch: int, repo: Path = Path("model_repository"),
              ray: str | None = None, ray_workers: int | None = None, ray_engine: str | None = None) -> list[int]:
    """Embed a dataset folder or labelled image files and add them to `folder` (with `ray`,
    on Ray: see build_index)."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        dataset = read_dataset(source)
        entries = [(dataset.absolute(i).resolve(), i) for i in dataset.items]
    else:
        files = [Path(p) for p in ([source] if isinstance(source, (str, Path)) else source)]
        if not label:
            raise HistoseekError("images added one by one need a label (--label); a dataset folder brings its own")
        label = text_field("label", label, "--label")
        if group is not None:
            group = text_field("group", group, "--group")
        unreadable = [str(p) for p in files if not is_image_file(p)]
        if unreadable:
            raise HistoseekError(f"missing or not image files ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                                 f"{', '.join(unreadable)}")
        # Without a group each image is its own, as in a folder-per-class dataset.
        entries = [(p.resolve(), DatasetItem(str(p), label, group or str(p.resolve()), source=str(p)))
                   for p in files]
    embedder = ray_embedding.model_source(folder.manifest["encoder"], ray=ray, workers=ray_workers, engine=ray_engine,
                                          triton_url=triton_url, protocol=protocol, batch=batch, repo=repo,
                                          version=folder.manifest.get("model_version"))
    check_model(folder.manifest, folder.name, *_served_model(embedder))
    paths = [path for path, _ in entries]
    embeddings, thumbnails = [], []
    with tqdm(total=len(paths), unit="img", desc=f"embedding for {folder.name}") as progress:
        batches = (_embed_batches(paths, embedder, batch, set(), progress) if ray is None else
                   ray_embedding.embed_batches(paths, embedder, batch=batch, skip=set(), address=ray,
                                               workers=ray_workers, engine=ray_engine, triton_url=triton_url,
                                               protocol=protocol, progress=progress))
        for _, part, thumbs in sorted(batches, key=lambda batch: batch[0]):
            embeddings.append(part)
            thumbnails.extend(thumbs)
    items = [_item(-1, str(path), entry) for path, entry in entries]
    ids = folder.add(np.concatenate(embeddings), items, thumbnails)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        folder.store.add_slides(_slide_records(Path(source)))
    return ids


def add_items(index_dir: Path, source: Path | list[Path], *, label: str | None = None, group: str | None = None,
              triton_url: str = "localhost:8001", protocol: str = "grpc", batch: int = 32,
              repo: Path = Path("model_repository"), ray: str | None = None, ray_workers: int | None = None,
              ray_engine: str | None = None) -> list[int]:
    """Add a dataset folder (labels from it) or image files (all labelled `label`); the new ids.
    With `ray` (a cluster address, "" for a local Ray) the embedding runs on Ray."""
    folder = IndexFolder(Path(index_dir))
    try:
        return add_files(folder, source, label=label, group=group, triton_url=triton_url, protocol=protocol,
                         batch=batch, repo=Path(repo), ray=ray, ray_workers=ray_workers, ray_engine=ray_engine)
    finally:
        folder.close()

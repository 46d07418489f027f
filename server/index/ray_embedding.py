"""Embedding on a Ray cluster: `index build … --ray [ADDRESS]` and `index add … --ray [ADDRESS]`.

The items to embed become a Ray Dataset of (batch number, position, path) rows, the
batches being the single-process build's `--batch` chunks of the item list. A pool of
decoding actors (growing with the queue into the free CPUs) decodes and resizes the images
(`server/index/prepare.py`, as the single-process build does); an
actor pool (Ray Data `map_batches` with an actor class; by default one actor per node
with CPUs, Ray Data spreading them over the nodes) embeds them. Each actor is a Triton client of its node's own Triton
(`--triton-url`, default localhost:8001) or, with `--ray-engine onnxruntime`, an
onnxruntime session of the exported `model.onnx` in the model repository, refused unless
its sha256 is the model's the build records. A killed actor is restarted and its batches
retried by Ray.

Results stream back to the driver, the only process that writes files: a batch is yielded
once all its rows are in, whatever order they arrive in, and rows that arrive twice (a
retry) count once; the build saves it exactly as it saves a batch it embedded itself (same
numbering, same content), so a rerun after a killed driver embeds only the missing batches.

Every node must read the image files at the absolute paths the driver gives (a shared
filesystem), with this project installed in the same environment; with
`--ray-engine onnxruntime` the model repository too. Nothing is written on the nodes.

`ray` is imported only when Ray is asked for: the rest of the project never needs it.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from histoseek.checksum import file_sha256
from histoseek.errors import HistoseekError
from server.embedder import Embedder
from server.index.prepare import prepare_file

log = logging.getLogger(__name__)

ENGINES = ("triton", "onnxruntime")
# Ray scheduling reservations, not limits. An embedding actor mostly waits on Triton
# (onnxruntime's threads ignore reservations anyway); decoding is CPU work but also waits on
# file reads. So a one-CPU node runs an embedding actor and a decoding actor at once, each
# in its own process (a fused actor would decode, then embed, never both at once).
_ACTOR_CPUS = 0.25
_DECODE_CPUS = 0.5
ACTOR_START_TIMEOUT_S = 300


class ModelSource(Protocol):
    """What the build asks of its model: `Embedder` (Triton) or `RepositoryModel`."""

    def spec(self) -> dict: ...
    def version_checksum(self) -> str | None: ...
    def version_number(self) -> int | None: ...


class RepositoryModel:
    """An exported model version read from the model repository, answering what `Embedder`
    answers of a served one (spec, checksum, version): `--ray-engine onnxruntime`'s model,
    so that a build with it needs no Triton. Default version: the latest, which is the one
    Triton serves."""

    def __init__(self, repo: Path, encoder: str, version: int | None = None):
        from export.repository import latest_version_dir  # onnx: imported only when asked for

        model_dir = Path(repo) / encoder
        folder = model_dir / str(version) if version is not None else latest_version_dir(model_dir)
        try:
            exported = json.loads((folder / "encoder.json").read_text())
        except (TypeError, OSError, ValueError) as exc:
            which = f"version {version} of " if version is not None else ""
            raise HistoseekError(f"no exported {which}model {encoder!r} in the model repository {repo} "
                                 f"({getattr(exc, 'strerror', None) or exc}); pass --repo, or export it "
                                 "with `histoseek export`") from None
        self.onnx_path = (folder / "model.onnx").resolve()
        self._sha256, self._version = exported.pop("model_sha256", None), exported.pop("model_version", None)
        self._spec = exported
        checked_onnx(self.onnx_path, self._sha256)

    def spec(self) -> dict:
        return self._spec

    def version_checksum(self) -> str | None:
        return self._sha256

    def version_number(self) -> int | None:
        return self._version


def checked_onnx(path: Path, sha256: str | None) -> Path:
    """`path`, once its sha256 is `sha256`: the model the build records, and no other."""
    try:
        found = file_sha256(path)
    except OSError as exc:
        raise HistoseekError(f"cannot read {path} ({exc.strerror}); every Ray node needs the model "
                             "repository at this path (--repo)") from None
    if found != sha256:
        raise HistoseekError(f"{path} is not the model this index is embedded with (sha256 {found}, expected "
                             f"{sha256}); give every node the same export of the model (--repo)")
    return path


def model_source(encoder: str, *, ray: str | None, workers: int | None, engine: str | None, triton_url: str,
                 protocol: str, batch: int, repo: Path, version: int | None = None) -> ModelSource:
    """The build's model: the Triton at `triton_url`, or with `engine` onnxruntime the exported
    model in `repo` (`version`, default the latest). Refuses Ray options without `--ray`."""
    if ray is None and (workers is not None or engine not in (None, "triton")):
        raise HistoseekError("--ray-workers and --ray-engine need --ray [ADDRESS]")
    if engine not in (None, *ENGINES):
        raise HistoseekError(f"--ray-engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if workers is not None and workers < 1:
        raise HistoseekError(f"--ray-workers must be at least 1, got {workers}")
    if engine == "onnxruntime":
        return RepositoryModel(repo, encoder, version)
    return Embedder(triton_url, encoder, protocol, batch_size=batch)


@dataclass(frozen=True)
class _Model:
    """What each actor needs to embed with the build's model, on its own node."""
    encoder: str
    sha256: str | None
    input_size: int
    dim: int
    engine: str
    triton_url: str
    protocol: str
    onnx_path: str


@dataclass
class RunStats:
    """Counts of one Ray embedding run: tiles per node (node id → tiles), wall seconds."""
    tiles: int = 0
    seconds: float = 0.0
    per_node: Counter = field(default_factory=Counter)
    node_names: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0

    def rate(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        nodes = ", ".join(f"{self.node_names.get(n, n[:8])}: {c} tiles ({c / max(self.seconds, 1e-9):.1f}/s)"
                          for n, c in sorted(self.per_node.items(), key=lambda item: self.node_names.get(item[0], "")))
        return f"{self.tiles} tiles in {self.seconds:.1f}s ({self.rate():.1f} tiles/s); per node: {nodes or 'none'}"


def _node() -> tuple[str, str]:
    """(id, IP address) of this process's Ray node."""
    import ray

    if not ray.is_initialized():
        return "local", "localhost"
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


# Our own errors (an unreadable image, Triton down, another model) travel back to the driver
# as data, in each row's `error`, and the driver raises the first: from an exception Ray
# would hand it only a traceback's text.

def _decode(rows: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Images decoded, resized and cropped as a query is, with their thumbnails."""

    count = len(rows["path"])
    pixels = np.zeros((count, size, size, 3), np.uint8)
    thumbnails, errors = np.full(count, b"", dtype=object), np.full(count, "", dtype=object)
    for i, path in enumerate(rows["path"]):
        try:
            pixels[i], thumbnails[i] = prepare_file(Path(path), size)
        except HistoseekError as exc:
            errors[i] = str(exc)
    return {"number": rows["number"], "position": rows["position"], "thumbnail": thumbnails,
            "pixels": pixels, "error": errors}


class DecodeActor:
    """Ray actor: `_decode` in a process that lives as long as the build.

    Decoding ran in Ray tasks before. A raylet keeps no more idle workers than its node has
    CPUs and kills the others after a second; once decoding fell behind (a build resumed
    after its driver was killed did, every time), each batch's task waited for a fresh
    worker process to start and import everything (about 1.5 s on 2 cores), and a
    90-batch build took 140 s instead of 10. Actors are never reaped as idle workers."""

    def __init__(self, size: int):
        self._size = size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _decode(rows, self._size)


class EmbedActor:
    """Ray actor: embeds decoded rows with the Triton of its node, or an onnxruntime session
    of the exported model, checked to be the build's."""

    def __init__(self, model: _Model, batch: int):
        (self._node, address), self._dim, self._error = _node(), model.dim, ""
        try:
            if model.engine == "onnxruntime":
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as Triton's model.py
                session = ort.InferenceSession(str(checked_onnx(Path(model.onnx_path), model.sha256)),
                                               sess_options=options, providers=["CPUExecutionProvider"])
                self._embed = lambda images: session.run(["embeddings"], {"images": images})[0]
            else:
                embedder = Embedder(model.triton_url, model.encoder, model.protocol, batch_size=batch)
                served = embedder.version_checksum()
                if served != model.sha256:
                    raise HistoseekError(f"Triton at {embedder.url} serves {model.encoder!r} with sha256 {served}, "
                                         f"not the build's {model.sha256}; serve the same model version on "
                                         "every node")
                self._embed = embedder.embed
        except HistoseekError as exc:
            self._error = f"on Ray node {address}: {exc}"

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count, errors = len(rows["number"]), rows["error"]
        embeddings = np.zeros((count, self._dim), np.float32)
        if self._error:
            errors = np.full(count, self._error, dtype=object)
        else:
            try:
                embeddings = np.asarray(self._embed(np.ascontiguousarray(rows["pixels"], dtype=np.uint8)),
                                        dtype=np.float32)
            except HistoseekError as exc:
                errors = np.full(count, str(exc), dtype=object)
        return {"number": rows["number"], "position": rows["position"], "thumbnail": rows["thumbnail"],
                "embedding": embeddings, "node": np.full(count, self._node, dtype=object), "error": errors}


@contextmanager
def _quiet_console(name: str) -> Iterator[None]:
    """Logger `name` writes only errors to the console meanwhile (its log files keep all):
    Ray Data's plan and timings at INFO, where the progress bar and our own lines say enough."""
    importlib.import_module("ray.data")  # which sets up its loggers

    handlers = [h for h in logging.getLogger(name).handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels):
            handler.setLevel(level)


@contextmanager
def connected(address: str) -> Iterator[None]:
    """Ray for this process: a new local one for "" (all of this machine's CPUs), else the
    cluster at `address` ("auto" or HOST:PORT). A connection the caller made already is used
    as it is and left open."""
    import ray

    if ray.is_initialized():
        yield
        return
    hint = (f"cannot reach the Ray cluster at {address}; start one with `ray start --head` "
            "or omit the address")
    if address not in ("", "auto"):
        host, _, port = address.split("://")[-1].rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError):
            raise HistoseekError(hint) from None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if "InvalidAuthToken" in f"{exc} {exc.__cause__}":
            raise HistoseekError(f"the Ray cluster at {address} wants its token (token authentication): run with "
                                 "RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN or ~/.ray/auth_token") from None
        raise HistoseekError(f"{hint} ({exc})" if address else f"cannot start a local Ray ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _dataset(todo: list[tuple[int, list[Path]]], model: _Model, batch: int, workers: int, decoders: int):
    """The rows to embed -> decoded by `workers` to `decoders` actors -> embedded by `workers`
    actors. Ray Data's actor
    pools spread their actors over the nodes and restart a killed one (max_restarts=-1),
    retrying the batches it held (max_task_retries=-1): its defaults, which Ray 2.60 no longer
    lets map_batches name."""
    import ray

    rows = [{"number": number, "position": position, "path": str(path)}
            for number, chunk in todo for position, path in enumerate(chunk)]
    # A dataset keeps a copy of the context it was made in; this process's stays as it was.
    context = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False,  # the build's own tqdm bar counts tiles
                # Start only once every actor is up: work is shared from the start, and a
                # cluster too small for the pool is an error, not a wait forever.
                "wait_for_min_actors_s": ACTOR_START_TIMEOUT_S}
    saved = {key: getattr(context, key) for key in settings}
    try:
        for key, value in settings.items():
            setattr(context, key, value)
        return (ray.data.from_items(rows, override_num_blocks=len(todo))
                .map_batches(DecodeActor, fn_constructor_kwargs={"size": model.input_size}, batch_size=batch,
                             compute=ray.data.ActorPoolStrategy(min_size=workers, max_size=decoders),
                             num_cpus=_DECODE_CPUS)
                .map_batches(EmbedActor, fn_constructor_kwargs={"model": model, "batch": batch}, batch_size=batch,
                             compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=_ACTOR_CPUS))
    finally:
        for key, value in saved.items():
            setattr(context, key, value)


def embed_batches(paths: list[Path], model: ModelSource, *, batch: int, skip: set[int], address: str,
                  workers: int | None, engine: str | None, triton_url: str, protocol: str, progress=None,
                  stats: RunStats | None = None) -> Iterator[tuple[int, np.ndarray, list[bytes]]]:
    """(batch number, embeddings, thumbnails) for every `batch`-sized chunk of `paths` whose
    number is not in `skip`, embedded on the Ray cluster at `address` ("" starts a local Ray)
    by `workers` actors (default: one per node). The batches come in any order; each once.
    `progress` (tqdm) counts tiles; `stats` receives the counts per node."""
    import ray

    todo = [(number, paths[start:start + batch])
            for number, start in enumerate(range(0, len(paths), batch)) if number not in skip]
    if not todo:
        return
    spec = model.spec()
    engine = engine or "triton"
    actor_model = _Model(str(spec["name"]), model.version_checksum(), int(spec["input_size"]),
                         int(spec["embedding_dim"]), engine, triton_url, protocol,
                         str(getattr(model, "onnx_path", "")))
    stats = stats if stats is not None else RunStats()
    sizes = {number: len(chunk) for number, chunk in todo}
    with connected(address):
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        stats.node_names = {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in nodes}
        workers = workers or max(1, sum(n["Resources"].get("CPU", 0) > 0 for n in nodes))
        cpus = ray.cluster_resources().get("CPU", 0)
        if workers * (_ACTOR_CPUS + _DECODE_CPUS) > cpus:
            raise HistoseekError(f"{workers} embedding actors and as many decoding actors take "
                                 f"{workers * (_ACTOR_CPUS + _DECODE_CPUS):g} CPUs, more than the Ray cluster's "
                                 f"{cpus:g}; ask for fewer with --ray-workers, or add nodes")
        # Decoding scales up with the queue into the CPUs the embedding actors leave free, less
        # as much again, so that a killed embedding actor always finds room to restart.
        decoders = max(workers, int((cpus - 2 * workers * _ACTOR_CPUS) // _DECODE_CPUS))
        log.info("embedding %d batches (%d tiles; %d saved already) on Ray with %d %s actors on %d nodes",
                 len(todo), sum(sizes.values()), len(skip), workers, engine, len(nodes),
                 extra={"ray_batches": len(todo), "ray_saved": len(skip)})
        start = time.monotonic()
        try:
            with _quiet_console("ray.data"):
                yield from _collect(_dataset(todo, actor_model, batch, workers, decoders), sizes, stats, start,
                                    progress)
        except ray.exceptions.GetTimeoutError:
            raise HistoseekError(f"the Ray cluster did not start {workers} embedding actors within "
                                 f"{ACTOR_START_TIMEOUT_S}s (each takes {_ACTOR_CPUS} CPU, and each decoding actor "
                                 f"{_DECODE_CPUS}); ask for fewer with --ray-workers, or add nodes") from None
        stats.seconds = time.monotonic() - start
    if sizes:
        raise HistoseekError(f"Ray returned no embeddings for batches {sorted(sizes)}; run the build again "
                             "(it embeds only the missing batches)")
    log.info("embedded on Ray: %s", stats.summary(), extra={"ray_stats": stats})


def _collect(dataset, sizes: dict[int, int], stats: RunStats, start: float,
             progress) -> Iterator[tuple[int, np.ndarray, list[bytes]]]:
    """Each batch of `sizes` (number → row count) once all its rows are in, whatever order they
    come in; a row that comes again (a retried batch) counts once. Yielded batches leave `sizes`."""
    pending: dict[int, dict[int, tuple[np.ndarray, bytes]]] = {}
    for rows in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        failed = [error for error in rows["error"] if error]
        if failed:
            raise HistoseekError(failed[0])
        for number, position, embedding, thumbnail, node in zip(
                rows["number"].tolist(), rows["position"].tolist(), rows["embedding"], rows["thumbnail"], rows["node"]):
            got = pending.setdefault(number, {}) if number in sizes else None
            if got is None or position in got:
                stats.duplicates += 1
                continue
            got[position] = (embedding, bytes(thumbnail))
            stats.per_node[node] += 1
            stats.tiles += 1
            if progress is not None:
                progress.update(1)
            if len(got) == sizes[number]:
                del pending[number], sizes[number]
                stats.seconds = time.monotonic() - start
                yield number, np.stack([got[i][0] for i in range(len(got))]), [got[i][1] for i in range(len(got))]
        if progress is not None:
            progress.set_postfix_str(", ".join(f"{stats.node_names.get(n, n[:8])}: {c}"
                                               for n, c in sorted(stats.per_node.items())))


@dataclass
class RayEmbeddings:
    embeddings: np.ndarray  # [N, D] float32, in the order of the paths
    stats: RunStats


def embed_paths(paths: list[Path], encoder: str, *, address: str = "", workers: int | None = None,
                engine: str = "triton", triton_url: str = "localhost:8001", protocol: str = "grpc",
                repo: Path = Path("model_repository"), batch: int = 32) -> RayEmbeddings:
    """Embed image files on Ray with `workers` actors: the embeddings in order and the
    per-node counts and wall time (for `histoseek bench scale`). The files must be readable
    at these paths on every node. Keep one Ray connection across calls by calling
    `ray.init(address=…)` first; otherwise each call connects (or, for "", starts Ray) anew."""
    paths = [Path(p).resolve() for p in paths]
    model = model_source(encoder, ray=address, workers=workers, engine=engine, triton_url=triton_url,
                         protocol=protocol, batch=batch, repo=repo)
    stats, parts = RunStats(), {}
    for number, embeddings, _ in embed_batches(paths, model, batch=batch, skip=set(), address=address,
                                               workers=workers, engine=engine, triton_url=triton_url,
                                               protocol=protocol, stats=stats):
        parts[number] = embeddings
    dim = int(model.spec()["embedding_dim"])
    vectors = np.concatenate([parts[n] for n in sorted(parts)]) if parts else np.zeros((0, dim), np.float32)
    return RayEmbeddings(vectors, stats)

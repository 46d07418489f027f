"""Embedding on Ray (server/index/ray_embedding.py): `index build/add --ray` against the single-process build.

The slow tests share one real two-node Ray cluster on loopback (`ray start --head` and a
second `ray start --address=…`, one CPU each, in processes of their own) and the session's
Triton serving `tiny`: a build through the cluster must give the single-process build's ids,
rows and vectors, with both nodes embedding, and survive a killed embedding actor and a
killed driver (whose rerun embeds only the batches it had not saved). Ray's token
authentication is off for this loopback cluster (RAY_AUTH_MODE=disabled, its drivers too).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from histoseek.errors import HistoseekError
from histoseek.processes import descendants, kill_tree
from server.index import ray_embedding
from server.index.backends.faiss_backend import stored_vectors
from server.index.build import add_items, build_index
from server.index.prepare import prepare_file
from server.embedder import Embedder
from tests.servers import distinct_free_ports

BIN = Path(sys.executable).parent
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
EMBED_ACTOR = "MapBatches(EmbedActor)"  # in the process title of each embedding actor
# Ray Data sets its context's deprecated keys whenever it copies the context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


@dataclass
class Cluster:
    address: str
    nodes: list[subprocess.Popen]


def _embedding_actors(cluster: Cluster) -> dict[int, str]:
    return {pid: args for pid, args in descendants([n.pid for n in cluster.nodes]).items() if EMBED_ACTOR in args}


def _nodes_with_embedding_actors(cluster: Cluster) -> set[int]:
    """Which of the cluster's nodes (by position) run an embedding actor now."""
    return {i for i, node in enumerate(cluster.nodes)
            if any(EMBED_ACTOR in args for args in descendants([node.pid]).values())}


@pytest.fixture(scope="module")
def ray_cluster() -> Cluster:
    """Two Ray nodes with one CPU each on this machine, on free ports (two clusters of
    concurrent test runs must not meet); stopped, their processes and all, at the end."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, **NO_AUTH}
    port, *ports = distinct_free_ports(12)
    common = ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]

    def start(name: str, *options: str) -> subprocess.Popen:
        with open(temp / f"{name}.log", "wb") as log:
            return subprocess.Popen([str(BIN / "ray"), "start", *options, *common], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)

    head = start("head", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                 f"--ray-client-server-port={ports[0]}", f"--dashboard-port={ports[1]}",
                 f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
                 f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}")
    address = f"127.0.0.1:{port}"
    node = start("node", f"--address={address}", f"--dashboard-agent-listen-port={ports[6]}",
                 f"--dashboard-agent-grpc-port={ports[7]}", f"--metrics-export-port={ports[8]}",
                 f"--runtime-env-agent-port={ports[9]}")
    cluster = Cluster(address, [head, node])
    with pytest.MonkeyPatch.context() as env_patch:
        env_patch.setenv("RAY_AUTH_MODE", "disabled")  # the builds this process drives
        try:
            deadline = time.monotonic() + 180
            while True:
                assert all(n.poll() is None for n in cluster.nodes) and time.monotonic() < deadline, (
                    "the Ray cluster did not start: " + (temp / "head.log").read_text()[-3000:]
                    + (temp / "node.log").read_text()[-3000:])
                try:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                    alive = sum(n["Alive"] for n in ray.nodes())
                    ray.shutdown()
                    if alive == 2:
                        break
                except ConnectionError:
                    pass
                time.sleep(1)
            yield cluster
        finally:
            ray.shutdown()
            # Nothing of a test cluster needs a graceful stop, and `ray stop` would stop every
            # Ray on this machine: each of its processes is killed by pid.
            kill_tree(cluster.nodes)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def many_tiles(tmp_path_factory) -> Path:
    """90 synthetic tiles: embedded one a batch, enough batches to kill something mid-build."""
    from training.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("many") / "tiles"
    synthesize(out, classes=3, per_class=30, size=64, seed=2)
    return out


@pytest.fixture(scope="module")
def many_reference(tmp_path_factory, many_tiles, triton_server) -> Path:
    """The single-process build of `many_tiles`."""
    return build_index("tiny", many_tiles, tmp_path_factory.mktemp("reference") / "many",
                       triton_url=triton_server.grpc_url, batch=1)


def _rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "items.sqlite") as db:
        return db.execute("SELECT * FROM items ORDER BY id").fetchall()


def assert_same_index(built: Path, reference: Path) -> None:
    """Same ids, item rows (thumbnails included) and manifest model; vectors within 1e-5."""
    assert _rows(built) == _rows(reference)
    np.testing.assert_allclose(stored_vectors(built), stored_vectors(reference), rtol=0, atol=1e-5)
    manifests = [__import__("json").loads((path / "manifest.json").read_text()) for path in (built, reference)]
    for key in ("encoder", "model_sha256", "model_version", "dimension", "count", "index_type"):
        assert manifests[0][key] == manifests[1][key], key


def _ray_records(caplog, key: str) -> list:
    return [getattr(r, key) for r in caplog.records if r.name == "server.index.ray_embedding" and hasattr(r, key)]


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.embedding"


def _saved(out: Path) -> int:
    return len(list(_staging(out).glob("batch_*.npz")))


# -- without a cluster ----------------------------------------------------------------------

def _onnx_model(model: ray_embedding.RepositoryModel, sha256: str) -> ray_embedding._Model:
    """What an onnxruntime actor is given: `model`'s file, expected to have `sha256`."""
    return ray_embedding._Model(encoder="tiny", sha256=sha256, input_size=8, dim=16, engine="onnxruntime",
                                triton_url="", protocol="grpc", onnx_path=str(model.onnx_path))


def test_onnxruntime_engine_refuses_another_model(tmp_path, triton_repo):
    """The exported model.onnx must be the one the build records, on the driver and on each node."""
    repo = Path(shutil.copytree(triton_repo, tmp_path / "repo"))
    model = ray_embedding.RepositoryModel(repo, "tiny")
    expected = model.version_checksum()
    with open(model.onnx_path, "ab") as f:
        f.write(b"\0")  # another file now
    with pytest.raises(HistoseekError, match=r"model\.onnx is not the model this index is embedded with"):
        ray_embedding.RepositoryModel(repo, "tiny")
    # An actor on a node whose copy differs answers with the error, which the driver raises.
    actor = ray_embedding.EmbedActor(_onnx_model(model, sha256=expected), batch=4)
    rows = actor({"number": np.array([0]), "position": np.array([0]), "thumbnail": np.array([b"x"], dtype=object),
                  "pixels": np.zeros((1, 8, 8, 3), np.uint8), "error": np.array([""], dtype=object)})
    assert "is not the model this index is embedded with" in rows["error"][0]
    assert rows["error"][0].startswith("on Ray node ")


@pytest.mark.slow
def test_onnxruntime_engine_embeds_as_triton_does(triton_repo, triton_server, synth_data):
    """The same exported model in-process gives Triton's vectors (the engine behind the actors)."""
    model = ray_embedding.RepositoryModel(triton_repo, "tiny")
    actor = ray_embedding.EmbedActor(_onnx_model(model, sha256=model.version_checksum()), batch=4)
    images = np.stack([prepare_file(path, 8)[0] for path in sorted(synth_data.rglob("*.png"))[:6]])
    rows = actor({"number": np.zeros(6), "position": np.arange(6), "thumbnail": np.full(6, b"", dtype=object),
                  "pixels": images, "error": np.full(6, "", dtype=object)})
    assert not any(rows["error"])
    np.testing.assert_allclose(rows["embedding"], Embedder(triton_server.grpc_url, "tiny").embed(images),
                               rtol=0, atol=1e-5)


def test_an_unreadable_image_is_the_error_the_driver_raises(tmp_path, synth_data):
    """Errors travel as data (Ray would hand the driver a traceback's text): the message is ours."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = sorted(synth_data.rglob("*.png"))[0]
    rows = ray_embedding._decode({"number": np.array([0, 0]), "position": np.array([0, 1]),
                                  "path": np.array([str(good), str(broken)])}, size=8)
    assert rows["pixels"].shape == (2, 8, 8, 3) and rows["error"][0] == ""
    assert rows["error"][1].startswith(f"{broken} is not a readable image")

    class Finished:
        def iter_batches(self, **_):
            yield {**rows, "embedding": np.zeros((2, 16), np.float32), "node": np.array(["a", "a"], dtype=object)}

    with pytest.raises(HistoseekError, match=f"^{broken} is not a readable image"):
        list(ray_embedding._collect(Finished(), {0: 2}, ray_embedding.RunStats(), time.monotonic(), None))


def test_unreachable_cluster_is_one_clear_error(tmp_path, synth_data, triton_repo, capsys):
    from histoseek_cli.main import main
    from tests.servers import distinct_free_ports as ports

    address = f"127.0.0.1:{ports(1)[0]}"
    with pytest.raises(SystemExit):
        main(["index", "build", "--encoder", "tiny", "--data", str(synth_data), "--out", str(tmp_path / "out"),
              "--repo", str(triton_repo), "--ray", address, "--ray-engine", "onnxruntime"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot reach the Ray cluster at {address}; start one with `ray start --head` or omit the address")


def test_ray_options_need_ray(tmp_path, synth_data):
    with pytest.raises(HistoseekError, match="--ray-workers and --ray-engine need --ray"):
        build_index("tiny", synth_data, tmp_path / "out", ray_workers=2)


# -- on the two-node cluster ----------------------------------------------------------------

@pytest.mark.slow
def test_cluster_build_equals_single_process(tmp_path, synth_data, triton_server, ray_cluster, caplog):
    caplog.set_level(logging.INFO, logger="server.index.ray_embedding")
    single = build_index("tiny", synth_data, tmp_path / "single", triton_url=triton_server.grpc_url, batch=2)
    hosts: set[int] = set()
    with ThreadPoolExecutor(1) as pool:
        build = pool.submit(build_index, "tiny", synth_data, tmp_path / "ray", triton_url=triton_server.grpc_url,
                            batch=2, ray=ray_cluster.address)
        while not build.done():
            hosts |= _nodes_with_embedding_actors(ray_cluster)
            time.sleep(0.05)
        on_ray = build.result()
    assert_same_index(on_ray, single)
    assert not _staging(on_ray).exists()
    # One embedding actor per node. Which of them embeds a batch is Ray Data's choice: it
    # hands a decoded batch to the actor beside it, so 12 small batches may all stay on the
    # node that decoded them (CI saw that once); a build that queues work uses both.
    assert hosts == {0, 1}, hosts
    [stats] = _ray_records(caplog, "ray_stats")
    assert stats.tiles == 24 and stats.duplicates == 0 and sum(stats.per_node.values()) == 24, stats.summary()


@pytest.mark.slow
def test_embed_paths_on_the_cluster_with_onnxruntime(triton_repo, triton_server, synth_data, ray_cluster):
    """The benchmark's entry: vectors in path order, per-node counts; no Triton on the nodes."""
    paths = sorted(synth_data.rglob("*.png"))
    result = ray_embedding.embed_paths(paths, "tiny", address=ray_cluster.address, workers=2,
                                       engine="onnxruntime", repo=triton_repo, batch=3)
    images = np.stack([prepare_file(path, 8)[0] for path in paths])
    np.testing.assert_allclose(result.embeddings, Embedder(triton_server.grpc_url, "tiny").embed(images),
                               rtol=0, atol=1e-5)
    assert sum(result.stats.per_node.values()) == len(paths) and result.stats.seconds > 0


@pytest.mark.slow
def test_a_killed_embedding_actor_loses_nothing(tmp_path, many_tiles, many_reference, triton_server, ray_cluster,
                                                caplog):
    caplog.set_level(logging.INFO, logger="server.index.ray_embedding")
    out = tmp_path / "ray"
    with ThreadPoolExecutor(1) as pool:
        build = pool.submit(build_index, "tiny", many_tiles, out, triton_url=triton_server.grpc_url, batch=1,
                            ray=ray_cluster.address)
        deadline = time.monotonic() + 120
        while _saved(out) == 0:  # both actors are up once the first batch is saved
            assert not build.done() and time.monotonic() < deadline, build.exception(0) if build.done() else ""
            time.sleep(0.02)
        # The victim is one embedding a batch now (its title names the task): Ray must retry
        # that batch on the restarted actor, so the build cannot end before the restart. An
        # idle victim proves nothing: the other actor may finish the build before Ray has
        # started a new process (CI saw that once).
        while True:
            actors = _embedding_actors(ray_cluster)
            assert len(actors) == 2, actors
            busy = [pid for pid, title in actors.items() if title.endswith(".submit")]
            if busy:
                break
            assert not build.done() and time.monotonic() < deadline, "no embedding actor was ever busy"
            time.sleep(0.005)
        os.kill(busy[0], signal.SIGKILL)
        assert not build.done() and _saved(out) < 90, "the build ended before the kill"
        restarted = set()
        while not build.done():
            restarted |= set(_embedding_actors(ray_cluster)) - set(actors)
            time.sleep(0.02)
        assert build.result() == out
    assert restarted, "Ray did not start the killed actor again"
    assert_same_index(out, many_reference)
    [stats] = _ray_records(caplog, "ray_stats")
    assert stats.tiles == 90  # each tile once, whatever Ray retried


@pytest.mark.slow
def test_a_killed_driver_resumes_with_the_missing_batches(tmp_path, many_tiles, many_reference, triton_server,
                                                          ray_cluster, caplog):
    out = tmp_path / "ray"
    command = [str(BIN / "histoseek"), "index", "build", "--encoder", "tiny", "--data", str(many_tiles),
               "--out", str(out), "--triton-url", triton_server.grpc_url, "--batch", "1", "--ray", ray_cluster.address]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **NO_AUTH},
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _saved(out) < 3:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.02)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    saved = _saved(out)
    assert 3 <= saved < 90, "the driver finished before it was killed"

    caplog.set_level(logging.INFO, logger="server.index.ray_embedding")
    build_index("tiny", many_tiles, out, triton_url=triton_server.grpc_url, batch=1, ray=ray_cluster.address)
    assert _ray_records(caplog, "ray_saved") == [saved]
    assert _ray_records(caplog, "ray_batches") == [90 - saved]
    [stats] = _ray_records(caplog, "ray_stats")
    assert stats.tiles == 90 - saved
    assert_same_index(out, many_reference)


@pytest.mark.slow
def test_index_add_on_a_local_ray(tmp_path, tissue_index, synth_data, triton_server, caplog):
    """`index add --ray` with no address: a Ray of this machine's own, gone afterwards."""
    import ray

    caplog.set_level(logging.INFO, logger="server.index.ray_embedding")
    single, on_ray = (Path(shutil.copytree(tissue_index, tmp_path / name)) for name in ("single", "ray"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # else the local Ray writes a token into ~/.ray
        ids = add_items(on_ray, synth_data, triton_url=triton_server.grpc_url, batch=4, ray="")
    assert not ray.is_initialized()
    assert ids == add_items(single, synth_data, triton_url=triton_server.grpc_url, batch=4) == list(range(24, 48))
    assert_same_index(on_ray, single)
    [stats] = _ray_records(caplog, "ray_stats")
    assert stats.tiles == 24

"""Embedder against a real Triton, over HTTP and gRPC; errors without a server."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from export.repository import model_checksum, write_model_version
from histoseek.errors import HistoseekError
from server.embedder import Embedder, InvalidImages, ModelNotFound, TritonUnavailable
from server.triton import free_port
from tests.servers import distinct_free_ports

PROTOCOLS = ["http", "grpc"]


def url(info, protocol: str) -> str:
    return info.http_url if protocol == "http" else info.grpc_url


def random_images(count: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def in_process(onnx_path, images: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(onnx_path)).run(["embeddings"], {"images": images})[0]


def inference_counts(info, model: str) -> tuple[int, int]:
    """(requests answered, model executions) so far: fewer executions means batching."""
    stats = httpclient.InferenceServerClient(info.http_url).get_inference_statistics(model)
    (entry,) = stats["model_stats"]
    return entry["inference_stats"]["success"]["count"], entry["execution_count"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embeddings_equal_onnxruntime(triton_server, tiny_onnx, protocol):
    embedder = Embedder(url(triton_server, protocol), "tiny", protocol, batch_size=32)
    images = random_images(70)  # three requests: 32 + 32 + 6
    assert embedder.ready()

    embeddings = embedder.embed(images)

    assert embeddings.dtype == np.float32 and embeddings.shape == (70, 16)
    np.testing.assert_allclose(embeddings, in_process(tiny_onnx, images), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert embedder.embed(images[:0]).shape == (0, 16)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spec_and_checksum_come_from_the_server(triton_server, triton_repo, served_specs, protocol):
    embedder = Embedder(url(triton_server, protocol), "tiny", protocol)
    assert embedder.spec() == served_specs["tiny"]
    assert embedder.version_checksum() == model_checksum(triton_repo / "tiny" / "1")
    assert embedder.version_number() == 1


@pytest.fixture(scope="module")
def batching_triton(tmp_path_factory, tiny_onnx, served_specs):
    """`tiny` on its own Triton, exported with a 200 ms batching window: the shared one's
    exported default (no window) only batches requests that queue behind a busy model,
    which the tiny model never is, so whether requests meet there is up to timing."""
    from server import triton

    repo = tmp_path_factory.mktemp("batching_repo")
    write_model_version(repo, served_specs["tiny"], tiny_onnx, queue_delay_us=200_000)
    run_dir = tmp_path_factory.mktemp("batching_run")
    http_port, grpc_port, metrics_port = distinct_free_ports(3)
    yield triton.start(repo, run_dir=run_dir, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    triton.stop(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_requests_are_batched_and_answered_right(batching_triton, tiny_onnx, protocol):
    triton_server = batching_triton
    embedder = Embedder(url(triton_server, protocol), "tiny", protocol)
    embedder.spec()  # fetch once, so that the threads start with inference
    threads, images = 16, [random_images(3, seed=i) for i in range(16)]
    results: list[np.ndarray | None] = [None] * threads
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = embedder.embed(images[i])

    requests_before, executions_before = inference_counts(triton_server, "tiny")
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    requests_after, executions_after = inference_counts(triton_server, "tiny")

    for i in range(threads):
        np.testing.assert_allclose(results[i], in_process(tiny_onnx, images[i]), atol=1e-5)
    assert requests_after - requests_before == threads
    assert executions_after - executions_before < threads  # dynamic batching joined some


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_lists_what_is_served(triton_server, protocol):
    with pytest.raises(ModelNotFound, match="it serves: tiny, tiny_spare"):
        Embedder(url(triton_server, protocol), "nope", protocol).embed(random_images(1))


@pytest.mark.slow
def test_wrong_images_name_the_expected_size(triton_server):
    embedder = Embedder(triton_server.grpc_url, "tiny")
    with pytest.raises(InvalidImages, match=r"\[N, 8, 8, 3\]"):
        embedder.embed(random_images(2, size=9))
    with pytest.raises(InvalidImages, match="uint8"):
        embedder.embed(random_images(2).astype(np.float32))


@pytest.mark.slow
def test_new_version_loads_into_the_running_server(
    triton_server, triton_repo, served_specs, make_tiny_onnx
):
    spec = served_specs["tiny_spare"]
    embedder = Embedder(triton_server.grpc_url, "tiny_spare")
    before = embedder.version_checksum()
    retrained = make_tiny_onnx(spec["input_size"], spec["embedding_dim"], seed=2)
    version_dir = write_model_version(triton_repo, spec, retrained)

    # Explicit model control: a load request swaps in the latest version, no restart.
    httpclient.InferenceServerClient(triton_server.http_url).load_model("tiny_spare")

    assert embedder.version_checksum() == model_checksum(version_dir) != before
    images = random_images(5, size=spec["input_size"])
    np.testing.assert_allclose(embedder.embed(images), in_process(retrained, images), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unloaded_model_is_unavailable(triton_server, served_specs, protocol):
    admin = httpclient.InferenceServerClient(triton_server.http_url)
    embedder = Embedder(url(triton_server, protocol), "tiny_spare", protocol)
    admin.unload_model("tiny_spare")
    try:
        assert not embedder.ready()
        with pytest.raises(TritonUnavailable, match="'tiny_spare' .* is not ready"):
            embedder.embed(random_images(1, size=served_specs["tiny_spare"]["input_size"]))
    finally:
        admin.load_model("tiny_spare")
    assert embedder.ready()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_server_is_triton_unavailable_quickly(protocol):
    embedder = Embedder(f"localhost:{free_port()}", "tiny", protocol)
    started = time.monotonic()
    with pytest.raises(TritonUnavailable, match="histoseek triton start"):
        embedder.embed(random_images(1))
    assert not embedder.ready()
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_silent_server_times_out(protocol):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        embedder = Embedder(f"127.0.0.1:{silent.getsockname()[1]}", "tiny", protocol, timeout=0.5)
        with pytest.raises(TritonUnavailable, match="did not answer within 0.5s"):
            embedder.spec()


def test_unknown_protocol_is_refused():
    with pytest.raises(HistoseekError, match="protocol"):
        Embedder("localhost:8001", "tiny", protocol="websocket")

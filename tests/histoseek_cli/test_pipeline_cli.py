"""The README's part-1 pipeline through the real command line:
synth -> train -> export -> triton start -> embed over gRPC and HTTP -> triton stop."""
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from histoseek.dataset import read_dataset
from histoseek.imaging import load_model_input


def histoseek(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "histoseek_cli", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"histoseek {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_synth_train_export_serve_embed(tmp_path, free_ports):
    data, ckpt, repo, run = tmp_path / "data", tmp_path / "ckpt", tmp_path / "repo", tmp_path / "run"
    histoseek("data", "synth", "--out", data, "--classes", "3", "--per-class", "6", "--size", "64")
    histoseek("train", "--encoder", "dino", "--data", data, "--out", ckpt, "--epochs", "1",
              "--batch-size", "9", "--workers", "0")
    out = histoseek("export", "--checkpoint", ckpt, "--repo", repo)
    assert "max abs diff" in out.stdout
    histoseek("triton", "start", "--repo", repo, "--run-dir", run, "--http-port", free_ports["http_port"],
              "--grpc-port", free_ports["grpc_port"], "--metrics-port", free_ports["metrics_port"])
    try:
        images = [read_dataset(data).absolute(item) for item in read_dataset(data).items[:4]]
        session = ort.InferenceSession(str(repo / "dino" / "1" / "model.onnx"))
        expected = session.run(None, {"images": np.stack([load_model_input(p, 224) for p in images])})[0]
        for protocol, port in (("grpc", free_ports["grpc_port"]), ("http", free_ports["http_port"])):
            npy = tmp_path / f"{protocol}.npy"
            printed = histoseek("embed", *images, "--model", "dino", "--protocol", protocol,
                                "--triton-url", f"localhost:{port}", "--out", npy)
            assert printed.stdout.count("dim 1280, norm 1.0000") == len(images)  # the cpu preset: EfficientNet-Lite0
            np.testing.assert_allclose(np.load(npy), expected, atol=1e-5)
        assert '"ready": true' in histoseek("triton", "status", "--run-dir", run).stdout
    finally:
        histoseek("triton", "stop", "--run-dir", run)
    assert '"running": false' in histoseek("triton", "status", "--run-dir", run).stdout
    down = histoseek("embed", images[0], "--triton-url", f"localhost:{free_ports['grpc_port']}", check=False)
    assert down.returncode == 2 and "histoseek triton start" in down.stderr


def test_cli_errors_are_one_clear_line(tmp_path):
    result = histoseek("export", "--checkpoint", tmp_path / "none", "--repo", tmp_path / "repo", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    listing = histoseek("encoders").stdout
    for name in ("dino", "simclr", "nnclr", "barlowtwins", "swav", "dml", "clip"):
        assert f"{name}: " in listing
    assert "input=64px" in listing and "labels=required" in listing

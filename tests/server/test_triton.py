"""Starting, inspecting and stopping a real Triton (the pip `tritonserver`)."""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from histoseek.errors import HistoseekError
from server import triton


@pytest.mark.slow
def test_status_of_running_server(triton_server):
    state = triton.status(Path(triton_server.run_dir))
    assert state["running"] and state["ready"]
    assert (state["pid"], state["http_port"]) == (triton_server.pid, triton_server.http_port)
    assert "successfully loaded 'tiny'" in Path(state["log"]).read_text()


@pytest.mark.slow
def test_second_start_on_same_run_dir_is_refused(triton_server, free_ports):
    with pytest.raises(HistoseekError, match=f"already runs .*pid {triton_server.pid}"):
        triton.start(Path(triton_server.repo), run_dir=Path(triton_server.run_dir), **free_ports)
    assert triton.status(Path(triton_server.run_dir))["ready"]


def test_busy_port_is_refused_before_launch(tmp_path, triton_repo, free_ports):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", free_ports["grpc_port"]))
        squatter.listen()
        started = time.monotonic()
        busy = f"grpc port {free_ports['grpc_port']} is already in use"
        with pytest.raises(HistoseekError, match=busy):
            triton.start(triton_repo, run_dir=tmp_path, **free_ports)
    assert time.monotonic() - started < 2
    assert not (tmp_path / triton.RECORD).exists()


def test_missing_triton_env_says_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSEEK_TRITON_ENV", str(tmp_path / "nowhere"))
    with pytest.raises(HistoseekError, match="make setup"):
        triton.default_triton_env()


def test_empty_repository_is_refused(tmp_path, free_ports):
    with pytest.raises(HistoseekError, match="no models"):
        triton.start(tmp_path, run_dir=tmp_path / "run", **free_ports)


def test_stop_without_server_is_a_no_op(tmp_path):
    assert triton.stop(tmp_path) is False
    assert triton.status(tmp_path) == {"running": False, "ready": False, "run_dir": str(tmp_path)}


@pytest.mark.slow
def test_start_then_stop_ends_the_process_group(tmp_path, triton_repo, free_ports):
    info = triton.start(triton_repo, run_dir=tmp_path, **free_ports)
    assert triton.status(tmp_path)["ready"]

    assert triton.stop(tmp_path) is True
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)
    with pytest.raises(ProcessLookupError):  # no python-backend stub left behind
        os.killpg(info.pid, 0)
    assert not (tmp_path / triton.RECORD).exists()
    assert triton.status(tmp_path)["running"] is False


@pytest.mark.slow
def test_model_that_fails_to_load_reports_the_log(tmp_path, triton_repo, free_ports):
    repo = tmp_path / "repo"
    shutil.copytree(triton_repo, repo)
    (repo / "tiny" / "1" / "model.onnx").write_bytes(b"not an onnx file")

    with pytest.raises(HistoseekError) as failure:
        triton.start(repo, run_dir=tmp_path / "run", **free_ports)
    message = str(failure.value)
    assert "Triton exited" in message and "failed to load 'tiny'" in message
    assert "CudaDriverHelper" not in message  # no-GPU noise is filtered out
    assert not (tmp_path / "run" / triton.RECORD).exists()

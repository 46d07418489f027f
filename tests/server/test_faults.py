"""Faults: Triton stopped or killed under a running API, index edits SIGKILLed mid-write,
an index edited by another process while the API serves it. Nothing may be lost or corrupted."""
from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from server import triton
from server.app import Settings, create_app
from server.index import build_index
from server.triton import free_port

pytestmark = pytest.mark.slow  # every test here starts Triton, a server or CLI processes


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def serve_api():
    """Factory: serve_api(indexes_dir, triton_url, protocol, settings) -> base URL of uvicorn on loopback."""
    servers = []

    def serve(indexes_dir: Path, triton_url: str, protocol: str = "grpc", settings: Settings | None = None) -> str:
        app = create_app(indexes_dir, triton_url, protocol, settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{server.config.port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def wait_for(check, timeout: float, interval: float = 0.25):
    """Poll `check` until it returns something truthy; the elapsed seconds, or fail."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not recovered within {timeout}s"
        time.sleep(interval)
    return time.monotonic() - started


# -- Triton stopped or killed while the API runs ------------------------------------------------

def kill_triton(run_dir: Path) -> None:
    """What a crash or `kill -9` leaves: Triton and its backend stubs gone, no clean shutdown.
    The shared memory regions it leaves behind are removed, as an operator's restart would."""
    record = triton.status(run_dir)
    pid = record["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    prefix = next(a.split("=", 1)[1] for a in cmdline if "shm-region-prefix-name" in a)
    os.killpg(pid, signal.SIGKILL)
    while triton.status(run_dir)["running"]:  # also reaps it
        time.sleep(0.05)
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


# gRPC retries a lost server with exponential backoff (up to 120 s apart by default); after
# 10 s down, the default schedule would next retry ~5 s after Triton is back.
@pytest.mark.parametrize("protocol, down_s", [("grpc", 10), ("http", 1)])
def test_api_recovers_when_triton_is_stopped_killed_and_restarted(
        tmp_path, triton_repo, synth_data, serve_api, protocol, down_s):
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    run_dir = tmp_path / "triton"
    info = triton.start(triton_repo, run_dir=run_dir, **ports)
    try:
        build_index("tiny", synth_data, tmp_path / "indexes" / "tissue", triton_url=info.grpc_url, batch=8)
        timeout = 5  # the API's Triton timeout: no request may hang longer than this
        url = info.grpc_url if protocol == "grpc" else info.http_url
        api = serve_api(tmp_path / "indexes", url, protocol,
                        Settings(triton_timeout_s=timeout, model_check_interval_s=1))
        query = {"image": ("q.png", (synth_data / "stroma" / "stroma_0003.png").read_bytes())}
        with httpx.Client(base_url=api, timeout=3 * timeout) as client:
            def search_ok() -> bool:
                response = client.post("/v1/search", files=query, data={"k": "3"})
                return response.status_code == 200 and response.json()["results"][0]["score"] > 0.999

            def unavailable_says_why() -> None:
                started = time.monotonic()
                ready = client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
                assert "Triton" in ready.json()["error"], ready.text
                search = client.post("/v1/search", files=query)
                assert search.status_code == 503, search.text
                assert "histoseek triton start" in search.json()["error"], search.text
                assert time.monotonic() - started < 2 * timeout
                assert client.get("/v1/indexes").json()[0]["count"] == 24  # served from the index alone

            assert search_ok() and client.get("/readyz").status_code == 200
            # SIGTERM (a clean stop), then SIGKILL (a crash) and a longer outage
            for stop, outage_s in ((triton.stop, 1), (kill_triton, down_s)):
                stop(run_dir)
                down_since = time.monotonic()
                while time.monotonic() - down_since < outage_s:
                    unavailable_says_why()
                    time.sleep(0.5)
                triton.start(triton_repo, run_dir=run_dir, **ports)  # the same ports; the API keeps running
                wait_for(lambda: client.get("/readyz").status_code == 200, timeout=4)
                assert search_ok()
    finally:
        if triton.status(run_dir)["running"]:
            kill_triton(run_dir)  # a clean stop waits out the API's open HTTP connections (10 s)

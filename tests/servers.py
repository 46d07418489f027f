"""The search API on loopback for tests: in a thread of the test process, or as its own process."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import httpx
import uvicorn

from server.triton import free_port


def wait_ready(url: str, alive: Callable[[], bool], timeout: float = 60) -> None:
    """Poll `/readyz` until it answers 200; fail if the server dies or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and alive(), f"the search API did not become ready at {url}"
        time.sleep(0.2)


@contextmanager
def served_in_thread(app) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a daemon thread: its base URL once listening."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def start_api_process(indexes_dir: Path, triton_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`histoseek serve` in a subprocess, as deployed, once ready: the process and its base URL."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "histoseek"), "serve", "--indexes", str(indexes_dir),
             "--port", str(port), "--triton-url", triton_url], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: process.poll() is None)
    except AssertionError:
        raise AssertionError(log.read_text()) from None
    return process, url

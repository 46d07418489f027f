"""The search API on loopback for tests: in a thread of the test process, or as its own process."""
from __future__ import annotations

import re
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


def distinct_free_ports(count: int) -> list[int]:
    """`count` different free ports: free_port may hand out the same port twice."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


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
def served_in_thread(app, ready: bool = False, settings=None) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a daemon thread: its base URL once
    listening, or with `ready` once `/readyz` answers 200 (Triton reached, indexes loaded).
    With `settings` (server.api.settings.Settings), uvicorn runs as `histoseek serve` deploys it
    (its h11 protocol with header, body and keep-alive timeouts)."""
    if settings is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    else:
        from server.api.protocol import uvicorn_config

        config = uvicorn_config(app, "127.0.0.1", free_port(), settings, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.config.port}"
        if ready:
            wait_ready(url, thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def start_api_process(indexes_dir: Path, triton_url: str, log: Path, *options: str, verbose: bool = False,
                      env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`histoseek [-v] serve … *options` in a subprocess, as deployed, once ready: the process
    and its base URL. If it never gets ready, it is killed and the failure shows its log."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "histoseek"), *(["-v"] if verbose else []), "serve",
             "--indexes", str(indexes_dir), "--port", str(port), "--triton-url", triton_url, *options],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, lambda: process.poll() is None)
    except AssertionError:
        process.kill()
        process.wait()
        raise AssertionError(log.read_text()) from None
    return process, url


def assert_json_error(response: httpx.Response, status: int, message: str) -> str:
    """The API's error shape: `status`, a JSON body holding only `error`, matching the regex
    `message`. Returns the error text."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and re.search(message, body["error"]), body
    return body["error"]

"""`histoseek serve` as its own process, as deployed (for the load and fault tests)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.triton import free_port


def start_api_process(indexes_dir: Path, triton_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`histoseek serve` in a subprocess, once ready: the process and its base URL."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "histoseek"), "serve", "--indexes", str(indexes_dir),
             "--port", str(port), "--triton-url", triton_url], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)

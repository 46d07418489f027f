"""A Milvus server for tests: Milvus Lite's gRPC server as its own process on loopback.

It stands in for a Milvus standalone (same protocol, URI http://127.0.0.1:PORT), so tests
can stop it and start it again on the same data folder and port to check that a backend
reports the outage and recovers without being reopened.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pymilvus import MilvusClient


def uri(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def start(data_dir: Path, port: int, timeout: float = 60) -> subprocess.Popen:
    """`python -m milvus_lite server` on 127.0.0.1:`port` over `data_dir`, once it answers.
    Its output goes to `<data_dir>.log`; if it dies or never answers, the failure shows it."""
    data_dir = Path(data_dir)
    log = data_dir.parent / f"{data_dir.name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = MilvusClient(uri=uri(port), timeout=2, dedicated=True)
            try:
                client.get_server_version(timeout=2)
                return process
            finally:
                client.close()
        except Exception:  # not listening yet
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"the Milvus Lite server on port {port} did not start:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """Kill the server (as a crash would) and wait for it; its data folder stays as it was."""
    if process.poll() is None:
        process.kill()
    process.wait(30)

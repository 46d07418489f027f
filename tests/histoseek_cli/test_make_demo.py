"""`make demo` as a user runs it: it reaches ready, answers a search, and Ctrl-C
(SIGINT to its process group, as a terminal sends it) stops everything it started."""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pids_in_group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_make_demo_reaches_ready_searches_and_stops_on_ctrl_c(tmp_path):
    from tests.servers import distinct_free_ports

    t_http, t_grpc, t_metrics, api_port, demo_port = distinct_free_ports(5)
    workdir = tmp_path / "demo"
    args = (f"--train-minutes 0.3 --min-steps 1 --triton-http-port {t_http} --triton-grpc-port {t_grpc} "
            f"--triton-metrics-port {t_metrics} --api-port {api_port} --demo-port {demo_port}")
    process = subprocess.Popen(["make", "demo", f"DEMO_DIR={workdir}", f"DEMO_ARGS={args}"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if "HistoSeek is ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    started = time.monotonic()
    try:
        assert ready.wait(900), "make demo never became ready:\n" + "".join(lines[-40:])
        print(f"make demo ready after {time.monotonic() - started:.0f} s")
        api = f"http://127.0.0.1:{api_port}"
        tile = next((ROOT / "demo" / "collection" / "kather2016" / "01_TUMOR").glob("*.png"))
        response = httpx.post(f"{api}/v1/search", files={"image": (tile.name, tile.read_bytes(), "image/png")},
                              data={"k": "5"}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["results"]) == 5 and body["results"][0]["score"] > 0.99
        assert httpx.get(f"http://127.0.0.1:{demo_port}", timeout=10).status_code == 200
        triton_pid = json.loads((workdir / "run" / "triton" / "triton.json").read_text())["pid"]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError("make demo did not stop within 90 s of Ctrl-C:\n" + "".join(lines[-30:]))
    time.sleep(1)
    assert not [p for p in _pids_in_group(process.pid) if _running(p)], "processes of make demo survived Ctrl-C"
    assert not _running(triton_pid), "Triton survived Ctrl-C"
    for port in (t_http, t_grpc, api_port, demo_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)

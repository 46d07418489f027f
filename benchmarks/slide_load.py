"""Load on a running search API: bursts of concurrent slide uploads beside a steady stream of
patch searches (used by `histoseek bench slides --load` and by the tests of issue 22).

The patch searches run in a process of their own (`python -m benchmarks.slide_load probe`),
so that their latencies measure the server, not the load generator's own threads fighting
over one interpreter. Times are `time.perf_counter()` (CLOCK_MONOTONIC: the same clock in
every process of the machine), so the probe's searches can be matched to the bursts'.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np


class Sent(io.BytesIO):
    """An upload's bytes that note when the client has sent the last of them."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.done_at: float | None = None

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk and self.done_at is None:
            self.done_at = time.perf_counter()
        return chunk


@dataclass
class Answer:
    sent: float  # when the request began
    uploaded: float  # when its last byte was sent
    ended: float  # when the answer was read
    status: int
    retry_after: int | None
    error: str
    tiles: int | None = None  # the query's mosaic, when served

    @property
    def seconds(self) -> float:
        return self.ended - self.sent

    @property
    def timed_out(self) -> bool:  # admitted, then stopped at the deadline
        return self.status == 503 and "took longer" in self.error

    @property
    def refused(self) -> bool:  # refused by the slide admission (or the decode budget), at once
        return self.status == 503 and not self.timed_out


def burst(url: str, data: bytes, count: int, timeout: float = 120) -> list[Answer]:
    """`count` slide uploads at once, each on its own connection; their answers."""
    answers: list[Answer] = []
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=count + 1, max_keepalive_connections=0)
    with httpx.Client(timeout=timeout, limits=limits) as client:
        start = threading.Barrier(count)

        def one(number: int) -> None:
            body = Sent(data)
            start.wait()
            sent = time.perf_counter()
            response = client.post(f"{url}/v1/search/slides", files={"slide": (f"query_{number}.tiff", body)},
                                   data={"k": "3"})
            ended = time.perf_counter()
            retry = response.headers.get("Retry-After")
            body_json = response.json()
            error = body_json.get("error", "") if response.status_code != 200 else ""
            with lock:
                answers.append(Answer(sent, body.done_at or ended, ended, response.status_code,
                                      int(retry) if retry else None, error, body_json.get("query_tiles")))

        threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return answers


class PatchProbe:
    """Patch searches one after the other, from a child process, while the block runs:
    `latencies` = [(start, seconds)] once it has ended."""

    def __init__(self, url: str, patch: Path, folder: Path, pause_s: float = 0.02):
        self.url, self.patch, self.folder, self.pause_s = url, Path(patch), Path(folder), pause_s
        self.latencies: list[tuple[float, float]] = []

    def __enter__(self) -> "PatchProbe":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.out, self.stop = self.folder / "probe.jsonl", self.folder / "probe.stop"
        self.stop.unlink(missing_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.slide_load", "probe", self.url,
                                         str(self.patch), str(self.out), str(self.stop), str(self.pause_s)],
                                        cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 60
        while not (self.out.exists() and self.out.read_text().count("\n") >= 3):  # it searches
            assert self.process.poll() is None and time.monotonic() < deadline, "the patch probe did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.touch()
        self.process.wait(60)
        rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        bad = [row for row in rows if row["status"] != 200]
        assert not bad, f"patch searches failed under load: {bad[:3]}"
        self.latencies = [(row["start"], row["seconds"]) for row in rows[3:]]

    def between(self, start: float, end: float) -> list[float]:
        """Seconds of the searches that began and ended within [start, end]."""
        return [seconds for began, seconds in self.latencies if start <= began and began + seconds <= end]


def patch_idle(url: str, patch: bytes, count: int = 60) -> list[float]:
    """Seconds of `count` patch searches one after the other, nothing else running (after 5 to warm)."""
    seconds = []
    with httpx.Client(timeout=60) as client:
        for number in range(count + 5):
            began = time.perf_counter()
            response = client.post(f"{url}/v1/search", files={"image": ("patch.png", patch)}, data={"k": "3"})
            assert response.status_code == 200, response.text
            if number >= 5:
                seconds.append(time.perf_counter() - began)
    return seconds


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class PeakRss:
    """The highest RSS of `pid` while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, rss_mb(self.pid))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def _probe(url: str, patch: str, out: str, stop: str, pause_s: str) -> None:
    data = Path(patch).read_bytes()
    with httpx.Client(timeout=120) as client, open(out, "w") as log:
        while not Path(stop).exists():
            began = time.perf_counter()
            response = client.post(f"{url}/v1/search", files={"image": ("patch.png", data)}, data={"k": "3"})
            seconds = time.perf_counter() - began
            timings = response.json().get("timings_ms", {}) if response.status_code == 200 else {}
            log.write(json.dumps({"start": began, "seconds": seconds, "status": response.status_code,
                                  "server_ms": timings}) + "\n")
            log.flush()
            time.sleep(float(pause_s))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "probe":
        _probe(*sys.argv[2:])
    else:
        sys.exit("usage: python -m benchmarks.slide_load probe URL PATCH OUT STOP PAUSE_S")

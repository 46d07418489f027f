"""Faults: Triton stopped or killed under a running API, index edits SIGKILLed mid-write,
an index edited by another process while the API serves it. Nothing may be lost or corrupted."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest
from PIL import Image

from server import triton
from server.api.app import Settings
from server.index.backends.faiss_backend import FAISS_FILE, faiss_ids
from server.index.build import build_index
from server.index.folder import MANIFEST_FILE, STORE_FILE, IndexFolder
from server.index.store import Item
from tests.images import png
from tests.servers import start_api_process

pytestmark = pytest.mark.slow  # every test here starts Triton, a server or CLI processes


def wait_for(check, timeout: float, interval: float = 0.25) -> None:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not recovered within {timeout}s"
        time.sleep(interval)


# -- Triton stopped or killed while the API runs ------------------------------------------------

def kill_triton(run_dir: Path) -> None:
    """What a crash or `kill -9` leaves: Triton and its backend stubs gone, no clean shutdown.
    The python backend's shared memory regions it leaves in /dev/shm are removed here."""
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
# 10 s down, its default schedule would next retry ~5 s after Triton is back, past the 4 s
# the test allows (ours retries every second at most).
@pytest.mark.parametrize("protocol, down_s", [("grpc", 10), ("http", 1)])
def test_api_recovers_when_triton_is_stopped_killed_and_restarted(
        tmp_path, triton_repo, synth_data, serve_api, free_ports, protocol, down_s):
    run_dir = tmp_path / "triton"
    info = triton.start(triton_repo, run_dir=run_dir, **free_ports)
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
                triton.start(triton_repo, run_dir=run_dir, **free_ports)  # the same ports; the API keeps running
                wait_for(lambda: client.get("/readyz").status_code == 200, timeout=4)
                assert search_ok()
    finally:
        if triton.status(run_dir)["running"]:
            kill_triton(run_dir)  # a clean stop waits out the API's open HTTP connections (10 s)


# -- index edits SIGKILLed at random points -----------------------------------------------------

HISTOSEEK = [str(Path(sys.executable).parent / "histoseek")]


def stored_rows(index_dir: Path) -> dict[int, tuple[str, int]]:
    """id -> (label, thumbnail size in bytes) straight from items.sqlite (a hot journal is rolled back)."""
    with closing(sqlite3.connect(index_dir / STORE_FILE)) as conn:
        return {i: (label, size) for i, label, size in
                conn.execute("SELECT id, label, length(thumbnail) FROM items")}


def assert_consistent(index_dir: Path, index_type: str) -> tuple[dict[int, str], set[str]]:
    """The folder after a crash: what any reader sees before a repair keeps the invariant (every
    row has its vector); opening it repairs it to vectors == rows; a search works.
    Returns id -> label, and the traces of an interrupted write that were found and repaired."""
    traces = {"hot sqlite journal"} if (index_dir / f"{STORE_FILE}-journal").exists() else set()
    traces |= {"temporary file"} if list(index_dir.glob(".*.tmp")) else set()
    rows = stored_rows(index_dir)
    manifest = json.loads((index_dir / MANIFEST_FILE).read_text())  # whole, never half-written
    traces |= {"stale manifest count"} if manifest["count"] != len(rows) else set()
    held = set(faiss_ids(faiss.read_index(str(index_dir / FAISS_FILE))).tolist())
    assert set(rows) <= held, f"rows without a vector: {sorted(set(rows) - held)}"
    if index_type != "hnsw":  # where vectors without rows are not tombstones kept on purpose
        traces |= {"vectors without rows"} if held - set(rows) else set()
    assert all(size > 0 for _, size in rows.values()), "a row without its thumbnail"

    folder = IndexFolder(index_dir)
    held = set(faiss_ids(faiss.read_index(str(index_dir / FAISS_FILE))).tolist())
    assert set(folder.store.ids().tolist()) == set(rows)
    assert held == set(rows) if index_type != "hnsw" else held >= set(rows)
    assert json.loads((index_dir / MANIFEST_FILE).read_text())["count"] == len(rows)
    hits = folder.search(np.full((1, 16), 0.25, np.float32), k=5)[0]
    assert len(hits) == min(5, len(rows)) and all(h.id in rows for h in hits)
    assert not list(index_dir.glob(".*.tmp")), "a killed write's temporary files were not cleaned up"
    return {i: label for i, (label, _) in rows.items()}, traces


def test_a_killed_adds_ids_never_name_a_later_item(tissue_copy):
    index_dir = tissue_copy
    api = IndexFolder(index_dir)  # a reader, as the API holds it
    old, new = np.eye(16, dtype=np.float32)[:2]
    index = faiss.read_index(str(index_dir / FAISS_FILE))
    index.add_with_ids(old[None], np.array([24]))  # an add killed after its vector was written
    faiss.write_index(index, str(index_dir / FAISS_FILE))
    snapshot = api.backend.snapshot()  # holds the rowless vector 24

    (added,) = IndexFolder(index_dir).add(new[None], [Item(-1, "new.png", "new", "g")], [b"jpeg"])
    # A search that took its snapshot just before the add finds `old` under id 24; the row
    # it then looks up must not be the new item, whose vector is another.
    ids = snapshot.cpu.search(old[None], 1)[1][0]
    assert ids[0] == 24 and added > 24 and api.store.lookup(ids) == {}


def run_and_kill(command: list[str], index_dir: Path, rng: np.random.Generator) -> bool:
    """Run a CLI command and SIGKILL it at a random point; True if it finished first.

    Half the kills land anywhere in the run (start-up, embedding, writing); the other half
    within 30 ms of its first write to the folder (a file created, replaced or removed there
    changes the folder's mtime), as the write itself takes only a few milliseconds."""
    before = os.stat(index_dir).st_mtime_ns
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if rng.random() < 0.5:
        deadline = time.monotonic() + rng.uniform(0, 3)
    else:
        deadline = time.monotonic() + 10
        while os.stat(index_dir).st_mtime_ns == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        deadline = time.monotonic() + rng.uniform(0, 0.03)
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode in (0, -signal.SIGKILL), stderr
    return process.returncode == 0


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_index_edits_killed_at_random_points_lose_nothing(tmp_path, synth_data, triton_server, index_type):
    index_dir = build_index("tiny", synth_data, tmp_path / "tissue", index_type=index_type,
                            triton_url=triton_server.grpc_url, batch=8)
    images = sorted(synth_data.glob("*/*.png"))[::6]  # 4 images per add
    rng = np.random.default_rng(7)
    expected = assert_consistent(index_dir, index_type)[0]  # id -> label of every item that must be there
    outcomes: list[tuple[str, bool]] = []
    repaired: dict[str, int] = {}
    started = time.monotonic()
    while len(outcomes) < 25 and time.monotonic() - started < 45:
        batches = sorted({label for label in expected.values() if label.startswith("add")})
        if batches and rng.random() < 0.4:  # remove one earlier add's items, all at once
            label = batches[rng.integers(len(batches))]
            ids = [i for i, known in expected.items() if known == label]
            command = [*HISTOSEEK, "index", "remove", "--index", str(index_dir), *(f"--id={i}" for i in ids)]
        else:
            label = f"add{len(outcomes)}"
            command = [*HISTOSEEK, "index", "add", "--index", str(index_dir), "--label", label,
                       "--triton-url", triton_server.grpc_url, *(f"--image={p}" for p in images)]
        completed = run_and_kill(command, index_dir, rng)
        outcomes.append((command[2], completed))
        found, traces = assert_consistent(index_dir, index_type)
        for trace in traces:
            repaired[trace] = repaired.get(trace, 0) + 1

        # All or nothing: an add's items are all there or none is; a remove took all or none.
        in_batch = [i for i, known in found.items() if known == label]
        if command[2] == "add":
            assert len(in_batch) in ((len(images),) if completed else (0, len(images))), in_batch
            expected.update((i, label) for i in in_batch)
        else:
            assert in_batch == ([] if completed else in_batch) and len(in_batch) in (0, len(ids)), in_batch
            for i in ids if not in_batch else []:
                del expected[i]
        lost = {i: label for i, label in expected.items() if found.get(i) != label}
        assert not lost, f"lost or changed after {outcomes[-1]}: {lost}"
        assert set(found) == set(expected), f"items nobody added: {set(found) - set(expected)}"

    kills = sum(not completed for _, completed in outcomes)
    tally = {f"{verb}s {'completed' if done else 'killed'}": outcomes.count((verb, done))
             for verb in ("add", "remove") for done in (True, False)}
    print(f"\n{index_type}: {tally} in {time.monotonic() - started:.0f}s, {len(expected)} items at the end, "
          f"nothing lost; traces of killed writes, repaired: {repaired}")
    assert kills >= len(outcomes) // 3  # the loop really did kill edits


def test_api_killed_while_adding_loses_no_acknowledged_item(tmp_path, tissue_copy, triton_server):
    index_dir = tissue_copy
    rng = np.random.default_rng(5)
    acknowledged: list[int] = []  # ids of adds answered 201
    repaired: set[str] = set()
    for _ in range(3):
        process, url = start_api_process(index_dir.parent, triton_server.grpc_url, tmp_path / "serve.log")

        def add_until_killed() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                try:
                    while True:
                        pixels = png(rng.integers(0, 256, (16, 16, 3), np.uint8))
                        added = client.post("/v1/indexes/tissue/items", files={"image": ("a.png", pixels)},
                                            data={"label": "api"})
                        acknowledged.append(added.json()["id"])
                except httpx.TransportError:
                    return  # the server is gone

        adder = threading.Thread(target=add_until_killed)
        adder.start()
        time.sleep(rng.uniform(0.3, 1.5))
        process.kill()
        process.wait()
        adder.join(30)
        labels, traces = assert_consistent(index_dir, "flat")
        repaired |= traces
        assert set(acknowledged) <= set(labels), f"lost: {set(acknowledged) - set(labels)}"
    print(f"\nAPI killed 3 times while adding: {len(acknowledged)} adds acknowledged, all present; "
          f"traces of killed writes, repaired: {sorted(repaired)}")
    assert len(acknowledged) > 10  # the adds really ran


# -- one writer at a time, many readers, across processes ----------------------------------------

def test_searches_see_consistent_items_while_the_cli_and_the_api_edit_the_index(
        tmp_path, synth_data, tissue_copy, triton_server, serve_api):
    index_dir = tissue_copy
    api = serve_api(index_dir.parent, triton_server.grpc_url)
    rng = np.random.default_rng(3)
    new_images = []
    for n in range(12):  # images unlike the indexed ones, to be added by the CLI
        new_images.append(tmp_path / f"new_{n}.png")
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(new_images[-1])
    originals = sorted(synth_data.glob("*/*.png"))[::5]
    failures: list[str] = []
    searches, api_edits = [], []  # one entry per request (list.append is atomic)
    done = threading.Event()

    def check(client: httpx.Client, query: Path) -> None:
        response = client.post("/v1/search", files={"image": ("q.png", query.read_bytes())}, data={"k": "5"})
        searches.append(response.status_code)
        if response.status_code != 200:
            failures.append(f"{response.status_code}: {response.text}")
            return
        results = response.json()["results"]
        # A vector paired with another item's row would show as a perfect score on the wrong
        # image, or a lower one on the query's own image.
        if query in originals:  # always indexed; the synthetic tiles of a class share a source
            consistent = results[0]["score"] > 0.999 and results[0]["label"] == query.parent.name
        else:  # indexed while the CLI's add has completed and its remove has not
            consistent = all((r["score"] > 0.999) == (r["source"] == str(query)) for r in results)
        if not consistent:
            failures.append(f"query {query.name}: {results}")

    def search_until_done(seed: int) -> None:
        queries = originals + new_images
        with httpx.Client(base_url=api, timeout=30) as client:
            while not done.is_set():
                check(client, queries[(seed := seed + 1) % len(queries)])

    def api_adds_and_deletes() -> None:
        with httpx.Client(base_url=api, timeout=30) as client:
            while not done.is_set():
                pixels = png(rng.integers(0, 256, (16, 16, 3), np.uint8))
                added = client.post("/v1/indexes/tissue/items", files={"image": ("api.png", pixels)},
                                    data={"label": "api"})
                deleted = client.delete(f"/v1/indexes/tissue/items/{added.json()['id']}")
                api_edits.append(2)
                if (added.status_code, deleted.status_code) != (201, 200):
                    failures.append(f"API add/delete: {added.text} {deleted.text}")

    threads = [threading.Thread(target=search_until_done, args=(seed,)) for seed in range(4)]
    threads.append(threading.Thread(target=api_adds_and_deletes))
    for thread in threads:
        thread.start()
    try:
        cli = [*HISTOSEEK, "index"]
        for n in range(3):  # the CLI adds 4 images at a time while the API serves and edits
            batch = new_images[4 * n:4 * n + 4]
            subprocess.run([*cli, "add", "--index", str(index_dir), "--label", f"cli{n}",
                            "--triton-url", triton_server.grpc_url, *(f"--image={p}" for p in batch)],
                           check=True, capture_output=True)
            with httpx.Client(base_url=api, timeout=30) as client:  # the API sees them at once
                for image in batch:
                    top = client.post("/v1/search", files={"image": ("q.png", image.read_bytes())}).json()
                    assert top["results"][0]["source"] == str(image), top
        removed = [i for i, (label, _) in stored_rows(index_dir).items() if label == "cli0"]
        subprocess.run([*cli, "remove", "--index", str(index_dir), *(f"--id={i}" for i in removed)],
                       check=True, capture_output=True)
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    print(f"\n{len(searches)} searches, {len(api_edits)} API add+delete pairs, 4 CLI edits: "
          f"{len(failures)} inconsistent")
    assert failures == []
    labels, _ = assert_consistent(index_dir, "flat")
    assert sorted(labels.values()).count("cli1") == sorted(labels.values()).count("cli2") == 4
    assert "cli0" not in labels.values() and "api" not in labels.values() and len(labels) == 24 + 8

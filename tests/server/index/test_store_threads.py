"""items.sqlite connections end with the threads that opened them, not at the next garbage collection."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from server.index.store import Store


def open_connections(path: Path) -> int:
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(path.resolve()))


def test_connections_of_finished_threads_are_closed(tmp_path):
    store = Store.create(tmp_path / "items.sqlite")
    threads = [threading.Thread(target=store.count) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Before: 5 until gc.collect() (a sqlite3 connection sits in a reference cycle).
    assert open_connections(tmp_path / "items.sqlite") == 0


def test_a_live_thread_keeps_its_connection(tmp_path):
    store = Store.create(tmp_path / "items.sqlite")
    assert store.count() == 0 and open_connections(tmp_path / "items.sqlite") == 1
    assert store.count() == 0 and open_connections(tmp_path / "items.sqlite") == 1  # reused, not reopened

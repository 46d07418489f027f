"""`histoseek` subcommands run as child processes, waiting until a served one answers, and
killing a process with everything it started."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from histoseek.errors import HistoseekError


def histoseek_command(*args: object) -> list[str]:
    """The command line of `histoseek ARGS…` with this very Python (and its environment)."""
    return [sys.executable, "-m", "histoseek_cli", *map(str, args)]


def wait_http(url: str, what: str, process: subprocess.Popen, *, output: str = "its output above",
              timeout: float = 180) -> None:
    """Poll `url` until it answers 200; a clear error naming the last answer when `process`
    exits first or `timeout` seconds pass (`output`: where the process's log is)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HistoseekError(f"{what} exited with code {process.returncode} before it was ready (see {output})")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:  # e.g. /readyz's 503, whose JSON says what is missing
            last = _error_of(exc)
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.5)
    raise HistoseekError(f"{what} was not ready at {url} after {timeout:.0f} s: {last} (see {output})")


def _error_of(response: urllib.error.HTTPError) -> str:
    body = response.read().decode(errors="replace")
    try:
        return f"{response.code} {json.loads(body)['error']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.code} {body[:200]}"


def descendants(roots: list[int]) -> dict[int, str]:
    """pid -> command line of every process below `roots`, however deep (Ray's workers start
    sessions of their own, so a process group does not hold them)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, args = (line.split(None, 2) + [""])[:3]
        table[int(pid)] = (int(ppid), args)
    found, frontier = {}, set(roots)
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found}
        found.update({pid: table[pid][1] for pid in children})
        frontier = children
    return found


def kill_tree(processes: list[subprocess.Popen]) -> None:
    """SIGKILL these processes and every process below them, then reap them."""
    for pid in [*descendants([p.pid for p in processes]), *(p.pid for p in processes)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        process.wait()

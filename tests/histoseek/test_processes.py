"""wait_http against a real loopback HTTP server and real child processes."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from histoseek.errors import HistoseekError
from histoseek.processes import histoseek_command, wait_http


class _NotReady(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"ready": False, "error": "triton: connection refused"}).encode()
        self.send_response(503 if self.path == "/readyz" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_a_200_returns_at_once(server_url, sleeper):
    wait_http(f"{server_url}/healthz", "the server", sleeper, timeout=5)


def test_the_timeout_names_the_last_answer_and_the_log(server_url, sleeper):
    with pytest.raises(HistoseekError, match=r"the API was not ready at .*/readyz after 1 s: "
                                             r"503 triton: connection refused \(see api\.log\)"):
        wait_http(f"{server_url}/readyz", "the API", sleeper, output="api.log", timeout=1)


def test_a_process_that_exits_first_is_named_with_its_code(server_url):
    process = subprocess.Popen(histoseek_command("no-such-subcommand"), stderr=subprocess.DEVNULL)
    process.wait()
    with pytest.raises(HistoseekError, match=r"the API exited with code 2 before it was ready \(see its output above\)"):
        wait_http(f"{server_url}/readyz", "the API", process, timeout=30)

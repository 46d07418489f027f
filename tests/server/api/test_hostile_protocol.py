"""Hostile requests at the HTTP and API edges, against the app under uvicorn with the
deployed protocol (server.api.protocol: h11 with connection timeouts), in a thread.

Slow and stalled connections are closed; conflicting framing is refused and the
connection closed (no request smuggled in a body is served); HEAD works wherever GET
does; metrics labels stay a closed set; item ids are strict decimals; labels and groups
are checked at the API and the CLI; malformed multipart gets a 400 that says so.
The connection timeouts are shortened here (1 s headers, 2 s body, 1 s keep-alive).
"""
from __future__ import annotations

import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from histoseek_cli.main import main
from server.api.app import Settings, create_app
from server.index.folder import IndexFolder
from tests.images import encode
from tests.servers import assert_json_error, served_in_thread

pytestmark = pytest.mark.slow  # a real Triton and a real server

SETTINGS = Settings(header_timeout_s=1.0, body_timeout_s=2.0, keep_alive_s=1.0)


@pytest.fixture(scope="module")
def port(indexes_dir, triton_server):
    with served_in_thread(create_app(indexes_dir, triton_server.grpc_url, settings=SETTINGS), settings=SETTINGS) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture
def client(port):
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def small_png(synth_data) -> bytes:
    return (synth_data / "tumour" / "tumour_0001.png").read_bytes()


def closed_after(connection: socket.socket, limit_s: float, trickle: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the server closes `connection` (sending a byte of `trickle` every
    0.3 s meanwhile), and what it sent; fails after `limit_s`."""
    started, received = time.monotonic(), b""
    connection.settimeout(0.3)
    for byte in trickle or b"\0" * 1000:
        try:
            chunk = connection.recv(65536)
            if not chunk:
                return time.monotonic() - started, received
            received += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started, received
        assert time.monotonic() - started < limit_s, f"still open after {limit_s} s"
        if trickle:
            try:
                connection.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, received
    raise AssertionError("the trickle ran out before the server closed the connection")


# -- connections ----------------------------------------------------------------------------------

def test_connection_that_never_sends_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        seconds, _ = closed_after(connection, 5)
    assert 0.8 < seconds < 3, seconds


def test_headers_sent_a_byte_at_a_time_are_cut_off(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        seconds, _ = closed_after(connection, 6, trickle=b"X-Slow: " + b"a" * 100)
    assert seconds < 3, seconds


def test_trickling_body_is_cut_off(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: 100000\r\n\r\n--b\r\n")
        seconds, _ = closed_after(connection, 8, trickle=b"y" * 100)
    assert seconds < 4, seconds


def test_idle_keep_alive_connection_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, received = closed_after(connection, 5)
    assert received.startswith(b"HTTP/1.1 200") and seconds < 3, (seconds, received)


def test_keep_alive_connections_still_serve_several_requests(client):
    for _ in range(3):
        assert client.get("/healthz").status_code == 200


def test_content_length_with_transfer_encoding_is_refused_and_closed(port):
    """A request smuggled in the body of one that carries both headers is never served."""
    smuggled = b"GET /v1/indexes HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request)
        _, received = closed_after(connection, 5)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), received
    assert b"both Content-Length and Transfer-Encoding" in body and received.count(b"HTTP/1.1") == 1, received


# -- HEAD, metrics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/indexes", "/v1/items/tissue/0/image", "/metrics",
                                  "/docs", "/openapi.json", "/v1/items/tissue/999999/image"])
def test_head_answers_wherever_get_does(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the metrics change between the two requests
        assert head.headers["content-length"] == get.headers["content-length"]


def test_made_up_methods_do_not_grow_the_metrics(client):
    before = client.get("/metrics").text
    for number in range(300):
        assert client.request(f"M{number}X", "/v1/search").status_code in (401, 405)
    after = client.get("/metrics").text
    assert "M1X" not in after and 'method="other"' in after
    assert len(after) - len(before) < 5000, (len(before), len(after))


# -- ids -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, status", [
    ("1_0", 422), ("+3", 422), ("%205", 422), ("%D9%A3", 422), ("0x1", 422), ("1e3", 422), ("3.0", 422),
    (str(2**63), 404), (str(10**30), 404), ("-1", 404), ("999999", 404),
])
def test_item_ids_are_strict_decimals(client, indexes_dir, item, status):
    error = "item id must be a whole number written with the digits 0-9" if status == 422 else "has no item"
    assert_json_error(client.get(f"/v1/items/tissue/{item}/image"), status, error)
    assert_json_error(client.delete(f"/v1/indexes/tissue/items/{item}"), status, error)
    assert client.get("/v1/items/tissue/10/image").status_code == 200  # "1_0" is not item 10
    assert IndexFolder(indexes_dir / "tissue").store.count() == 24


# -- labels and groups -----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("label", "x" * 900_000, r"label \(the form field `label`\) is 900,000 characters long, more than 200"),
    ("label", "   ", r"label \(the form field `label`\) is blank"),
    ("label", "tum\x00our", r"label .* contains the control character '\\x00'"),
    ("label", "tumour\r\nX-Injected: 1", r"label .* contains the control character '\\r'"),
    ("group", "slide\n7", r"group \(the form field `group`\) contains the control character '\\n'"),
    ("group", " \t ", r"group .* is blank"),
    ("group", "g" * 201, "group .* is 201 characters long"),
])
def test_bad_labels_and_groups_are_refused(client, small_png, indexes_dir, field, value, message):
    data = {"label": "tumour", field: value}
    response = client.post("/v1/indexes/tissue/items", files={"image": ("q.png", small_png)}, data=data)
    assert_json_error(response, 422, message)
    assert IndexFolder(indexes_dir / "tissue").store.count() == 24
    assert all(len(label) < 50 for summary in client.get("/v1/indexes").json() for label in summary["labels"])


def test_cli_refuses_bad_labels(tissue_copy, small_png, tmp_path, capsys):
    image = tmp_path / "q.png"
    image.write_bytes(small_png)
    for option, value, message in [("--label", "a\nb", "label (--label) contains the control character '\\n'"),
                                   ("--label", " ", "label (--label) is blank"),
                                   ("--group", "g" * 300, "group (--group) is 300 characters long")]:
        extra = ["--label", "tumour"] if option == "--group" else []
        with pytest.raises(SystemExit):
            main(["index", "add", "--index", str(tissue_copy), "--image", str(image), option, value, *extra])
        assert message in capsys.readouterr().err
    assert IndexFolder(tissue_copy).store.count() == 24


# -- malformed multipart ---------------------------------------------------------------------------

def test_multipart_without_closing_boundary_is_400(client, small_png):
    body = b'--b0\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n' + small_png + b"\r\n"
    response = client.post("/v1/search", content=body, headers={"content-type": "multipart/form-data; boundary=b0"})
    assert_json_error(response, 400, "ends without its closing boundary.*send the image again as multipart/form-data")


@pytest.mark.parametrize("content_type, message", [
    ("multipart/form-dataX; boundary=b0", "content type is 'multipart/form-datax', not multipart/form-data"),
    ("multipart/mixed; boundary=b0", "is 'multipart/mixed', not multipart/form-data"),
    ("multipart/form-data; charset=utf-8", "content type has no boundary"),
])
def test_multipart_content_types_are_checked(client, small_png, content_type, message):
    body = b'--b0\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n' + small_png + b"\r\n--b0--\r\n"
    response = client.post("/v1/search", content=body, headers={"content-type": content_type})
    assert_json_error(response, 400, message + ".*as `curl -F image=@tile.png …` does")


def test_multipart_with_an_epilogue_is_searched(client, small_png):
    body = (b'--b0\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n' + small_png
            + b"\r\n--b0--\r\nan epilogue, which RFC 2046 allows and ignores\r\n")
    response = client.post("/v1/search", content=body, headers={"content-type": "multipart/form-data; boundary=b0"})
    assert response.status_code == 200, response.text


def test_upload_names_are_stored_on_one_line(client, small_png, indexes_dir):
    # Sent raw: clients percent-encode such names; a terminal escape and a bell, as bytes.
    body = (b'--b0\r\nContent-Disposition: form-data; name="image"; filename="evil\x1b[31mname\x07.png"\r\n\r\n'
            + small_png + b'\r\n--b0\r\nContent-Disposition: form-data; name="label"\r\n\r\nprobe\r\n--b0--\r\n')
    response = client.post("/v1/indexes/tissue/items", content=body,
                           headers={"content-type": "multipart/form-data; boundary=b0"})
    assert response.status_code == 201, response.text
    added = response.json()["id"]
    try:
        results = client.post("/v1/search", files={"image": ("q.png", small_png)}, data={"k": "30"}).json()["results"]
        assert next(r["source"] for r in results if r["id"] == added) == "evil?[31mname?.png"
    finally:
        assert client.delete(f"/v1/indexes/tissue/items/{added}").status_code == 200


# -- over the decode budget ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tight_port(indexes_dir, triton_server, tmp_path_factory):
    """100 MB of decode budget, and no waiting for it."""
    folder = tmp_path_factory.mktemp("tight")
    shutil.copytree(indexes_dir / "tissue", folder / "tissue")
    settings = Settings(max_decode_bytes=100_000_000, decode_wait_s=0.05)
    with served_in_thread(create_app(folder, triton_server.grpc_url, settings=settings), settings=settings) as url:
        yield int(url.rsplit(":", 1)[1])


def test_upload_larger_than_the_whole_budget_is_413(tight_port):
    big = encode(Image.new("P", (5000, 5000)), "PNG")  # 25 MB of indices, then 100 MB of RGB
    response = httpx.post(f"http://127.0.0.1:{tight_port}/v1/search", files={"image": ("big.png", big)}, timeout=30)
    assert_json_error(response, 413, r"needs about 1\d\d MB, more than the server's whole decode budget of 100 MB "
                                     r"\(--max-decode-mb\); send a smaller image")


def test_uploads_over_the_budget_wait_then_get_503_with_retry_after(tight_port):
    big = encode(Image.new("RGB", (4000, 4000)), "PNG")  # ~67 MB each: one at a time
    with httpx.Client(timeout=30) as http:
        def post(_):
            return http.post(f"http://127.0.0.1:{tight_port}/v1/search", files={"image": ("big.png", big)})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
    busy = [r for r in responses if r.status_code == 503]
    assert {r.status_code for r in responses} == {200, 503} and busy, [r.status_code for r in responses]
    for response in busy:
        assert_json_error(response, 503, "decode budget of 100 MB is in use; retry in a moment")
        assert response.headers["retry-after"] == "2"


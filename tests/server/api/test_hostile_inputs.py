"""Hostile and unusual uploads against a real uvicorn server on loopback (default limits).

Every bad request gets a JSON 4xx whose message says what to do; valid but unusual images
(greyscale, RGBA, 16-bit, float, CMYK, palette, animated, 1x1, EXIF-rotated) are converted
and searched; names from requests never reach the file system; and after all of it the
server still answers, without having grown. The last part throws arbitrary form values
and file names at the API (hypothesis) and wants a JSON answer below 500 every time.
"""
from __future__ import annotations

import http.client
import random
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from server.api.app import Settings, create_app
from server.index.folder import IndexFolder
from tests.images import encode
from tests.servers import assert_json_error, served_in_thread

pytestmark = pytest.mark.slow  # a real Triton and a real server

MB = 1_000_000


# -- the corpus ---------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG, written by hand: 50,000 x 50,000 pixels fit in 300 KB."""
    deflate, rows = zlib.compressobj(9), bytes(1 + (width + 7) // 8) * 1000  # filter byte 0 + pixels
    idat = b"".join(deflate.compress(rows) for _ in range(height // 1000)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def tile(synth_data: Path) -> Image.Image:
    return Image.open(synth_data / "tumour" / "tumour_0002.png").convert("RGB")


def unusual_images(synth_data: Path) -> dict[str, tuple[str, bytes]]:
    """Valid images in forms a patch rarely comes in: each must be converted and searched."""
    rgb = tile(synth_data)
    grey = np.asarray(rgb.convert("L"), np.uint16) * 257
    other = Image.open(synth_data / "stroma" / "stroma_0000.png").convert("RGB")
    return {
        "greyscale (L) PNG": ("grey.png", encode(rgb.convert("L"), "PNG")),
        "RGBA PNG": ("rgba.png", encode(rgb.convert("RGBA"), "PNG")),
        "16-bit greyscale TIFF": ("grey16.tif", encode(Image.fromarray(grey), "TIFF")),
        "float32 TIFF": ("float.tif", encode(Image.fromarray(grey.astype(np.float32) / 65535), "TIFF")),
        "CMYK JPEG": ("cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG")),
        "palette PNG": ("palette.png", encode(rgb.convert("P"), "PNG")),
        "animated GIF (first frame)": ("anim.gif", encode(rgb, "GIF", save_all=True, append_images=[other])),
        "1x1 PNG": ("dot.png", encode(Image.new("RGB", (1, 1), (200, 100, 150)), "PNG")),
        "image/png part holding a JPEG": ("q.png", encode(rgb, "JPEG")),
        "text/plain part holding a PNG": ("q.png", encode(rgb, "PNG")),
    }


SEND = "send a PNG, JPEG or TIFF file"
TRUNCATED = "corrupt or truncated.*re-export it"
SMALL = "SMALL_PNG"  # stands for a valid 8x8 PNG in the table below

# (what, form fields, files: {field: (filename, bytes | SMALL, content type)}, status, message)
BAD_UPLOADS = [
    ("empty image part", {}, {"image": ("q.png", b"", "image/png")}, 400, f"q.png is empty: {SEND}"),
    ("random bytes", {}, {"image": ("q.png", random.Random(0).randbytes(4096), "image/png")}, 400,
     f"not a readable image.*{SEND}"),
    ("text file named .png", {}, {"image": ("notes.png", b"Patient notes\n" * 40, "image/png")}, 400,
     f"notes.png is not a readable image.*{SEND}"),
    ("PPM (a format not accepted)", {}, {"image": ("q.ppm", b"P6\n8 8\n255\n" + bytes(192), "image/x-ppm")}, 400,
     f"not a readable image.*{SEND}"),
    ("text/plain part holding text", {}, {"image": ("q.txt", b"hello", "text/plain")}, 400, SEND),
    ("image as a plain form field", {"image": "tile.png"}, {"other": ("x.png", SMALL, "image/png")}, 422,
     "image: .*Expected UploadFile"),
    ("no image field", {"k": "3"}, {"other": ("x.png", SMALL, "image/png")}, 422, r"image: Field required.*/docs"),
    ("unknown index", {"index": "nope"}, None, 404, "no index named 'nope'; loaded indexes: tissue"),
    ("index ../secret (a real index folder outside)", {"index": "../secret"}, None, 404,
     "no index named '../secret'; loaded indexes: tissue"),
    ("index ..%2F..%2Fetc", {"index": "..%2F..%2Fetc"}, None, 404, "no index named"),
    ("index /etc/passwd", {"index": "/etc/passwd"}, None, 404, "no index named '/etc/passwd'"),
    ("index with a NUL byte", {"index": "tissue\x00/../x"}, None, 404, r"no index named 'tissue\\x00/\.\./x'"),
    ("k=0", {"k": "0"}, None, 422, "k must be between 1 and 100, got 0"),
    ("k=-1", {"k": "-1"}, None, 422, "k must be between 1 and 100, got -1"),
    ("k=10**9", {"k": str(10**9)}, None, 422, "k must be between 1 and 100, got 1000000000"),
    ("k=10**40", {"k": str(10**40)}, None, 422, "k must be between 1 and 100"),
    ("k=ten", {"k": "ten"}, None, 422, "k: Input should be a valid integer"),
    ("k=2.5", {"k": "2.5"}, None, 422, "k: Input should be a valid integer"),
    ("k=1e3", {"k": "1e3"}, None, 422, "k: Input should be a valid integer"),
]


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return encode(Image.new("RGB", (8, 8), (180, 90, 140)), "PNG")


@pytest.fixture(scope="module")
def indexes_dir(indexes_dir) -> Path:
    """The shared fixture's copy of the index, and beside it (outside the served folder) a
    real index, `secret`: what a path traversal would reach."""
    shutil.copytree(indexes_dir / "tissue", indexes_dir.parent / "secret")
    return indexes_dir


def rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.fixture(scope="module")
def api(indexes_dir, triton_server):
    """The app with its default limits, served by uvicorn in a thread of this process."""
    with served_in_thread(create_app(indexes_dir, triton_server.grpc_url)) as url:
        httpx.get(f"{url}/readyz", timeout=30)  # warm: the baseline below includes a served request
        yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "rss_mb": rss_mb(), "fds": open_fds()}


ERROR_BODIES: list[str] = []  # every error answer of this module, checked at its end


def _keep_error(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        ERROR_BODIES.append(response.text)


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api["url"], timeout=60, event_hooks={"response": [_keep_error]}) as http:
        yield http


def test_png_stuffed_with_text_chunks_is_refused_from_its_chunk_lengths(client, small_png):
    """80,000 text chunks made Pillow read for seconds before the first pixel; refused from the lengths."""
    chunk = png_chunk(b"tEXt", b"comment\x00" + b"x" * 8)
    stuffed = small_png[:33] + chunk * 80_000 + small_png[33:]
    response = client.post("/v1/search", files={"image": ("chunks.png", stuffed, "image/png")})
    assert_json_error(response, 400, "chunks.png is a PNG of more than 1,000 metadata chunks")


@pytest.mark.parametrize("what, data, files, status, message", BAD_UPLOADS, ids=[case[0] for case in BAD_UPLOADS])
def test_bad_uploads_get_a_json_4xx(client, small_png, what, data, files, status, message):
    files = files or {"image": ("q.png", SMALL, "image/png")}
    files = {field: (name, small_png if content == SMALL else content, kind)
             for field, (name, content, kind) in files.items()}
    assert_json_error(client.post("/v1/search", data=data, files=files), status, message)


def test_empty_k_means_the_default(client, small_png):
    response = client.post("/v1/search", data={"k": ""}, files={"image": ("q.png", small_png, "image/png")})
    assert response.status_code == 200 and len(response.json()["results"]) == 10


def test_truncated_images(client, synth_data):
    rgb = tile(synth_data).resize((256, 256))
    for fmt in ("PNG", "JPEG"):
        data = encode(rgb, fmt)
        response = client.post("/v1/search", files={"image": (f"cut.{fmt.lower()}", data[: len(data) // 2])})
        assert_json_error(response, 400, f"cut.{fmt.lower()} is {TRUNCATED}")


@pytest.mark.parametrize("what, body, headers, message", [
    ("empty body, no content type", b"", {}, "multipart/form-data \\(got 'no content type'\\)"),
    ("JSON body", b'{"image": "tile.png", "k": 5}', {"content-type": "application/json"}, "got 'application/json'"),
    ("urlencoded form", b"image=tile.png&k=5", {"content-type": "application/x-www-form-urlencoded"},
     "got 'application/x-www-form-urlencoded'"),
    ("raw PNG body", b"\x89PNG\r\n\x1a\n", {"content-type": "image/png"}, "got 'image/png'"),
])
def test_wrong_content_type_is_415(client, what, body, headers, message):
    error = assert_json_error(client.post("/v1/search", content=body, headers=headers), 415, message)
    assert "as `curl -F image=@tile.png …` does" in error


def test_multipart_without_boundary_or_body(client):
    for body in (b"", b"--x\r\nnot a part"):
        response = client.post("/v1/search", content=body, headers={"content-type": "multipart/form-data"})
        assert_json_error(response, 400, "send the image as multipart/form-data")


@pytest.mark.parametrize("name", ["16-bit greyscale TIFF", "float32 TIFF", "greyscale (L) PNG", "RGBA PNG",
                                  "CMYK JPEG", "palette PNG", "animated GIF (first frame)", "1x1 PNG",
                                  "image/png part holding a JPEG", "text/plain part holding a PNG"])
def test_unusual_images_are_converted_and_searched(client, synth_data, name):
    filename, data = unusual_images(synth_data)[name]
    kind = "text/plain" if name.startswith("text/plain") else "application/octet-stream"
    response = client.post("/v1/search", files={"image": (filename, data, kind)}, data={"k": "5"})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 5


def test_animated_gif_is_searched_by_its_first_frame(client, synth_data):
    first = client.post("/v1/search", files={"image": ("q.png", encode(tile(synth_data), "PNG"))}).json()
    _, gif = unusual_images(synth_data)["animated GIF (first frame)"]
    found = client.post("/v1/search", files={"image": ("anim.gif", gif)}).json()
    assert found["results"][0]["id"] == first["results"][0]["id"]


def test_exif_orientation_is_applied(client):
    """A camera-style JPEG stored sideways with an EXIF orientation finds the upright original.

    The probe is a colour ramp, so that the sideways copy looks unlike it; it is added to
    the index for this test and removed again.
    """
    y, x = np.mgrid[0:64, 0:64]
    upright = Image.fromarray(np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8))
    added = client.post("/v1/indexes/tissue/items", files={"image": ("probe.png", encode(upright, "PNG"))},
                        data={"label": "probe"}).json()
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    try:
        scores = {}
        for tagged, extra in ((True, {"exif": exif.tobytes()}), (False, {})):
            data = encode(sideways, "JPEG", quality=95, **extra)
            results = client.post("/v1/search", files={"image": ("photo.jpg", data)}, data={"k": "25"}).json()
            scores[tagged] = next(r["score"] for r in results["results"] if r["id"] == added["id"])
            assert (results["results"][0]["id"] == added["id"]) is tagged
    finally:
        assert client.delete(f"/v1/indexes/tissue/items/{added['id']}").status_code == 200
    assert scores[True] > 0.99 and scores[True] > scores[False] + 0.1, scores


def test_decompression_bombs_are_refused_by_their_header(client):
    for (width, height), why in [((50_000, 50_000), "more than 25,000,000 pixels"),
                                 ((9_000, 9_000), "is 9000x9000 pixels, more than the limit of 25,000,000")]:
        bomb = bilevel_png(width, height)
        assert len(bomb) < 400_000  # 2.5 gigapixels in 300 KB
        started = time.perf_counter()
        error = assert_json_error(client.post("/v1/search", files={"image": ("bomb.png", bomb)}), 413, why)
        assert time.perf_counter() - started < 2, "decoded before refused?"
        assert "tile large images first" in error


def huge_multipart(total: int, sent: list[int]):
    """A 200 MB multipart body streamed from one reused 1 MB chunk; counts what was taken."""
    yield b'--b0undary\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n\r\n'
    chunk = bytes(MB)
    for _ in range(total // MB):
        sent[0] += MB
        yield chunk
    yield b"\r\n--b0undary--\r\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_200_mb_upload_is_cut_off_at_the_limit(client, chunked):
    sent, total = [0], 200 * MB
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    if not chunked:
        headers["content-length"] = str(sum(len(part) for part in huge_multipart(total, [0])))
    started = time.perf_counter()
    response = client.post("/v1/search", content=huge_multipart(total, sent), headers=headers)
    assert_json_error(response, 413, "request is larger than 20 MB; send a smaller image")
    assert response.headers["connection"] == "close"  # the rest is not read and thrown away
    # Refused unread with a Content-Length; cut off after 20 MB without (plus socket buffers).
    assert sent[0] < (10 if not chunked else 60) * MB, sent[0]
    assert time.perf_counter() - started < 10


# -- names from requests never reach the file system -------------------------------------------

@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/items/..%2F..%2Fetc/0/image", 404),
    ("GET", "/v1/items/..%2Fsecret/0/image", 404),
    ("GET", "/v1/items/%2Fetc%2Fpasswd/0/image", 404),
    ("GET", "/v1/items/tissue%00/0/image", 404),
    ("GET", "/v1/items/../../etc/passwd", 404),  # sent raw: no client-side normalisation
    ("GET", "/v1/items/tissue/..%2F0/image", 404),
    ("GET", "/v1/items/tissue/abc/image", 422),
    ("DELETE", "/v1/indexes/..%2Fsecret/items/0", 404),
    ("DELETE", "/v1/indexes/%2Ftmp/items/0", 404),
    ("DELETE", "/v1/indexes/tissue%00/items/0", 404),
    ("DELETE", "/v1/indexes/../secret/items/0", 404),
    ("DELETE", "/v1/indexes/tissue/items/-1", 404),
    ("DELETE", "/v1/indexes/tissue/items/..%2F0", 404),
])
def test_path_traversal_in_urls(api, indexes_dir, method, path, status):
    connection = http.client.HTTPConnection("127.0.0.1", api["port"], timeout=30)
    connection.request(method, path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == status and response.getheader("content-type") == "application/json", body
    assert set(httpx.Response(status, content=body).json()) == {"error"}
    assert IndexFolder(indexes_dir.parent / "secret").store.count() == 24


@pytest.mark.parametrize("index", ["..%2Fsecret", "%2E%2E%2Fsecret", "%2Fetc", "tissue%00"])
def test_add_item_to_a_traversing_index_name_is_404(client, small_png, indexes_dir, index):
    response = client.post(f"/v1/indexes/{index}/items", files={"image": ("q.png", small_png)}, data={"label": "x"})
    assert_json_error(response, 404, "no index named .*; loaded indexes: tissue|is not an endpoint of this API")
    assert IndexFolder(indexes_dir.parent / "secret").store.count() == 24


def test_add_item_with_wrong_content_type_is_415(client):
    response = client.post("/v1/indexes/tissue/items", json={"image": "x.png", "label": "tumour"})
    assert_json_error(response, 415, "multipart/form-data")


# -- after all of the above ---------------------------------------------------------------------

def test_server_is_unharmed(client, api, synth_data):
    query = (synth_data / "stroma" / "stroma_0003.png").read_bytes()
    response = client.post("/v1/search", files={"image": ("q.png", query)}, data={"k": "3"})
    assert response.status_code == 200 and response.json()["results"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert client.get("/readyz").status_code == 200
    # The server runs in this process: nothing of the 200 MB uploads (or the bombs) stayed
    # in memory, and no spooled upload or connection was left open.
    assert rss_mb() - api["rss_mb"] < 150, (api["rss_mb"], rss_mb())
    assert open_fds() - api["fds"] < 10, (api["fds"], open_fds())


def test_no_error_names_a_server_path(client, api, tmp_path_factory):
    """No message of the whole suite gives away the server's files: its temporary folder
    (where uploaded slides are saved), or the folders of its indexes."""
    assert_json_error(client.post("/v1/search/slides", files={"slide": ("mine.tiff", b"II*\x00 not a slide")}),
                      404, "index 'tissue' holds no slides")
    assert ERROR_BODIES
    private = (tempfile.gettempdir(), "histoseek-slide-", str(tmp_path_factory.getbasetemp()))
    leaks = [body for body in ERROR_BODIES if any(path in body for path in private)]
    assert not leaks, leaks


# -- arbitrary form values and file names (hypothesis) -------------------------------------------

@pytest.fixture(scope="module")
def test_client(indexes_dir, tmp_path_factory, triton_server):
    scratch = tmp_path_factory.mktemp("scratch")
    shutil.copytree(indexes_dir / "tissue", scratch / "tissue")  # items get added: not the shared index
    settings_ = Settings(max_upload_bytes=100_000, max_pixels=100_000, max_k=20)
    with TestClient(create_app(scratch, triton_server.grpc_url, settings=settings_)) as test_client:
        yield test_client


def assert_sane(response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.status_code < 400 or set(response.json()) == {"error"}


FIELD = st.one_of(st.text(max_size=40), st.integers(-10**30, 10**30).map(str),
                  st.sampled_from(["", "tissue", "5", " 5", "5 ", "0x10", "1_0", "+3", "٣", "NaN", "\x00"]))
IMAGE = st.one_of(st.binary(max_size=300), st.sampled_from([b"", encode(Image.new("RGB", (9, 7)), "PNG")]))
CHECKS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@CHECKS
@given(k=FIELD, index=FIELD, filename=st.text(max_size=300), image=IMAGE)
def test_search_form_fields_never_give_a_5xx(test_client, k, index, filename, image):
    assert_sane(test_client.post("/v1/search", data={"k": k, "index": index}, files={"image": (filename, image)}))


@CHECKS
@given(label=st.text(max_size=60), group=st.text(max_size=60), filename=st.text(max_size=300),
       index=st.sampled_from(["tissue", "", "../tissue", "tissue/", "%2e%2e"]), image=IMAGE)
def test_add_form_fields_never_give_a_5xx(test_client, label, group, filename, index, image):
    assert_sane(test_client.post(f"/v1/indexes/{index}/items", data={"label": label, "group": group},
                                 files={"image": (filename, image)}))

"""API keys and CORS against real servers: `histoseek serve` itself as a subprocess (its
command-line flags and everything it logs), and the app under uvicorn in a thread."""
from __future__ import annotations

import os
import secrets
import signal
from dataclasses import fields

import httpx
import numpy as np
import pytest
from PIL import Image

from demo.client import ApiError, SearchClient
from histoseek_cli.main import build_parser, main
from histoseek_cli.serve import api_keys
from histoseek.errors import HistoseekError
from server.api.app import Settings
from tests.images import png
from tests.servers import start_api_process

KEYS = [secrets.token_urlsafe(32), secrets.token_urlsafe(32)]
WRONG = secrets.token_urlsafe(32)
VIEWER = "https://viewer.example.org"
QUERY_PNG = png(np.full((16, 16, 3), (150, 60, 120), np.uint8))


@pytest.fixture(scope="module")
def cli_server(indexes_dir, triton_server, tmp_path_factory):
    """`histoseek -v serve --api-key-file … --cors-origin …`: its URL and the file it logs to."""
    folder = tmp_path_factory.mktemp("cli_server")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# keys of the search API\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    log_file = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "HISTOSEEK_API_KEYS"}  # the key file alone
    process, url = start_api_process(indexes_dir, triton_server.grpc_url, log_file, "--api-key-file", str(key_file),
                                     "--cors-origin", VIEWER, "--max-k", "7", verbose=True, env=env)
    try:
        yield {"url": url, "log": log_file, "process": process}
    finally:
        if process.poll() is None:  # Ctrl-C, as a user stops it; test_keys_never_reach_the_log did already
            process.send_signal(signal.SIGINT)
            process.wait(15)


@pytest.fixture
def serve_app(serve_api, indexes_dir, triton_server):
    """Factory: serve_app(Settings) -> URL of the app over this module's index, once ready."""
    return lambda settings: serve_api(indexes_dir, triton_server.grpc_url, settings=settings, ready=True)


def add(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/indexes/tissue/items", files={"image": ("new.png", QUERY_PNG)},
                      data={"label": "new"}, headers=headers, timeout=30)


def delete(url: str, item_id: int, headers: dict[str, str]) -> httpx.Response:
    return httpx.delete(f"{url}/v1/indexes/tissue/items/{item_id}", headers=headers, timeout=30)


def search(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/search", files={"image": ("q.png", QUERY_PNG)}, data={"k": "3"},
                      headers=headers, timeout=30)


# -- writes need a key; reads stay open unless protected ---------------------------------------

@pytest.mark.slow
def test_writes_need_a_valid_key(cli_server):
    url = cli_server["url"]
    missing = add(url, {})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`" in missing.json()["error"]
    for headers in ({"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG}, {"X-API-Key": KEYS[0][:-1]},
                    {"Authorization": f"Basic {KEYS[0]}"}, {"X-API-Key": KEYS[0] + "x"}):
        refused = add(url, headers)
        assert refused.status_code in (401, 403), refused.text
        assert set(refused.json()) == {"error"}
    assert "not valid for this server" in add(url, {"X-API-Key": WRONG}).json()["error"]

    # Either header, any of the keys (the second one too: every key is compared).
    added = add(url, {"Authorization": f"Bearer {KEYS[1]}"})
    assert added.status_code == 201, added.text
    assert delete(url, added.json()["id"], {}).status_code == 401
    assert delete(url, added.json()["id"], {"Authorization": f"Bearer {WRONG}"}).status_code == 403
    assert delete(url, added.json()["id"], {"x-api-key": KEYS[0]}).status_code == 200


@pytest.mark.slow
def test_reads_stay_open_without_protect_search(cli_server):
    url = cli_server["url"]
    found = search(url)
    assert found.status_code == 200 and len(found.json()["results"]) == 3
    # Refining is a search too: no key needed.
    refined = httpx.post(f"{url}/v1/search/refine", files={"image": ("q.png", QUERY_PNG)},
                         data={"k": "3", "relevant": [str(found.json()["results"][1]["id"])]}, timeout=30)
    assert refined.status_code == 200, refined.text
    assert httpx.get(f"{url}{found.json()['results'][0]['image_url']}").status_code == 200
    assert httpx.get(f"{url}/v1/indexes").status_code == 200
    # The limits came from the command line too.
    too_many = httpx.post(f"{url}/v1/search", files={"image": ("q.png", QUERY_PNG)}, data={"k": "8"})
    assert too_many.status_code == 422 and "between 1 and 7" in too_many.json()["error"]


@pytest.mark.slow
def test_protect_search_keys_every_read_but_health_and_metrics(serve_app):
    url = serve_app(Settings(api_keys=tuple(KEYS), protect_search=True))
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 200, path
    assert search(url).status_code == 401
    assert search(url, {"X-API-Key": WRONG}).status_code == 403
    found = search(url, {"X-API-Key": KEYS[0]})
    assert found.status_code == 200
    thumbnail = f"{url}{found.json()['results'][0]['image_url']}"
    assert httpx.get(thumbnail).status_code == 401
    assert httpx.get(thumbnail, headers={"Authorization": f"bearer  {KEYS[1]}"}).status_code == 200
    assert httpx.get(f"{url}/v1/indexes").status_code == 401
    assert httpx.get(f"{url}/nowhere").status_code == 401  # unknown paths reveal nothing either


@pytest.mark.slow
def test_a_request_without_a_key_is_refused_before_its_body_is_read(serve_app):
    url = serve_app(Settings(api_keys=tuple(KEYS), protect_search=True))
    sent = [0]

    def body():
        for _ in range(30):
            sent[0] += 1_000_000
            yield bytes(1_000_000)

    response = httpx.post(f"{url}/v1/search", content=body(), timeout=30,
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 401 and response.headers["connection"] == "close"
    assert sent[0] < 15_000_000, sent[0]  # only what the socket buffers took; the body limit would be 20 MB


@pytest.mark.slow
def test_no_keys_configured_means_no_keys_needed(serve_app):
    url = serve_app(Settings())
    added = add(url, {})
    assert added.status_code == 201
    assert delete(url, added.json()["id"], {"X-API-Key": WRONG}).status_code == 200  # a key is simply ignored


@pytest.mark.slow
def test_demo_client_sends_its_key(serve_app):
    url = serve_app(Settings(api_keys=tuple(KEYS), protect_search=True))
    with pytest.raises(ApiError, match="401.*histoseek demo --api-key-file"):
        SearchClient(url).indexes()
    with pytest.raises(ApiError, match="403.*histoseek demo --api-key-file"):
        SearchClient(url, api_key=WRONG).indexes()
    client = SearchClient(url, api_key=KEYS[1])
    answer = client.search(Image.new("RGB", (16, 16), (150, 60, 120)), "tissue", 3)
    hits = client.thumbnails(answer["results"])
    assert len(hits) == 3 and all(hit.image is not None for hit in hits)


# -- CORS ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cors_is_off_by_default(serve_app):
    url = serve_app(Settings())
    response = httpx.get(f"{url}/v1/indexes", headers={"Origin": VIEWER})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = httpx.options(f"{url}/v1/search", headers={"Origin": VIEWER, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


@pytest.mark.slow
def test_cors_allows_the_configured_origins_only(cli_server):
    url = cli_server["url"]
    allowed = httpx.get(f"{url}/v1/indexes", headers={"Origin": VIEWER})
    assert allowed.headers["access-control-allow-origin"] == VIEWER
    other = httpx.get(f"{url}/v1/indexes", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    # A browser's preflight for a keyed write needs no key itself, and lets the key header through.
    preflight = httpx.options(f"{url}/v1/indexes/tissue/items", headers={
        "Origin": VIEWER, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == VIEWER
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = httpx.options(f"{url}/v1/search", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # Refusals carry the CORS headers, so that the viewer's page can read the reason.
    assert add(url, {"Origin": VIEWER}).headers["access-control-allow-origin"] == VIEWER


# -- keys never logged --------------------------------------------------------------------------

@pytest.mark.slow
def test_keys_never_reach_the_log(cli_server):
    url = cli_server["url"]
    added = add(url, {"Authorization": f"Bearer {KEYS[0]}"})
    assert added.status_code == 201
    assert add(url, {"X-API-Key": WRONG}).status_code == 403
    delete(url, added.json()["id"], {"X-API-Key": KEYS[1]})
    # Also a key put where it does not belong: it is not read from a query string either.
    assert httpx.get(f"{url}/healthz", params={"note": "ok"}).status_code == 200
    process = cli_server["process"]
    process.send_signal(signal.SIGINT)  # flush and close the log: the last test on this server
    process.wait(15)
    log = cli_server["log"].read_text()
    assert '"POST /v1/indexes/tissue/items HTTP/1.1" 201' in log  # the access log was on
    assert '"POST /v1/indexes/tissue/items HTTP/1.1" 403' in log
    assert "2 API keys, needed for writes" in log
    for key in (*KEYS, WRONG):
        assert key not in log


# -- where keys and limits come from ------------------------------------------------------------

def test_key_file_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSEEK_API_KEYS", raising=False)
    assert api_keys(None) == ()
    monkeypatch.setenv("HISTOSEEK_API_KEYS", f" {KEYS[0]} ,{KEYS[1]},")
    assert api_keys(None) == tuple(KEYS)
    key_file = tmp_path / "keys"
    key_file.write_text(f"# comment\n\n{KEYS[1]}\n")
    assert api_keys(key_file) == (KEYS[1],)  # the file wins over the environment
    key_file.write_text("# only a comment\n")
    with pytest.raises(HistoseekError, match="holds no key"):
        api_keys(key_file)
    with pytest.raises(HistoseekError, match="cannot read the API key file"):
        api_keys(tmp_path / "missing")
    for weak in ("short-key", "a key with spaces in it", "control\x07character-key"):
        key_file.write_text(weak + "\n")
        with pytest.raises(HistoseekError, match="shorter than 16 characters") as refused:
            api_keys(key_file)
        assert weak not in str(refused.value)  # not even a bad key is echoed


def test_protect_search_without_keys_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HISTOSEEK_API_KEYS", raising=False)
    with pytest.raises(SystemExit):
        main(["serve", "--indexes", str(tmp_path), "--protect-search"])
    assert "--protect-search needs API keys" in capsys.readouterr().err
    with pytest.raises(HistoseekError, match="needs API keys"):  # in code as well as from the command line
        Settings(protect_search=True)


def test_serve_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["serve", "--indexes", "x"])
    defaults = {f.name: f.default for f in fields(Settings)}
    assert int(args.max_upload_mb * 1e6) == defaults["max_upload_bytes"]
    assert (args.max_pixels, args.max_k) == (defaults["max_pixels"], defaults["max_k"])
    assert (args.api_key_file, args.protect_search, args.cors_origin) == (None, False, [])
    for bad in (["--max-k", "0"], ["--max-pixels", "-5"], ["--max-upload-mb", "nan"], ["--max-upload-mb", "inf"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--indexes", "x", *bad])

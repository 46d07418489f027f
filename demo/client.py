"""The demo's HTTP client for the search API (no torch, no `training/`: HTTP only).

Every failure, the API being down included, becomes an `ApiError` whose message a
person can read in the page; the demo never shows a stack trace.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import httpx
from PIL import Image

from histoseek.errors import HistoseekError


class ApiError(HistoseekError):
    """The search API could not be reached or answered with an error."""


@dataclass(frozen=True)
class Hit:
    rank: int
    id: str
    score: float
    label: str | None
    image: Image.Image | None  # the thumbnail; None when it could not be fetched


class SearchClient:
    def __init__(self, api_url: str, timeout: float = 30.0, api_key: str | None = None):
        self.api_url = api_url.rstrip("/")
        # Sent with every request: an API run with --protect-search needs it for searches too.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=self.api_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def indexes(self) -> list[dict]:
        """`GET /v1/indexes`: one dict per index (name, encoder, type, count, dimension, labels)."""
        return self._request("GET", "/v1/indexes").json()

    def search(self, image: Image.Image, index: str, k: int, labels: list[str] | None = None) -> dict:
        """`POST /v1/search`, among the items of `labels` if given; the image goes as PNG so
        that it arrives with its exact pixels."""
        data = _search_fields(index, k, labels)
        return self._request("POST", "/v1/search", files=_png_upload(image), data=data).json()

    def refine(self, image: Image.Image, index: str, k: int, relevant: list[str], not_relevant: list[str],
               labels: list[str] | None = None) -> dict:
        """`POST /v1/search/refine`: the same query again with the ids of results the user marked."""
        data = {**_search_fields(index, k, labels), "relevant": list(relevant), "not_relevant": list(not_relevant)}
        return self._request("POST", "/v1/search/refine", files=_png_upload(image), data=data).json()

    def search_text(self, text: str, index: str, k: int, labels: list[str] | None = None) -> dict:
        """`POST /v1/search/text`: the items nearest a text (indexes whose encoder has a text tower)."""
        return self._request("POST", "/v1/search/text", data={**_search_fields(index, k, labels), "text": text}).json()

    def text_prompts(self, index: str) -> dict[str, str]:
        """`GET /v1/indexes/{index}/prompts`: the prompts the index's text tower was trained on, per class."""
        return self._request("GET", f"/v1/indexes/{quote(index, safe='')}/prompts").json()["prompts"]

    def thumbnails(self, results: list[dict]) -> list[Hit]:
        """Fetch each result's thumbnail from the API (the browser may not reach the API itself)."""
        with ThreadPoolExecutor(max_workers=8) as pool:  # keep-alive connections, fetched in parallel
            images = list(pool.map(self._thumbnail, [r.get("image_url") for r in results]))
        return [Hit(int(r["rank"]), str(r["id"]), float(r["score"]), r.get("label"), image)
                for r, image in zip(results, images)]

    # -- whole slides ---------------------------------------------------------------------

    def slides(self, index: str) -> list[dict]:
        """`GET /v1/slides/{index}`: the index's slides (slide, label, width, height, tile_size)."""
        return self._request("GET", f"/v1/slides/{quote(index, safe='')}").json()

    def search_slides(self, index: str, slide_id: str, k: int) -> dict:
        """`POST /v1/search/slides` with a slide of the index (never among its own results)."""
        return self._request("POST", "/v1/search/slides", data={"index": index, "slide_id": slide_id,
                                                                "k": str(k)}).json()

    def slide_thumbnail(self, index: str, slide: str, size: int = 384) -> tuple[Image.Image, float]:
        """A slide's thumbnail and its scale (level-0 px per thumbnail px)."""
        response = self._request("GET", f"/v1/slides/{quote(index, safe='')}/{quote(slide, safe='')}/thumbnail",
                                 params={"size": size})
        image = Image.open(io.BytesIO(response.content)).convert("RGB")
        return image, float(response.headers.get("x-thumbnail-scale") or 1.0)

    def slide_region(self, index: str, slide: str, x: int, y: int, size: int, level: int = 0) -> Image.Image:
        """A square of a slide, `size` px at `level`, top-left at level-0 (x, y)."""
        response = self._request("GET", f"/v1/slides/{quote(index, safe='')}/{quote(slide, safe='')}/region",
                                 params={"x": x, "y": y, "size": size, "level": level})
        return Image.open(io.BytesIO(response.content)).convert("RGB")

    def _thumbnail(self, url: str | None) -> Image.Image | None:
        if not url:
            return None
        try:
            response = self._request("GET", url)
            image = Image.open(io.BytesIO(response.content))
            image.load()
            return image.convert("RGB")
        except (ApiError, OSError):  # one missing thumbnail should not hide the other results
            return None

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ApiError(f"Cannot reach the search API at {self.api_url} (connection refused). "
                           "Is `histoseek serve` running?") from None
        except httpx.TimeoutException:
            raise ApiError(f"The search API at {self.api_url} did not answer in time "
                           f"({self._http.timeout.read:.0f} s).") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"Request to the search API at {self.api_url} failed: {exc}") from None
        if response.status_code in (401, 403):
            raise ApiError(f"The search API answered {response.status_code}: {_error_message(response)}. Start the "
                           "demo with `histoseek demo --api-key-file FILE`, FILE holding a key the API accepts.")
        if response.is_error:
            raise ApiError(f"The search API answered {response.status_code}: {_error_message(response)}")
        return response


def _png_upload(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"image": ("query.png", buffer.getvalue(), "image/png")}


def _search_fields(index: str, k: int, labels: list[str] | None) -> dict:
    return {"index": index, "k": str(k), **({"labels": list(labels)} if labels else {})}


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    if isinstance(body, dict) and body.get("detail"):  # FastAPI's own errors (e.g. a missing field)
        return str(body["detail"])
    return response.reason_phrase or "unknown error"

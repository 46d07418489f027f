"""The search core: image bytes -> decode -> preprocess -> Triton embedding -> index search
(FAISS or Milvus, filtered inside the search).

The API (server/api/app.py) and the served-path evaluation (server/evaluate_served.py) both
go through `SearchCore`, so what is evaluated is exactly what is served. The core also
guards the pairing of index and model: it refuses to embed with a served model whose
checksum or dimension differs from the index's (checked again every few seconds, as
Triton can load a new version while the API runs).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from histoseek.errors import HistoseekError
from histoseek.imaging import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_image, resize_and_crop
from histoseek.metrics import majority_label
from server.job import Stopped
from server.embedder import Embedder
from server.image_cost import check_scans
from server.index.filters import ItemFilter
from server.refine import check_marks, refined_query
from server.index.folder import Hit, IndexFolder, ModelMismatch, check_model
from server.index.store import thumbnail_jpeg

__all__ = ["BadImage", "ImageTooLarge", "SearchCore", "SearchOutcome"]


class BadImage(HistoseekError):
    """The upload is not a readable image, or not one that can be a patch."""


@dataclass(frozen=True)
class SearchOutcome:
    hits: list[Hit]
    vote: tuple[str, float]  # majority label of the hits and its share
    timings_ms: dict[str, float]


Check = Callable[[], None]  # raises to stop the work of an abandoned or late request


def _never() -> None:
    pass


class SearchCore:
    """One index folder paired with the Triton model that embeds its queries."""

    def __init__(self, folder: IndexFolder, embedder: Embedder, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect: float | None = None, check_interval_s: float = 5.0):
        self.folder, self.embedder = folder, embedder
        self.max_pixels, self.max_aspect, self.check_interval_s = max_pixels, max_aspect, check_interval_s
        self._checked: tuple[float, str | None, Exception | None] | None = None
        self._check_lock = threading.Lock()

    def verify_model(self, force: bool = False) -> None:
        """Raise ModelMismatch or TritonUnavailable unless the served model is the index's."""
        manifest = self.folder.manifest
        checked = self._checked
        fresh = (checked is not None and checked[1] == manifest["model_sha256"]
                 and time.monotonic() - checked[0] < self.check_interval_s)
        if force or not fresh:
            with self._check_lock:
                # TritonUnavailable propagates uncached: the next request tries again.
                dim = int(self.embedder.spec()["embedding_dim"])
                try:
                    check_model(manifest, self.folder.name, self.embedder.version_checksum(), dim)
                    error = None
                except ModelMismatch as exc:
                    error = exc
                self._checked = checked = (time.monotonic(), manifest["model_sha256"], error)
        if checked[2] is not None:
            raise checked[2]

    def model_size(self) -> int:
        return int(self.embedder.spec()["input_size"])

    def decode(self, data: bytes, name: str = "image", check: Check = _never) -> Image.Image:
        """The upload as an RGB image, reduced when far larger than the model input. Only the
        allow-listed decoders ever see it; its limits are checked from its header first."""
        size = self.model_size()  # outside the try: Triton being unreachable is not the image's fault
        try:
            check_scans(data, name)
            return decode_image(data, max_pixels=self.max_pixels, max_aspect=self.max_aspect, name=name,
                                model_size=size, check=check)
        except (ImageTooLarge, Stopped):
            raise
        except HistoseekError as exc:
            raise BadImage(str(exc)) from None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return resize_and_crop(image, self.model_size())

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.verify_model()
        return self.embedder.embed(images)

    def search(self, data: bytes, k: int, name: str = "image", check: Check = _never,
               where: ItemFilter | None = None) -> SearchOutcome:
        """Search with one uploaded image among the items `where` admits; timings of each stage
        in milliseconds. `check` is called between the stages (and inside the decode) and may
        raise to stop."""
        marks = [time.perf_counter()]
        embedding = self._embed_upload(data, name, check, marks)
        return self._outcome(embedding, k, where, marks, ("decode", "preprocess", "embed", "search"))

    def refine(self, data: bytes, k: int, relevant: list[int], not_relevant: list[int], name: str = "image",
               check: Check = _never, where: ItemFilter | None = None) -> SearchOutcome:
        """Search again with the uploaded query moved towards the items marked relevant and
        away from those marked not relevant (server/refine.py); nothing is kept between rounds."""
        check_marks(relevant, not_relevant)
        marks = [time.perf_counter()]
        marked = self.folder.vectors([*relevant, *not_relevant])  # unknown ids refused before any decode
        marks.append(time.perf_counter())
        query = self._embed_upload(data, name, check, marks)[0]
        vector = refined_query(query, marked[:len(relevant)], marked[len(relevant):])
        return self._outcome(vector[None], k, where, marks, ("marked", "decode", "preprocess", "embed", "search"))

    def _embed_upload(self, data: bytes, name: str, check: Check, marks: list[float]) -> np.ndarray:
        """The upload's embedding [1, D]; appends a time mark after decode, preprocess, embed."""
        image = self.decode(data, name, check)
        marks.append(time.perf_counter())
        model_input = self.preprocess(image)
        del image
        check()
        marks.append(time.perf_counter())
        embedding = self.embed(model_input[None])
        check()
        marks.append(time.perf_counter())
        return embedding

    def _outcome(self, vectors: np.ndarray, k: int, where: ItemFilter | None, marks: list[float],
                 stages: tuple[str, ...]) -> SearchOutcome:
        hits = self.folder.search(vectors, k, where)[0]
        marks.append(time.perf_counter())
        timings = {stage: (b - a) * 1000 for stage, a, b in zip(stages, marks, marks[1:])}
        timings["total"] = (marks[-1] - marks[0]) * 1000
        return SearchOutcome(hits, majority_label([h.item.label for h in hits]), timings)

    def search_batch(self, images: np.ndarray, k: int,
                     where: ItemFilter | list[ItemFilter | None] | None = None) -> list[list[Hit]]:
        """Search with preprocessed images (uint8 [N, S, S, 3]); one filter for all, or one each."""
        return self.folder.search(self.embed(images), k, where)

    def prepare_item(self, data: bytes, name: str = "image", check: Check = _never) -> tuple[np.ndarray, bytes]:
        """The embedding and stored thumbnail of an image to add to the index."""
        image = self.decode(data, name, check)
        model_input, thumbnail = self.preprocess(image), thumbnail_jpeg(image)
        del image
        check()
        return self.embed(model_input[None])[0], thumbnail

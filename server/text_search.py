"""Search by text: a text -> tokens (here, without torch) -> Triton's `<encoder>_text` -> index search.

An encoder with a text tower (CONCH, PLIP, QuiltNet, HistoSeek's `clip`) is exported with a
second Triton model, `<encoder>_text` (export/text_export.py): token ids INT64 `[N, L]` in,
L2-normalised FP32 embeddings out, in the space of the image model. Its config's
`text_spec` parameter names the tokenizer (histoseek/text_tokenizer.py) and the sha256 of
the image model it was exported with; a text query searches an index only when that is
the index's model, as an image query does.

The input is bounded before any work: at most MAX_TEXT_CHARS characters, and at most the
tower's context length in tokens (refused, not cut: a cut query would silently search
for something else).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from histoseek.errors import HistoseekError
from histoseek.metrics import majority_label
from histoseek.text_tokenizer import TextTooLong, TokenizerSpec, load_tokenizer
from server.embedder import Embedder, ModelNotFound
from server.index.filters import ItemFilter
from server.index.folder import ModelMismatch
from server.search import SearchCore, SearchOutcome

# The encoder families whose text tower HistoSeek exports (or will export) as `<encoder>_text`;
# a family's members are named `<family>` or `<family>-<variant>` (e.g. quiltnet-b-32).
TEXT_ENCODERS = ("clip", "conch", "plip", "quiltnet")


def has_text_family(encoder: str) -> bool:
    return any(encoder == family or encoder.startswith(family + "-") for family in TEXT_ENCODERS)
MAX_TEXT_CHARS = 1000
TEXT_SUFFIX = "_text"


class NoTextTower(HistoseekError):
    """The index's encoder has no text tower served: the request cannot work (400)."""


class InvalidText(HistoseekError):
    """Empty, too long, or not text (422)."""


def check_text(text: str | None) -> str:
    """The query text, whitespace-trimmed, or InvalidText."""
    if text is None or not text.strip():
        raise InvalidText("the text is empty: describe what to find, e.g. 'a histopathology image of "
                          "tubular adenoma'")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidText(f"the text is {len(text)} characters long; at most {MAX_TEXT_CHARS} are read")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise InvalidText("the text holds control characters; send plain text")
    return text.strip()


class TextEmbedder(Embedder):
    """Client of a `<encoder>_text` model: token ids in, embeddings out; its `text_spec` is
    re-read every `check_interval_s`, as Triton may load a new version while the API runs."""

    def __init__(self, url: str, model: str, protocol: str = "grpc", timeout: float = 30,
                 check_interval_s: float = 5.0) -> None:
        super().__init__(url, model, protocol, timeout)
        self.check_interval_s = check_interval_s
        self._text_spec: tuple[float, dict] | None = None

    def text_spec(self) -> dict:
        cached = self._text_spec
        if cached is None or time.monotonic() - cached[0] > self.check_interval_s:
            params, self._max_batch_size = self._parameters()
            if "text_spec" not in params:
                raise HistoseekError(f"model {self.model!r} on Triton at {self.url} has no text_spec parameter: it "
                                     "was not exported by histoseek; export it with `histoseek export`")
            cached = self._text_spec = (time.monotonic(), json.loads(params["text_spec"]))
        return cached[1]

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        inputs = self._module.InferInput("tokens", list(tokens.shape), "INT64")
        inputs.set_data_from_numpy(tokens)
        outputs = self._module.InferRequestedOutput("embeddings")
        return self._call("infer", self.model, [inputs], outputs=[outputs]).as_numpy("embeddings")


@dataclass(frozen=True)
class TextQuery:
    text: str
    tokens: int  # start and end tokens included


class TextSearch:
    """Text search over the API's SearchCores; one TextEmbedder per served encoder."""

    def __init__(self, tokenizer_dirs: Iterable[Path | str] = (), check_interval_s: float = 5.0) -> None:
        self.tokenizer_dirs = tuple(Path(d) for d in tokenizer_dirs)
        self.check_interval_s = check_interval_s
        self._embedders: dict[tuple[str, str, str], TextEmbedder] = {}
        self._lock = threading.Lock()

    def embedder(self, core: SearchCore) -> TextEmbedder:
        image = core.embedder
        key = (image.url, image.protocol, image.model)
        with self._lock:
            if key not in self._embedders:
                self._embedders[key] = TextEmbedder(image.url, image.model + TEXT_SUFFIX, image.protocol,
                                                    image.timeout, self.check_interval_s)
            return self._embedders[key]

    def text_spec(self, core: SearchCore) -> dict:
        """The served text tower's spec, checked against the index; NoTextTower or ModelMismatch if unusable."""
        encoder, name = core.folder.manifest["encoder"], core.folder.name
        embedder = self.embedder(core)
        try:
            spec = embedder.text_spec()
        except ModelNotFound:
            works = ", ".join(TEXT_ENCODERS)
            if has_text_family(encoder):
                raise NoTextTower(
                    f"index {name!r}'s encoder {encoder!r} has a text tower, but Triton at {embedder.url} does not "
                    f"serve {embedder.model!r}: export it (`histoseek export --checkpoint DIR`, which writes both "
                    f"towers of a checkpoint trained with this version) and load it into Triton") from None
            raise NoTextTower(f"index {name!r}'s encoder {encoder!r} has no text tower; text search works with: "
                              f"{works}") from None
        expected = core.folder.manifest.get("model_sha256")
        if spec.get("image_model_sha256") != expected:
            raise ModelMismatch(
                f"index {name!r} was built with model {encoder!r} sha256 {expected}, but the text tower Triton serves "
                f"({embedder.model!r}) was exported with image model sha256 {spec.get('image_model_sha256')}: texts "
                "and the index would be in different spaces; export the index's checkpoint again (both towers) or "
                "rebuild the index with the served model")
        return spec

    def prompts(self, core: SearchCore) -> dict[str, str]:
        """The prompts the index's text tower was trained on, per class (empty if none)."""
        return dict(self.text_spec(core).get("prompts") or {})

    def query(self, core: SearchCore, text: str) -> tuple[TextQuery, np.ndarray]:
        """The checked text and its token ids `[1, L]`."""
        text = check_text(text)
        spec = self.text_spec(core)
        tokenizer = load_tokenizer(TokenizerSpec.from_dict(spec["tokenizer"]), self.tokenizer_dirs)
        try:
            tokens = tokenizer([text], truncate=False)
        except TextTooLong as exc:
            raise InvalidText(str(exc)) from None
        return TextQuery(text, int((tokens[0] != 0).sum())), tokens

    def search(self, core: SearchCore, text: str, k: int, where: ItemFilter | None = None) -> SearchOutcome:
        """The k items nearest the text among those `where` admits; timings in milliseconds."""
        marks = [time.perf_counter()]
        core.verify_model()  # the image model the index was built with is the one served
        _, tokens = self.query(core, text)
        marks.append(time.perf_counter())
        embedding = self.embedder(core).embed_tokens(tokens)
        marks.append(time.perf_counter())
        hits = core.folder.search(embedding, k, where)[0]
        marks.append(time.perf_counter())
        timings = {stage: (b - a) * 1000 for stage, a, b in zip(("tokenize", "embed", "search"), marks, marks[1:])}
        timings["total"] = (marks[-1] - marks[0]) * 1000
        return SearchOutcome(hits, majority_label([h.item.label for h in hits]), timings)


def search_text_command(index_dir: Path, text: str, *, k: int, where: ItemFilter | None, triton_url: str,
                        protocol: str, tokenizer_dirs: Iterable[Path] = ()) -> dict:
    """`histoseek search text`: the JSON answer, as /v1/search/text gives it."""
    from server.index.folder import IndexFolder

    if k < 1:
        raise HistoseekError(f"-k must be at least 1, got {k}")
    folder = IndexFolder(Path(index_dir))
    try:
        core = SearchCore(folder, Embedder(triton_url, folder.manifest["encoder"], protocol))
        core.verify_model(force=True)
        outcome = TextSearch(tokenizer_dirs).search(core, text, k, where)
    finally:
        folder.close()
    return {
        "index": folder.name, "k": k, "text": text.strip(), "filter": where.describe() if where is not None else None,
        "results": [{"rank": rank, "id": hit.id, "score": round(hit.score, 6), "label": hit.item.label,
                     "group": hit.item.group, "source": hit.item.shown_source}
                    for rank, hit in enumerate(outcome.hits, 1)],
        "vote": {"label": outcome.vote[0], "share": outcome.vote[1]},
        "timings_ms": {stage: round(ms, 3) for stage, ms in outcome.timings_ms.items()},
    }

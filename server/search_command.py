"""`histoseek search image`: one query image against a local index folder, with filters, and
refined by marked results (`--relevant` / `--not-relevant`)."""
from __future__ import annotations

from pathlib import Path

from histoseek.errors import HistoseekError
from server.embedder import Embedder
from server.index.filters import ItemFilter
from server.index.folder import IndexFolder
from server.search import SearchCore


def search_image_command(index_dir: Path, image: Path, *, k: int, where: ItemFilter | None, triton_url: str,
                         protocol: str, relevant: list[int] | None = None,
                         not_relevant: list[int] | None = None) -> dict:
    """The JSON answer: the k best items `where` admits, as /v1/search gives them; with marks,
    as /v1/search/refine does."""
    if k < 1:
        raise HistoseekError(f"-k must be at least 1, got {k}")
    try:
        data = Path(image).read_bytes()
    except OSError as exc:
        raise HistoseekError(f"cannot read query image {image}: {exc.strerror}") from exc
    folder = IndexFolder(Path(index_dir))
    try:
        core = SearchCore(folder, Embedder(triton_url, folder.manifest["encoder"], protocol))
        core.verify_model(force=True)
        if relevant or not_relevant:
            outcome = core.refine(data, k, relevant or [], not_relevant or [], name=Path(image).name, where=where)
        else:
            outcome = core.search(data, k, name=Path(image).name, where=where)
    finally:
        folder.close()
    return {
        "index": folder.name, "k": k, "filter": where.describe() if where is not None else None,
        "results": [{"rank": rank, "id": hit.id, "score": round(hit.score, 6), "label": hit.item.label,
                     "group": hit.item.group, "source": hit.item.shown_source}
                    for rank, hit in enumerate(outcome.hits, 1)],
        "vote": {"label": outcome.vote[0], "share": outcome.vote[1]},
        "timings_ms": {stage: round(ms, 3) for stage, ms in outcome.timings_ms.items()},
    }

"""Slide search: a query slide's mosaic against the tiles of an index, archive slides ranked.

The query slide becomes its mosaic (histoseek/slides/plan.py: the same plan as when
slides are indexed), each mosaic tile is embedded through Triton and searched in the index.
For every query tile and every archive slide among its neighbours, the best match is kept;
an archive slide's score is the **median over the query tiles of their best-match
similarity** (Yottixel's slide-to-slide score, Kalra et al. 2020). The median, not the
mean or the maximum, because a slide should win when most of the query's tissue finds its
like there: one look-alike tile (stroma is everywhere, a fold, a pen mark) cannot carry a
slide, and a few query tiles with no match anywhere cannot sink the right one. A query tile
whose neighbours hold no tile of a slide counts that slide at the lowest similarity it
fetched (the true best match is no better). The query's own slide is never a result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from histoseek.errors import HistoseekError
from histoseek.imaging import resize_and_crop
from histoseek.metrics import majority_label
from server.index.filters import ItemFilter
from server.search import SearchCore
from server.index.store import SlideRecord

NEIGHBOURS = 64  # index tiles fetched per query tile (beyond the query's own slide)
MAX_QUERY_TILES = 256  # a query's mosaic is cut down to this many tiles (evenly, by position order)
MATCHES_SHOWN = 5  # tile pairs returned per result slide
SEARCH_CHUNK = 16  # query tiles searched at once (see the search loop of search_plan)
# Tiles read and embedded at once. Small, because a patch query that reaches Triton while a
# mosaic batch runs waits for that batch, and because the request's stop (and the patch
# searches it gives way to) are checked between batches. (Triton's request priorities were
# tried: in the pip Triton 2.51 with the python backend, a model with `priority_levels` made
# ~1 in 25 queries wait 0.4-0.5 s even on an idle server, so they are not used.)
EMBED_BATCH = 8


class NoSuchSlide(HistoseekError):
    """A slide id the index does not hold (404 at the API)."""


class NoTissue(HistoseekError):
    """A query slide whose tissue mask holds no tile: nothing to search with (422 at the API)."""


@dataclass
class QueryPlan:
    """A query slide, open, with the level-0 positions of the mosaic tiles it will be searched with."""
    opened: object  # histoseek.slides.reader.Slide
    positions: np.ndarray  # int64 [M, 2], at most max_query_tiles
    tile: int
    mpp: float
    query: str  # its name in answers
    own: str | None  # its slide id when it is a slide of the index (never a result)

    @property
    def tiles(self) -> int:
        return len(self.positions)

    def close(self) -> None:
        self.opened.close()


@dataclass(frozen=True)
class TileMatch:
    query_xy: tuple[int, int]  # level-0 px of the query tile in the query slide
    item_id: int  # the matched index item
    xy: tuple[int, int]  # level-0 px of the matched tile in its slide
    score: float


@dataclass(frozen=True)
class SlideResult:
    slide: str
    label: str
    score: float  # median over query tiles of the best-match cosine similarity
    matches: list[TileMatch]


@dataclass
class SlideSearchOutcome:
    query: str
    query_tiles: list[tuple[int, int]]
    results: list[SlideResult]
    vote: tuple[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)


def rank_slides(scores: np.ndarray, slides: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Yottixel's median-of-best-match ranking from each query tile's neighbours.

    `scores` [Q, N] similarities (best first per row, -inf where padded) and `slides` [Q, N]
    int slide codes (-1 where padded). Returns (codes, scores) of the k best slides and the
    best-match column [Q, k] of each query tile for them (-1: not among its neighbours)."""
    valid = slides >= 0
    if not valid.any():
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((len(scores), 0), np.int64)
    found, code_of = np.unique(slides[valid], return_inverse=True)
    dense = np.full(slides.shape, -1, np.int64)
    dense[valid] = code_of
    floor = np.where(valid, scores, np.inf).min(axis=1)  # lowest similarity fetched per query tile
    best = np.repeat(floor[:, None], len(found), axis=1).astype(np.float32)
    where = np.full((len(scores), len(found)), -1, np.int64)
    for row in range(len(scores)):
        codes = dense[row][valid[row]]
        columns = np.flatnonzero(valid[row])
        # Rows are sorted best first: a slide's first occurrence is its best match.
        unique, first = np.unique(codes, return_index=True)
        best[row, unique] = scores[row, columns[first]]
        where[row, unique] = columns[first]
    totals = np.median(best, axis=0)
    order = np.argsort(-totals, kind="stable")[:k]
    return found[order], totals[order], where[:, order]


class SlideSearch:
    """Slide search over one index (its SearchCore: the index and its Triton model)."""

    def __init__(self, core: SearchCore, neighbours: int = NEIGHBOURS, max_query_tiles: int = MAX_QUERY_TILES):
        self.core, self.neighbours, self.max_query_tiles = core, neighbours, max_query_tiles

    def slide_record(self, slide: str) -> SlideRecord:
        record = self.core.folder.store.slide(slide)
        if record is None:
            raise NoSuchSlide(f"index {self.core.folder.name!r} holds no slide {slide[:120]!r}; "
                              "list its slides with GET /v1/slides/<index>")
        return record

    def tiling(self) -> tuple[int, float]:
        """(tile px, µm/px) the index's slides were tiled at: a query slide is tiled alike."""
        records = self.core.folder.store.slides()
        if not records:
            raise NoSuchSlide(f"index {self.core.folder.name!r} holds no slides; build it from a folder made by "
                                 "`histoseek data prepare --format slides`")
        return records[0].tile, records[0].mpp

    def query_by_id(self, slide: str, k: int, check: Callable[[], None] = lambda: None) -> SlideSearchOutcome:
        """Search with a slide of the index: its mosaic tiles, read again from its file."""
        plan = self.plan_id(slide)
        try:
            return self.search_plan(plan, k, check)
        finally:
            plan.close()

    def query_by_file(self, path: Path, k: int, *, slide_mpp: float | None = None, name: str | None = None,
                      max_overview_pixels: int | None = None,
                      check: Callable[[], None] = lambda: None) -> SlideSearchOutcome:
        """Search with a slide file: planned (mask, tiles, mosaic) as the index's slides were."""
        plan = self.plan_file(path, slide_mpp=slide_mpp, name=name, max_overview_pixels=max_overview_pixels)
        try:
            check()
            return self.search_plan(plan, k, check)
        finally:
            plan.close()

    def plan_id(self, slide: str) -> QueryPlan:
        """A slide of the index as a query: its mosaic (as indexed), its file open."""
        from histoseek.slides.reader import Slide

        record = self.slide_record(slide)
        items = self.core.folder.store.slide_items(slide, mosaic_only=True) or \
            self.core.folder.store.slide_items(slide)
        positions = np.array([(item.x, item.y) for item in items], np.int64).reshape(-1, 2)
        opened = Slide(record.file, record.slide_mpp, name=slide)
        return self._capped(QueryPlan(opened, positions, record.tile, record.mpp, slide, slide))

    def plan_file(self, path: Path, *, slide_mpp: float | None = None, name: str | None = None,
                  max_overview_pixels: int | None = None) -> QueryPlan:
        """A slide file as a query, planned from its low level only (no tile is read yet):
        its cost, `plan.tiles`, is known before the work. NoTissue when its mask is empty."""
        from histoseek.slides.plan import MASK_FRACTION, plan_slide
        from histoseek.slides.reader import Slide
        from histoseek.slides.tissue_mask import MASK_MPP, MIN_OD, MIN_SATURATION

        tile, mpp = self.tiling()
        name = name or Path(path).name
        opened = Slide(path, slide_mpp, name=name)
        try:
            plan = plan_slide(opened, tile, mpp, max_overview_pixels=max_overview_pixels)
            if not len(plan.mosaic):
                raise NoTissue(
                    f"no tissue found in {name} (mask threshold: HSV saturation above max({MIN_SATURATION:g}, Otsu) "
                    f"and optical density above {MIN_OD:g} at {MASK_MPP:g} µm/px, covering at least "
                    f"{MASK_FRACTION:.0%} of a {plan.reading.footprint} px tile); send a slide with stained tissue "
                    "on it, not a blank or background-only scan")
            return self._capped(QueryPlan(opened, plan.positions[plan.mosaic], tile, mpp, name, None))
        except BaseException:
            opened.close()
            raise

    def _capped(self, plan: QueryPlan) -> QueryPlan:
        if not len(plan.positions):
            plan.close()
            raise NoTissue(f"no tissue found in {plan.query}: it has no tiles to search with")
        if len(plan.positions) > self.max_query_tiles:
            plan.positions = plan.positions[np.linspace(0, len(plan.positions) - 1,
                                                        self.max_query_tiles).round().astype(int)]
        return plan

    def search_plan(self, plan: QueryPlan, k: int, check: Callable[[], None] = lambda: None,
                    progress=None) -> SlideSearchOutcome:
        """Read, embed (EMBED_BATCH tiles at a time) and search the plan's tiles; `check` between
        batches may stop the work (or wait), `progress.advance(n)` reports it."""
        opened, positions, tile, own, query = plan.opened, plan.positions, plan.tile, plan.own, plan.query
        marks, read_s = [time.perf_counter()], 0.0
        reading, size = opened.tiling(tile, plan.mpp), self.core.model_size()
        parts = []
        for start in range(0, len(positions), EMBED_BATCH):
            check()
            began = time.perf_counter()
            batch = np.stack([resize_and_crop(Image.fromarray(opened.read_tile(x, y, tile, reading)), size)
                              for x, y in positions[start:start + EMBED_BATCH].tolist()])
            read_s += time.perf_counter() - began
            check()
            parts.append(self.core.embed(batch))
            if progress is not None:
                progress.advance(len(batch))
        vectors = np.concatenate(parts)
        check()
        marks.append(time.perf_counter())
        # Searched a few query tiles at a time, checking between: fetching 64 neighbours' records
        # for every tile is the one long stretch of Python in a slide search, and a patch search
        # waiting for the interpreter meanwhile would wait for all of it.
        not_own, hits = (ItemFilter(exclude_groups=(own,)) if own else None), []
        for start in range(0, len(vectors), SEARCH_CHUNK):
            check()
            hits += self.core.folder.search(vectors[start:start + SEARCH_CHUNK], self.neighbours, not_own)
        scores = np.full((len(hits), self.neighbours), -np.inf, np.float32)
        codes = np.full((len(hits), self.neighbours), -1, np.int64)
        names: dict[str, int] = {}
        for row, row_hits in enumerate(hits):
            for column, hit in enumerate(row_hits):
                if hit.item.mpp > 0 and hit.item.group != own:  # slide tiles only, never the own slide
                    scores[row, column] = hit.score
                    codes[row, column] = names.setdefault(hit.item.group, len(names))
        slide_codes, totals, where = rank_slides(scores, codes, k)
        marks.append(time.perf_counter())
        by_code = {code: name for name, code in names.items()}
        results = []
        for column, (code, total) in enumerate(zip(slide_codes.tolist(), totals.tolist())):
            pairs = [(row, int(where[row, column])) for row in range(len(hits)) if where[row, column] >= 0]
            pairs.sort(key=lambda pair: -hits[pair[0]][pair[1]].score)
            matches = [TileMatch((int(positions[row][0]), int(positions[row][1])), hits[row][col].id,
                                 (hits[row][col].item.x, hits[row][col].item.y), round(hits[row][col].score, 6))
                       for row, col in pairs[:MATCHES_SHOWN]]
            label = hits[pairs[0][0]][pairs[0][1]].item.label if pairs else ""
            results.append(SlideResult(by_code[code], label, round(float(total), 6), matches))
        # Reading and embedding alternate batch by batch: "embed" is their time less the reading.
        total_read_embed = marks[1] - marks[0]
        timings = {"read": read_s * 1000, "embed": (total_read_embed - read_s) * 1000,
                   "search": (marks[2] - marks[1]) * 1000, "total": (marks[-1] - marks[0]) * 1000}
        return SlideSearchOutcome(query, [tuple(map(int, p)) for p in positions.tolist()], results,
                                  majority_label([r.label for r in results]), timings)


def outcome_json(outcome: SlideSearchOutcome, index: str) -> dict:
    """The answer of `histoseek search slide` and POST /v1/search/slides."""
    from urllib.parse import quote

    return {
        "index": index, "query": outcome.query, "query_tiles": len(outcome.query_tiles),
        "results": [{"rank": rank, "slide": r.slide, "label": r.label, "score": r.score,
                     "thumbnail_url": f"/v1/slides/{quote(index, safe='')}/{quote(r.slide, safe='')}/thumbnail",
                     "matches": [{"query_x": m.query_xy[0], "query_y": m.query_xy[1], "id": m.item_id,
                                  "x": m.xy[0], "y": m.xy[1], "score": m.score} for m in r.matches]}
                    for rank, r in enumerate(outcome.results, 1)],
        "vote": {"label": outcome.vote[0], "share": outcome.vote[1]},
        "timings_ms": {stage: round(ms, 3) for stage, ms in outcome.timings_ms.items()},
    }


def search_slide_command(index_dir: Path, *, slide: Path | None, slide_id: str | None, k: int,
                         slide_mpp: float | None, triton_url: str, protocol: str) -> dict:
    """`histoseek search slide`: one query slide (a file, or a slide of the index) -> JSON answer."""
    from server.embedder import Embedder
    from server.index.folder import IndexFolder

    if k < 1:
        raise HistoseekError(f"-k must be at least 1, got {k}")
    folder = IndexFolder(Path(index_dir))
    try:
        searcher = SlideSearch(SearchCore(folder, Embedder(triton_url, folder.manifest["encoder"], protocol)))
        if slide_id is not None:
            outcome = searcher.query_by_id(slide_id, k)
        else:
            outcome = searcher.query_by_file(Path(slide), k, slide_mpp=slide_mpp)
    finally:
        folder.close()
    return outcome_json(outcome, folder.name)

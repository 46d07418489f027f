"""`histoseek bench slides`: slide search on synthetic slides with a trained encoder.

1. Retrieval: N synthetic slides of >= 4 labels are prepared (mask, tiles, mosaic), indexed
   through Triton + FAISS, and each slide searches the others (own slide excluded): the
   top-5 slides' majority vote against the slide's label. Baseline: one random tile of the
   slide searched as a patch, majority vote of its 5 nearest tiles of other slides.
2. Ingest: one large slide (40,000 x 40,000 px by default) and a 4x smaller one are
   prepared in child processes that report their peak RSS: tiles/s, and memory that
   should not grow with the slide.
3. Search time: archives of 100 / 1,000 / 10,000 slides, made of the real slides' mosaic
   vectors and, past the real ones, vectors sampled around them (a real mosaic plus
   Gaussian noise, renormalised); one query slide's mosaic searched and ranked
   (server/slides/search.rank_slides), exact (flat) and compact (IVF-PQ) index.

Everything is cached in the work folder, so a rerun measures without re-rendering.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from benchmarks.results_files import figure, write_results
from histoseek.imaging import resize_and_crop
from histoseek.metrics import majority_label
from server.index.build import build_index
from server.index.folder import MANIFEST_FILE, IndexFolder
from server.index.types import new_faiss_index, search_parameters
from server.slides.search import NEIGHBOURS, SlideSearch, rank_slides
from server.search import SearchCore
from server.embedder import Embedder

log = logging.getLogger(__name__)

TILE, MPP = 128, 0.5  # synthetic slides are 0.5 µm/px; tiles on their texture grid
INGEST_TILE = 224  # the large slide is cut as a real one would be, 224 px at 0.5 µm/px
QUERIES = 20  # query slides timed per archive size


def _checkpoint(workdir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    from training.data.synthetic import synthesize
    from training.train import TrainConfig, train

    out = workdir / "simclr"
    if not (out / "encoder.json").is_file():
        tiles = workdir / "train_tiles"
        if not tiles.is_dir():
            synthesize(tiles, classes=8, per_class=60, seed=11)
        log.info("training simclr (cpu preset: ImageNet EfficientNet-Lite0, fine-tuned) for one epoch")
        train(TrainConfig(encoder="simclr", data=str(tiles), out=str(out), epochs=1))
    return out


def _slides(workdir: Path, slides: int, classes: int, size: int) -> Path:
    from training.data.prepare_slides import prepare_slides
    from training.data.synthetic_slides import synthesize_slides

    folder, tiles = workdir / f"slides_{slides}_{classes}_{size}", workdir / f"slide_tiles_{slides}_{classes}_{size}"
    if not folder.is_dir():
        synthesize_slides(folder, slides, classes=classes, size=size, seed=2026)
    if not (tiles / "manifest.csv").is_file():
        prepare_slides(folder, tiles, tile=TILE, mpp=MPP)
    return tiles


def retrieval(searcher: SlideSearch, tiles: Path, seed: int = 0) -> dict:
    """Slide-level top-5 majority vote, and the single-random-tile baseline."""
    store, rng = searcher.core.folder.store, np.random.default_rng(seed)
    slide_hits, tile_hits, times = 0, 0, []
    records = store.slides()
    per_slide = []
    for record in records:
        outcome = searcher.query_by_id(record.slide, 5)
        times.append(outcome.timings_ms["total"])
        slide_hits += outcome.vote[0] == record.label
        items = store.slide_items(record.slide)
        item = items[int(rng.integers(len(items)))]
        image = Image.open(item.path).convert("RGB")
        hits = searcher.core.search_batch(resize_and_crop(image, searcher.core.model_size())[None], 5,
                                          [record.slide])[0]
        tile_hits += majority_label([h.item.label for h in hits])[0] == record.label
        per_slide.append({"slide": record.slide, "label": record.label, "vote": outcome.vote[0],
                          "top": [r.slide for r in outcome.results], "tile_vote": majority_label(
                              [h.item.label for h in hits])[0]})
    n = len(records)
    return {"slides": n, "labels": sorted({r.label for r in records}),
            "mosaic_top5_majority_vote": slide_hits / n, "single_tile_top5_majority_vote": tile_hits / n,
            "query_ms_median": float(np.median(times)), "per_slide": per_slide}


# The child's own peak is VmHWM (its memory's high-water mark, new at exec); getrusage's
# ru_maxrss would carry over the benchmark process's peak across the exec.
_INGEST_CHILD = """
import json, re, sys, time
from training.data.prepare_slides import prepare_slides
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) / 1024
before = hwm()
start = time.perf_counter()
report = prepare_slides(sys.argv[1], sys.argv[2], tile=int(sys.argv[3]), mpp=float(sys.argv[4]))
print(json.dumps({"tiles": report.tiles_written, "mosaic_tiles": report.mosaic_tiles,
                  "seconds": time.perf_counter() - start, "peak_rss_mb": hwm(), "rss_after_imports_mb": before}))
"""


def ingest(workdir: Path, side: int) -> dict:
    """Prepare one `side` x `side` px slide in a child process: tiles/s and peak RSS."""
    from training.data.synthetic_slides import make_slide, write_slide

    folder = workdir / f"big_{side}"
    slide = folder / "tumour" / "big.tiff"
    if not slide.is_file():
        slide.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing a %d x %d px synthetic slide", side, side)
        started = time.perf_counter()
        write_slide(slide.with_suffix(".part"), make_slide("tumour", "stroma", side, side, MPP, 99))
        slide.with_suffix(".part").rename(slide)
        log.info("written in %.0f s (%.0f MB)", time.perf_counter() - started, slide.stat().st_size / 1e6)
    out = workdir / f"big_{side}_tiles"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    log.info("preparing the %d px slide in a child process", side)
    done = subprocess.run([sys.executable, "-c", _INGEST_CHILD, str(folder), str(out), str(INGEST_TILE), str(MPP)],
                          check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)  # tens of thousands of PNGs: measured, not kept
    return {"side": side, "tile": INGEST_TILE, "mpp": MPP, **result, "tiles_per_s": result["tiles"] / result["seconds"],
            "slide_mb": slide.stat().st_size / 1e6}


def _mosaic_vectors(searcher: SlideSearch) -> list[np.ndarray]:
    """The real slides' mosaic embeddings, one array per slide (embedded through Triton)."""
    store, size = searcher.core.folder.store, searcher.core.model_size()
    vectors = []
    for record in store.slides():
        items = store.slide_items(record.slide, mosaic_only=True)
        images = np.stack([resize_and_crop(Image.open(i.path).convert("RGB"), size) for i in items])
        vectors.append(searcher.core.embed(images))
    return vectors


def search_time(real: list[np.ndarray], archives: list[int], seed: int = 0) -> list[dict]:
    """ms per query slide (FAISS search of its mosaic + ranking) against archives of each size."""
    rng = np.random.default_rng(seed)
    dim = real[0].shape[1]
    rows = []
    for slides in archives:
        mosaics = [real[i] if i < len(real) else _around(real[int(rng.integers(len(real)))], rng)
                   for i in range(slides)]
        vectors = np.ascontiguousarray(np.concatenate(mosaics), dtype=np.float32)
        codes = np.concatenate([np.full(len(m), i) for i, m in enumerate(mosaics)])
        for kind in ("flat", "ivfpq"):
            started = time.perf_counter()
            index, params = new_faiss_index(kind, dim, vectors)
            index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
            build_s = time.perf_counter() - started
            timings = []
            for q in range(QUERIES):
                query = real[q % len(real)]
                started = time.perf_counter()
                scores, ids = index.search(query, NEIGHBOURS, params=search_parameters(kind, params, NEIGHBOURS))
                slide_codes = np.where(ids >= 0, codes[np.maximum(ids, 0)], -1)
                slide_codes[slide_codes == q % len(real)] = -1  # own slide out, as in the service
                rank_slides(scores, slide_codes, 5)
                timings.append((time.perf_counter() - started) * 1000)
            rows.append({"archive_slides": slides, "vectors": len(vectors), "index": kind,
                         "ms_per_query_slide": float(np.median(timings)), "build_s": build_s,
                         "bytes_per_vector": _bytes_per_vector(index, len(vectors))})
            log.info("%d slides (%d vectors), %s: %.2f ms per query slide", slides, len(vectors), kind,
                     rows[-1]["ms_per_query_slide"])
    return rows


def _around(mosaic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A new slide near a real one: its mosaic with noise (cosine ~0.9 to the original), renormalised."""
    noisy = mosaic + rng.normal(0, 0.5 / np.sqrt(mosaic.shape[1]), mosaic.shape)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def _bytes_per_vector(index: faiss.Index, count: int) -> float:
    return len(faiss.serialize_index(index)) / max(count, 1)


def markdown(report: dict) -> str:
    r = report["retrieval"]
    lines = [
        "# Slide search (synthetic slides)", "",
        f"Encoder: {report['encoder']}. {r['slides']} slides of {len(r['labels'])} labels ({', '.join(r['labels'])}), "
        f"tiles {TILE} px at {MPP} µm/px, own slide excluded.", "",
        "| query | top-5 majority vote |", "|---|---|",
        f"| slide mosaic (Yottixel median of best matches) | {r['mosaic_top5_majority_vote']:.3f} |",
        f"| one random tile of the slide | {r['single_tile_top5_majority_vote']:.3f} |", "",
        f"Median time per query slide through Triton + FAISS (read, embed, search): {r['query_ms_median']:.0f} ms.", "",
    ]
    if report.get("ingest"):
        lines += [f"Ingest (`data prepare --format slides`, {INGEST_TILE} px tiles at {MPP} µm/px, one process):", "",
                  "| slide | tiles | tiles/s | peak RSS |", "|---|---|---|---|"]
        lines += [f"| {i['side']:,} x {i['side']:,} px ({i['slide_mb']:.0f} MB) | {i['tiles']:,} | "
                  f"{i['tiles_per_s']:.0f} | {i['peak_rss_mb']:.0f} MB |" for i in report["ingest"]]
        lines.append("")
    lines += ["| archive slides | vectors | index | ms per query slide | bytes/vector |", "|---|---|---|---|---|"]
    lines += [f"| {row['archive_slides']:,} | {row['vectors']:,} | {row['index']} | {row['ms_per_query_slide']:.2f} | "
              f"{row['bytes_per_vector']:.0f} |" for row in report["search_time"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    r, ingested = report["retrieval"], report.get("ingest") or []
    with figure(path, 1, 3 if ingested else 2, dpi=110, figsize=(15 if ingested else 10, 3.8)) as axes:
        left, right = axes[0], axes[1]
        bars = left.bar(["slide mosaic", "one random tile"],
                        [r["mosaic_top5_majority_vote"], r["single_tile_top5_majority_vote"]], color=["C0", "C7"])
        left.bar_label(bars, fmt="%.2f")
        left.set_ylim(0, 1.05)
        left.set_ylabel("top-5 majority vote = label")
        left.set_title(f"{r['slides']} synthetic slides, {len(r['labels'])} labels")
        for kind, colour in (("flat", "C0"), ("ivfpq", "C1")):
            rows = [row for row in report["search_time"] if row["index"] == kind]
            right.plot([row["archive_slides"] for row in rows], [row["ms_per_query_slide"] for row in rows], "o-",
                       color=colour, label=f"{kind} ({'exact' if kind == 'flat' else 'compact'})")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("archive size (slides)")
        right.set_ylabel("ms per query slide (search + rank)")
        right.legend()
        right.set_title("search time vs archive")
        if ingested:
            memory = axes[2]
            sides = [f"{i['side'] // 1000}k" for i in ingested]
            bars = memory.bar(sides, [i["peak_rss_mb"] for i in ingested], color="C2")
            memory.bar_label(bars, labels=[f"{i['peak_rss_mb']:.0f} MB\n{i['tiles_per_s']:.0f} tiles/s"
                                           for i in ingested])
            memory.set_ylim(0, max(i["peak_rss_mb"] for i in ingested) * 1.35)
            memory.set_xlabel("slide side (px)")
            memory.set_ylabel("peak RSS of the ingest (MB)")
            memory.set_title("ingest memory vs slide size")


def bench_slides_command(*, checkpoint: Path | None, slides: int, classes: int, slide_size: int, big_slide: int,
                         archives: list[int], workdir: Path, results: Path) -> str:
    from benchmarks.served_models import running_triton
    from export.export_checkpoint import export_checkpoint
    from export.repository import latest_version_dir

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(workdir, checkpoint)
    spec = json.loads((ckpt / "encoder.json").read_text())
    name, repo = spec["name"], workdir / "model_repository"
    if latest_version_dir(repo / name) is None:
        export_checkpoint(ckpt, repo, verify_data=_slides(workdir, slides, classes, slide_size))
    tiles = _slides(workdir, slides, classes, slide_size)
    report: dict = {"encoder": f"{name} ({spec.get('preset', '')}) from {ckpt}",
                    "settings": {"slides": slides, "classes": classes, "slide_size": slide_size, "tile": TILE,
                                 "mpp": MPP, "neighbours": NEIGHBOURS, "archives": archives}}
    with running_triton(repo, workdir / "triton") as info:
        out = workdir / f"index_{tiles.name}_{name}"
        if not (out / MANIFEST_FILE).is_file():
            build_index(name, tiles, out, triton_url=info.grpc_url, batch=32, repo=repo)
        searcher = SlideSearch(SearchCore(IndexFolder(out), Embedder(info.grpc_url, name)))
        report["retrieval"] = retrieval(searcher, tiles)
        log.info("slide vote %.3f, single tile %.3f", report["retrieval"]["mosaic_top5_majority_vote"],
                 report["retrieval"]["single_tile_top5_majority_vote"])
        real = _mosaic_vectors(searcher)
    report["search_time"] = search_time(real, archives)
    report["ingest"] = [ingest(workdir, side) for side in ([big_slide // 4, big_slide] if big_slide else [])]
    table = markdown(report)
    write_results(Path(results) / "slide_search", report, table, lambda path: plot(report, path))
    return table

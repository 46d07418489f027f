"""`histoseek bench encoders|search|slides|scale`: benchmarks, results in benchmarks/results."""
from __future__ import annotations

import argparse
from pathlib import Path

from histoseek_cli.options import add_list, positive

MILVUS_TYPES = ["flat", "hnsw", "ivf_flat", "ivf_sq8"]


def encoders(args: argparse.Namespace) -> None:
    from benchmarks.commands import bench_encoders_command

    print(bench_encoders_command(
        encoders=args.encoders, preset=args.preset, checkpoints=args.checkpoints, batches=args.batch, runs=args.runs,
        warmup=args.warmup, concurrency=args.concurrency, requests_per_client=args.requests_per_client,
        workdir=args.workdir, results=args.results))


def search(args: argparse.Namespace) -> None:
    from benchmarks.commands import bench_search_command

    print(bench_search_command(
        indexes=args.index, triton_url=args.triton_url, encoders=args.encoders, preset=args.preset,
        checkpoints=args.checkpoints, items=args.items, queries=args.queries, sizes=args.sizes,
        types=args.types, workdir=args.workdir, results=args.results))


def slides(args: argparse.Namespace) -> None:
    if args.load:
        from benchmarks.bench_slide_load import bench_slide_load_command

        print(bench_slide_load_command(concurrency=args.concurrency, slide_size=args.load_slide_size,
                                       workdir=args.workdir / "load", results=args.results,
                                       request_timeouts=tuple(args.load_timeouts)))
        return
    from benchmarks.bench_slides import bench_slides_command

    print(bench_slides_command(checkpoint=args.checkpoint, slides=args.slides, classes=args.classes,
                               slide_size=args.slide_size, big_slide=args.big_slide, archives=args.archives,
                               workdir=args.workdir, results=args.results))


def scale(args: argparse.Namespace) -> None:
    from benchmarks.bench_scale import bench_scale_command

    print(bench_scale_command(checkpoint=args.checkpoint, data=args.data, items=args.items, queries=args.queries,
                              workers=args.workers, faiss_types=args.faiss_types,
                              milvus_types=MILVUS_TYPES if args.milvus_types is None else args.milvus_types,
                              workdir=args.workdir, results=args.results))


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="latency and throughput benchmarks (results in benchmarks/results)")
    bench = bench.add_subparsers(dest="action", required=True)
    p = bench.add_parser("encoders", help="PyTorch eager vs onnxruntime vs Triton HTTP/gRPC, per batch and concurrency")
    add_list(p, "--batch", type=positive(int), default=[1, 8, 32], metavar="N", help="batch sizes (default: 1 8 32)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per path and batch size")
    p.add_argument("--warmup", type=int, default=5)
    add_list(p, "--concurrency", type=positive(int), default=[1, 4, 16], metavar="N",
             help="concurrent Triton gRPC clients (default: 1 4 16)")
    p.add_argument("--requests-per-client", type=int, default=40)
    p.set_defaults(func=encoders)
    p2 = bench.add_parser("search", help="/v1/search end to end, and FAISS search time against index size")
    add_list(p2, "--index", type=Path, metavar="DIR",
             help="index folders to measure (needs --triton-url); default: build synthetic ones")
    p2.add_argument("--triton-url", help="gRPC host:port of the Triton serving --index's models")
    p2.add_argument("--items", type=int, default=10_000, help="items per synthetic index")
    p2.add_argument("--queries", type=int, default=100, help="queries per index")
    add_list(p2, "--sizes", type=positive(int), default=[1_000, 10_000, 100_000], metavar="N",
             help="FAISS collection sizes (default: 1000 10000 100000)")
    add_list(p2, "--types", default=["flat", "hnsw", "ivfpq", "pq"], metavar="TYPE",
             help="FAISS index types to time (default: flat hnsw ivfpq pq)")
    p2.set_defaults(func=search)
    for q in (p, p2):
        add_list(q, "--encoders", metavar="NAME", help="default: every registered encoder")
        q.add_argument("--preset", default="cpu", help="architecture of encoders without --checkpoints")
        q.add_argument("--checkpoints", type=Path,
                       help="a folder with one trained checkpoint folder per encoder (default: random weights, "
                            "which time the same as trained ones)")
        q.add_argument("--workdir", type=Path, default=Path("work/bench"), help="models, data, Triton logs; reused")
        q.add_argument("--results", type=Path, default=Path("benchmarks/results"))

    p = bench.add_parser("slides", help="slide search: majority vote, ingest of a large slide, search time vs archive")
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint to embed with (default: train simclr "
                                                   "for one epoch from ImageNet on synthetic tiles)")
    p.add_argument("--slides", type=int, default=40, help="synthetic slides to retrieve among")
    p.add_argument("--classes", type=int, default=4, help="slide labels")
    p.add_argument("--slide-size", type=int, default=2048, help="level-0 side of each slide")
    p.add_argument("--big-slide", type=int, default=40_000, help="side of the slide whose ingest is measured (0: skip)")
    add_list(p, "--archives", type=positive(int), default=[100, 1_000, 10_000], metavar="N",
             help="archive sizes in slides (default: 100 1000 10000)")
    p.add_argument("--load", action="store_true",
                   help="instead: N concurrent slide uploads beside a stream of patch searches against a running "
                        "`histoseek serve` (served, refused with Retry-After, timed out; patch p50/p99; RSS)")
    add_list(p, "--concurrency", type=positive(int), default=[1, 2, 4, 8, 16], metavar="N",
             help="with --load: concurrent slide uploads (default: 1 2 4 8 16)")
    add_list(p, "--load-timeouts", type=positive(float), default=[30.0, 3.0], metavar="S",
             help="with --load: the server's --request-timeout, one run each (default: 30 3; 3 s is to this "
                  "benchmark's light slide what 30 s is to a 24,000 px scan of 7 s)")
    p.add_argument("--load-slide-size", type=positive(int), default=6144,
                   help="with --load: level-0 side of the query slide (default: %(default)s: a 256-tile mosaic)")
    p.add_argument("--workdir", type=Path, default=Path("work/bench_slides"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.set_defaults(func=slides)

    p = bench.add_parser("scale", help="embedding single-process vs Ray; FAISS vs Milvus Lite at 100k items, "
                                       "filtered searches; a 10^9-tile sizing")
    p.add_argument("--checkpoint", type=Path, required=True, help="a fine-tuned checkpoint folder to embed with")
    p.add_argument("--data", type=Path, default=Path("demo/collection/kather2016"),
                   help="real tiles (a dataset folder): embedded for the throughput rows; the collection is "
                        "sampled around their vectors, and some of them are the queries")
    p.add_argument("--items", type=int, default=100_000, help="items in each index")
    p.add_argument("--queries", type=int, default=200, help="real tiles held out as queries")
    add_list(p, "--workers", type=positive(int), default=[1, 2], metavar="N",
             help="Ray embedding actor counts to time (default: 1 2)")
    add_list(p, "--faiss-types", default=["flat", "hnsw", "ivfpq", "pq"], metavar="TYPE",
             help="default: flat hnsw ivfpq pq")
    p.add_argument("--milvus-types", nargs="*", action="extend", default=None, metavar="TYPE",
                   help="Milvus Lite index types (default: flat hnsw ivf_flat ivf_sq8; the flag alone: none)")
    p.add_argument("--workdir", type=Path, default=Path("work/bench_scale"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.set_defaults(func=scale)

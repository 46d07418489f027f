"""The `histoseek` command: one subcommand per pipeline stage.

Stages import their modules lazily, so `histoseek serve` or `histoseek demo` never load
torch, and `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from export.triton_config import MAX_QUEUE_DELAY_US
from histoseek.errors import HistoseekError
from server.settings import API_KEYS_ENV, Settings


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be positive integers, got {text!r}")
    return values


def _ks(text: str) -> list[int]:
    return sorted(set(_int_list(text)))


def cmd_data_synth(args: argparse.Namespace) -> None:
    if args.slides is not None:
        from training.data.synthetic_slides import synthesize_slides

        paths = synthesize_slides(args.out, args.slides, classes=args.classes, size=args.slide_size,
                                  mpp=args.slide_mpp, seed=args.seed)
        print(f"wrote {len(paths)} slides ({args.slide_size}x{args.slide_size} px at {args.slide_mpp} µm/px) "
              f"and labels.csv to {args.out}")
        return
    from training.data.synthetic import synthesize

    dataset = synthesize(args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {len(dataset)} tiles in {len(dataset.labels)} classes to {args.out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    if args.format == "slides":
        from training.data.prepare_slides import prepare_slides
        from training.data.slides import mpp_for

        if args.tile is None:
            raise HistoseekError("--format slides needs --tile (px of a tile at the target --mpp), e.g. --tile 224")
        report = prepare_slides(args.src, args.out, tile=args.tile, mpp=mpp_for(args.mpp, args.magnification),
                                labels_csv=args.labels, slide_mpp=args.slide_mpp, mask_fraction=args.mask_fraction,
                                min_tissue=args.min_tissue, mosaic_share=args.mosaic_share,
                                mosaic_minimum=args.mosaic_min, stain_norm=args.stain_norm)
        print(report.summary())
        return
    from training.data.prepare import prepare_dataset

    report = prepare_dataset(args.format, args.src, args.out, tile=args.tile, stride=args.stride, resize=args.resize,
                             min_tissue=args.min_tissue, stain_norm=args.stain_norm)
    print(report.summary())


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import TrainConfig, train

    cfg = TrainConfig(encoder=args.encoder, data=str(args.data), out=str(args.out), preset=args.preset,
                      epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size,
                      init=args.init, split=args.split, seed=args.seed,
                      workers=args.workers, fresh=args.fresh, bits=args.bits)
    try:
        out = train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"checkpoint written to {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from histoseek.metrics import format_table

    if (args.checkpoint is None) == (args.index is None):
        raise HistoseekError("give either --checkpoint DIR --database DIR (PyTorch) or --index DIR --queries DIR "
                             "(the served path: Triton + FAISS)")
    if args.index is not None:
        from server.evaluate_served import evaluate_index

        if args.queries is None:
            raise HistoseekError("--index needs --queries DIR: the images to search the index with")
        result = evaluate_index(args.index, args.queries, args.k, args.triton_url, args.protocol)
    else:
        from training.evaluate import evaluate_checkpoint

        if args.database is None:
            raise HistoseekError("--checkpoint needs --database DIR")
        result = evaluate_checkpoint(args.checkpoint, args.database, args.queries, args.k,
                                     database_split=args.database_split, queries_split=args.queries_split)
    print(format_table(result["metrics"], args.k))
    if "similarity_spread" in result:
        from histoseek.collapse import describe

        print(f"database embeddings: {describe(result['similarity_spread'])}")
    if args.json:
        from histoseek import atomic

        atomic.write_json(args.json, result)


def cmd_export(args: argparse.Namespace) -> None:
    from export.export_checkpoint import export_checkpoint

    export_checkpoint(args.checkpoint, args.repo, fp16=args.fp16, verify_data=args.verify_data,
                      queue_delay_us=args.queue_delay_us, force=args.force)


def cmd_triton(args: argparse.Namespace) -> None:
    from server import triton

    if args.action == "start":
        info = triton.start(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port, run_dir=args.run_dir)
        print(f"Triton ready: HTTP localhost:{args.http_port}, gRPC localhost:{args.grpc_port} ({info})")
    elif args.action == "stop":
        print("Triton stopped" if triton.stop(args.run_dir) else f"no Triton was running for {args.run_dir}")
    else:
        print(json.dumps(triton.status(args.run_dir), indent=2))


def cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from histoseek.imaging import load_model_input
    from server.embedder import Embedder

    embedder = Embedder(args.triton_url, args.model, protocol=args.protocol)
    size = int(embedder.spec()["input_size"])
    images = np.stack([load_model_input(path, size) for path in args.images])
    embeddings = embedder.embed(images)
    np.set_printoptions(precision=4, suppress=True, threshold=12, edgeitems=4)
    for path, vector in zip(args.images, embeddings):
        print(f"{path}: dim {vector.shape[0]}, norm {np.linalg.norm(vector):.4f}, {vector}")
    if args.out:
        from histoseek import atomic

        with atomic.temporary_path(args.out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, embeddings)


def cmd_index(args: argparse.Namespace) -> None:
    from server import build, index

    if args.action == "build":
        params = {"nlist": args.nlist, "nprobe": args.nprobe, "M": args.m, "nbits": args.bits,
                  "ef_search": args.ef_search}
        out = build.build_index(args.encoder, args.data, args.out, index_type=args.type, triton_url=args.triton_url,
                                protocol=args.protocol, batch=args.batch, params=params, repo=args.repo,
                                backend=args.backend, backend_options=_milvus_options(args), ray=args.ray,
                                ray_workers=args.ray_workers, ray_engine=args.ray_engine)
        print(f"index written to {out}")
    elif args.action == "add":
        if (args.data is None) == (not args.image):
            raise HistoseekError("give either --data DIR (a dataset folder) or --image FILE… --label LABEL")
        if args.image and not args.label:
            raise HistoseekError("--image needs --label: the diagnosis stored with the new items")
        ids = build.add_items(args.index, args.data or list(args.image), label=args.label, group=args.group,
                              triton_url=args.triton_url, protocol=args.protocol, repo=args.repo, ray=args.ray,
                              ray_workers=args.ray_workers, ray_engine=args.ray_engine)
        print(f"added {len(ids)} items: ids {ids[0]}…{ids[-1]}" if ids else "added nothing")
    elif args.action == "remove":
        print(f"removed {index.remove_items(args.index, args.id)} of {len(args.id)} items")
    else:
        print(json.dumps(index.index_info(args.index), indent=2))


def _milvus_options(args: argparse.Namespace) -> dict:
    if args.backend != "milvus":
        if args.milvus_uri or args.collection:
            raise HistoseekError("--milvus-uri and --collection need --backend milvus")
        return {}
    # Without a URI the vectors go to a Milvus Lite database inside the index folder.
    return {"uri": args.milvus_uri, "collection": args.collection}


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


MIN_KEY_LENGTH = 16


def api_keys(key_file: Path | None) -> tuple[str, ...]:
    """Keys from --api-key-file (one a line, `#` comments) or else $HISTOSEEK_API_KEYS (comma separated)."""
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as exc:
            raise HistoseekError(f"cannot read the API key file {key_file}: {exc.strerror}") from exc
        keys, where = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")], key_file
        if not keys:
            raise HistoseekError(f"the API key file {key_file} holds no key (one key a line)")
    else:
        keys, where = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()], API_KEYS_ENV
    for key in keys:  # the message never shows the key itself
        if len(key) < MIN_KEY_LENGTH or not key.isprintable() or any(c.isspace() for c in key):
            raise HistoseekError(f"an API key in {where} is shorter than {MIN_KEY_LENGTH} characters or holds spaces "
                                 "or control characters; make one with: python -c \"import secrets; "
                                 "print(secrets.token_urlsafe(32))\"")
    return tuple(keys)


def cmd_serve(args: argparse.Namespace) -> None:
    from server.app import serve

    budget = {} if args.max_decode_mb is None else {"max_decode_bytes": int(args.max_decode_mb * 1e6)}
    settings = Settings(max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=args.max_pixels, max_k=args.max_k,
                        request_timeout_s=args.request_timeout, api_keys=api_keys(args.api_key_file),
                        protect_search=args.protect_search, cors_origins=tuple(args.cors_origin), **budget)
    serve(args.indexes, args.triton_url, args.protocol, host=args.host, port=args.port, settings=settings)


def cmd_demo(args: argparse.Namespace) -> None:
    from demo.app import launch

    keys = api_keys(args.api_key_file)
    launch(args.api_url, host=args.host, port=args.port, api_key=keys[0] if keys else None)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from histoseek.quickstart import QuickstartConfig, run_quickstart

    run_quickstart(QuickstartConfig(
        workdir=args.workdir, encoder=args.encoder, train_minutes=args.train_minutes,
        **({"collection": args.collection} if args.collection else {}),
        triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
        triton_metrics_port=args.triton_metrics_port, api_port=args.api_port, demo_port=args.demo_port,
    ))


def cmd_encoders(args: argparse.Namespace) -> None:
    from training.encoders.registry import list_encoders

    from training.pretrained import describe_start

    for encoder in list_encoders():
        print(f"{encoder.name}: {encoder.method}")
        for name, preset in encoder.presets.items():
            spec = encoder.spec(name)
            print(f"  {name:7s} backbone={spec.backbone} input={spec.input_size}px dim={spec.embedding_dim} "
                  f"output={spec.output_kind} labels={'required' if encoder.needs_labels else 'unused'} "
                  f"start={describe_start(preset)}")


def cmd_bench_encoders(args: argparse.Namespace) -> None:
    from benchmarks.commands import bench_encoders_command

    print(bench_encoders_command(
        encoders=args.encoders, preset=args.preset, checkpoints=args.checkpoints, batches=args.batch, runs=args.runs,
        warmup=args.warmup, concurrency=args.concurrency, requests_per_client=args.requests_per_client,
        workdir=args.workdir, results=args.results))


def cmd_bench_search(args: argparse.Namespace) -> None:
    from benchmarks.commands import bench_search_command

    print(bench_search_command(
        indexes=args.index, triton_url=args.triton_url, encoders=args.encoders, preset=args.preset,
        checkpoints=args.checkpoints, items=args.items, queries=args.queries, sizes=args.sizes,
        types=args.types.split(","), workdir=args.workdir, results=args.results))


def cmd_search_image(args: argparse.Namespace) -> None:
    from server.filters import from_lists
    from server.search_command import search_image_command

    where = from_lists(labels=args.label, exclude_labels=args.exclude_label, groups=args.group,
                       exclude_groups=args.exclude_group, sources=args.source, exclude_sources=args.exclude_source)
    result = search_image_command(args.index, args.image, k=args.k, where=where, triton_url=args.triton_url,
                                  protocol=args.protocol)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"vote {result['vote']['label'] or '-'} ({result['vote']['share']:.0%}) of {len(result['results'])} results")
    for r in result["results"]:
        print(f"{r['rank']:3d}. id {r['id']}  {r['label']}  score {r['score']:.4f}  group {r['group']}  {r['source']}")


def cmd_search_slide(args: argparse.Namespace) -> None:
    from server.slide_search import search_slide_command

    result = search_slide_command(args.index, slide=args.slide, slide_id=args.slide_id, k=args.k,
                                  slide_mpp=args.slide_mpp, triton_url=args.triton_url, protocol=args.protocol)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"query {result['query']}: {result['query_tiles']} mosaic tiles; "
          f"vote {result['vote']['label'] or '-'} ({result['vote']['share']:.0%})")
    for r in result["results"]:
        best = r["matches"][0] if r["matches"] else None
        where = f"best pair: query ({best['query_x']}, {best['query_y']}) ~ ({best['x']}, {best['y']})" if best else ""
        print(f"{r['rank']:3d}. {r['slide']}  {r['label']}  score {r['score']:.4f}  {where}")


def cmd_bench_scale(args: argparse.Namespace) -> None:
    from benchmarks.bench_scale import bench_scale_command

    print(bench_scale_command(checkpoint=args.checkpoint, data=args.data, items=args.items, queries=args.queries,
                              workers=args.workers, faiss_types=args.faiss_types.split(","),
                              milvus_types=[t for t in args.milvus_types.split(",") if t],
                              workdir=args.workdir, results=args.results))


def cmd_bench_slides(args: argparse.Namespace) -> None:
    from benchmarks.bench_slides import bench_slides_command

    print(bench_slides_command(checkpoint=args.checkpoint, slides=args.slides, classes=args.classes,
                               slide_size=args.slide_size, big_slide=args.big_slide, archives=args.archives,
                               workdir=args.workdir, results=args.results))


def _triton_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--triton-url", default="localhost:8001", help="host:port of Triton (gRPC 8001, HTTP 8000)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")


def _ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="embed on Ray: a cluster's HOST:PORT or auto, or no value for a local Ray on this "
                        "machine; the images (and --repo) must be at the same paths on every node")
    p.add_argument("--ray-workers", type=_positive(int),
                   help="embedding actors (default: one per node; each a client of its node's Triton)")
    p.add_argument("--ray-engine", choices=["triton", "onnxruntime"],
                   help="what the actors embed with: the Triton on their node at --triton-url (default), "
                        "or onnxruntime running --repo's model.onnx (no Triton needed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoseek", description="Histopathology image retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or prepare a dataset folder").add_subparsers(dest="action", required=True)
    p = data.add_parser("synth", help="procedural H&E-like tiles (the project's own demo/test data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, help="write this many whole slides (pyramidal TIFFs, one label each) "
                                             "instead of tiles; --classes labels them")
    p.add_argument("--slide-size", type=int, default=2048, help="level-0 side of a synthetic slide in px")
    p.add_argument("--slide-mpp", type=float, default=0.5, help="µm per level-0 px of a synthetic slide")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("prepare", help="tile and index a real dataset (BACH, BRACS, CRC, folder per class)")
    p.add_argument("--format", choices=["folder", "bach", "bracs", "crc", "slides"], required=True,
                   help="slides: whole-slide images (OpenSlide) in <src>/<label>/ or anywhere with --labels")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, help="tile size in pixels (default: whole images)")
    p.add_argument("--stride", type=int, help="tile stride (default: the tile size)")
    p.add_argument("--resize", type=int, help="rescale source images before tiling (see README)")
    p.add_argument("--min-tissue", type=float, default=0.0, help="drop tiles with less tissue than this fraction")
    p.add_argument("--stain-norm", type=Path, help="reference image for Macenko stain normalisation")
    slides = p.add_argument_group("whole slides (--format slides)")
    slides.add_argument("--mpp", type=float, help="µm per px of the tiles, e.g. 0.5 (~20x)")
    slides.add_argument("--magnification", type=float, help="instead of --mpp: objective, e.g. 20 (= 0.5 µm/px)")
    slides.add_argument("--slide-mpp", type=float, help="µm per level-0 px, for slides that do not record it")
    slides.add_argument("--labels", type=Path, help="CSV with columns slide,label (default: the slide's folder)")
    slides.add_argument("--mask-fraction", type=float, default=0.5,
                        help="share of a tile the tissue mask must cover (default: %(default)s)")
    slides.add_argument("--mosaic-share", type=float, default=0.05,
                        help="share of each colour cluster's tiles in the mosaic (default: %(default)s)")
    slides.add_argument("--mosaic-min", type=int, default=16, help="fewest mosaic tiles per slide (default: %(default)s)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", help="train an encoder; writes a checkpoint folder")
    p.add_argument("--encoder", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float, help="time budget; the schedules follow the clock")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--init", help="where training starts: 'imagenet' (the ImageNet weights that install with "
                                  "HistoSeek; the cpu presets' default), a weights file (DINO, timm, torchvision, "
                                  "open_clip, lightly, …), 'timm:NAME' (timm's pretrained weights; needs the "
                                  "network) or 'none' (random weights; the scratch presets' default)")
    p.add_argument("--split", help="train on this split of a prepared dataset only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data-loading processes")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--bits", type=int, help="code length of a quantizing encoder (spq: 16, 32 or 64)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="precision@k, mAP@k, majority vote@k (PyTorch or served path)")
    p.add_argument("--checkpoint", type=Path, help="evaluate a checkpoint in PyTorch (with --database)")
    p.add_argument("--index", type=Path, help="evaluate the running system: this index + Triton (with --queries)")
    p.add_argument("--database", type=Path)
    p.add_argument("--queries", type=Path, help="query set (default: leave-one-out on the database)")
    p.add_argument("--database-split", help="use only this split of the database folder")
    p.add_argument("--queries-split", help="queries: this split (of --queries, else of --database)")
    p.add_argument("--k", type=_ks, default=[1, 5, 10])
    p.add_argument("--json", type=Path)
    _triton_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="checkpoint -> verified ONNX -> Triton model repository")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--fp16", action="store_true", help="half-precision weights (for GPUs)")
    p.add_argument("--queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US,
                   help="how long Triton's dynamic batcher may hold a request for others to join (0: no wait; "
                        "requests arriving while the model is busy are batched anyway)")
    p.add_argument("--verify-data", type=Path, help="images to verify on (default: the training data)")
    p.add_argument("--force", action="store_true",
                   help="export a collapsed model (all tiles embed alike) all the same, e.g. to time it")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("triton", help="start, stop or inspect the local Triton server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--run-dir", type=Path, default=Path("runs/triton"))
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("embed", help="embed images through the running Triton (prints the vectors)")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--model", default="dino", help="Triton model name (the encoder's name)")
    p.add_argument("--out", type=Path, help="also save the embeddings as a .npy file")
    _triton_arguments(p)
    p.set_defaults(func=cmd_embed)

    index = sub.add_parser("index", help="build and edit indexes (FAISS files or Milvus collections)").add_subparsers(
        dest="action", required=True)
    p = index.add_parser("build", help="embed a dataset folder through Triton into a new index folder")
    p.add_argument("--encoder", required=True, help="the Triton model (encoder) to embed with")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--type", default="flat",
                   help="faiss: flat (exact), hnsw (graph), ivfpq (inverted lists + PQ), pq (product quantization: "
                        "the encoder's own codebooks for spq, k-means otherwise); milvus: flat, hnsw, ivf_flat, "
                        "ivf_sq8, and on a Milvus server also ivf_pq, diskann, gpu_cagra, gpu_ivf_pq")
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="where the vectors live: FAISS files in the index folder (default; spq's own codes), "
                        "or a Milvus collection (--milvus-uri)")
    p.add_argument("--milvus-uri", help="milvus: a local path ending in .db (Milvus Lite keeps a folder there; one "
                                        "process at a time; default: milvus.db inside the index folder) or "
                                        "http://host:19530 (Milvus server or cluster; token in $MILVUS_TOKEN)")
    p.add_argument("--collection", help="milvus: the collections' base name; each build writes <base>_b<build id> and "
                                        "drops older builds once the new folder is in use (default: "
                                        "histoseek_<index folder name>)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--m", type=int, help="PQ sub-quantizers (pq, ivfpq) or HNSW links per node")
    p.add_argument("--bits", type=int, help="bits per PQ sub-quantizer (pq, ivfpq; default up to 8)")
    p.add_argument("--nlist", type=int, help="ivfpq inverted lists (default ~4*sqrt(items))")
    p.add_argument("--nprobe", type=int, help="ivfpq lists searched per query")
    p.add_argument("--ef-search", type=int, help="hnsw candidates per query (default 64)")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="the model repository Triton serves (spq's codebooks are read from it)")
    _triton_arguments(p)
    _ray_arguments(p)
    p.set_defaults(func=cmd_index)
    p = index.add_parser("add", help="add images to an index without a rebuild")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--data", type=Path, help="a dataset folder (labels and groups from it)")
    p.add_argument("--image", type=Path, action="append", help="an image file (repeatable)")
    p.add_argument("--label", help="label of the --image files")
    p.add_argument("--group", help="group (source image, slide, patient) of the --image files")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="the model repository (read by --ray-engine onnxruntime)")
    _triton_arguments(p)
    _ray_arguments(p)
    p.set_defaults(func=cmd_index)
    p = index.add_parser("remove", help="remove items by id")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--id", type=int, action="append", required=True)
    p.set_defaults(func=cmd_index)
    p = index.add_parser("info", help="encoder, model checksum, type, count, size on disk")
    p.add_argument("--index", type=Path, required=True)
    p.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="search an index from the command line").add_subparsers(
        dest="action", required=True)
    p = search.add_parser("image", help="the most similar items of an index to one image, optionally filtered")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-k", type=int, default=10)
    filters = p.add_argument_group("filters (repeatable; applied inside the search, so k results come back "
                                   "whenever k items match)")
    for name, meaning in (("label", "diagnosis"), ("group", "slide or patient"), ("source", "source file")):
        filters.add_argument(f"--{name}", action="append", help=f"only items with this {meaning}")
        filters.add_argument(f"--exclude-{name}", action="append", help=f"no items with this {meaning}")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    _triton_arguments(p)
    p.set_defaults(func=cmd_search_image)
    p = search.add_parser("slide", help="rank an index's slides against a query slide (Yottixel mosaic)")
    p.add_argument("--index", type=Path, required=True)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--slide", type=Path, help="a slide file (its mosaic is the query)")
    query.add_argument("--slide-id", help="a slide of the index (never among its own results)")
    p.add_argument("-k", "--k", type=int, default=5, help="slides returned (default: %(default)s)")
    p.add_argument("--slide-mpp", type=float, help="µm per level-0 px, for a slide that does not record it")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    _triton_arguments(p)
    p.set_defaults(func=cmd_search_slide)

    p = sub.add_parser("serve", help="the search API (FastAPI) over every index folder in --indexes")
    p.add_argument("--indexes", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    _triton_arguments(p)
    p.add_argument("--max-upload-mb", type=_positive(float), default=Settings.max_upload_bytes / 1e6,
                   help="largest image upload in MB (default: %(default)s)")
    p.add_argument("--max-pixels", type=_positive(int), default=Settings.max_pixels,
                   help="largest image (width x height) decoded; bigger ones must be tiled first "
                        "(default: %(default)s)")
    p.add_argument("--max-k", type=_positive(int), default=Settings.max_k,
                   help="most results one search may ask for (default: %(default)s)")
    p.add_argument("--max-decode-mb", type=_positive(float), default=None,
                   help="decode memory of all uploads in flight together, in MB; uploads that do not fit wait "
                        "a few seconds, then get 503 with Retry-After (default: a quarter of the machine's memory)")
    p.add_argument("--request-timeout", type=_positive(float), default=Settings.request_timeout_s,
                   help="seconds a search or an add may take to decode, embed and search; then it is stopped "
                        "and answered 503 (default: %(default)s)")
    p.add_argument("--api-key-file", type=Path,
                   help=f"API keys, one a line: adding and removing items then needs one (default: ${API_KEYS_ENV}, "
                        "comma separated; neither: no keys)")
    p.add_argument("--protect-search", action="store_true", help="searches and other reads need a key too")
    p.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                   help="a browser origin allowed to call the API, e.g. https://viewer.example.org (repeatable; "
                        "default: none, CORS off)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the Gradio demo in front of a running search API")
    p.add_argument("--api-url", default="http://127.0.0.1:8080")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key-file", type=Path,
                   help=f"send the first key of this file to the API (default: the first of ${API_KEYS_ENV})")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quickstart", help="the whole system on synthetic data, up until Ctrl-C (make demo)")
    p.add_argument("--workdir", type=Path, default=Path("work/demo"))
    p.add_argument("--encoder", default="dml")
    p.add_argument("--train-minutes", type=float, default=2.0)
    p.add_argument("--collection", type=Path, help="the tiles to index, a folder per class (default: the real "
                                                   "colorectal H&E tiles in demo/collection/kather2016)")
    p.add_argument("--triton-http-port", type=int, default=8000)
    p.add_argument("--triton-grpc-port", type=int, default=8001)
    p.add_argument("--triton-metrics-port", type=int, default=8002)
    p.add_argument("--api-port", type=int, default=8080)
    p.add_argument("--demo-port", type=int, default=7860)
    p.set_defaults(func=cmd_quickstart)

    bench = sub.add_parser("bench", help="latency and throughput benchmarks (results in benchmarks/results)")
    bench = bench.add_subparsers(dest="action", required=True)
    p = bench.add_parser("encoders", help="PyTorch eager vs onnxruntime vs Triton HTTP/gRPC, per batch and concurrency")
    p.add_argument("--batch", type=_int_list, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32")
    p.add_argument("--runs", type=int, default=50, help="timed runs per path and batch size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="concurrent Triton gRPC clients")
    p.add_argument("--requests-per-client", type=int, default=40)
    p.set_defaults(func=cmd_bench_encoders)
    p2 = bench.add_parser("search", help="/v1/search end to end, and FAISS search time against index size")
    p2.add_argument("--index", type=Path, action="append",
                    help="an index folder to measure (repeatable; needs --triton-url); default: build synthetic ones")
    p2.add_argument("--triton-url", help="gRPC host:port of the Triton serving --index's models")
    p2.add_argument("--items", type=int, default=10_000, help="items per synthetic index")
    p2.add_argument("--queries", type=int, default=100, help="queries per index")
    p2.add_argument("--sizes", type=_int_list, default=[1_000, 10_000, 100_000], help="FAISS collection sizes")
    p2.add_argument("--types", default="flat,hnsw,ivfpq,pq", help="FAISS index types to time")
    p2.set_defaults(func=cmd_bench_search)
    for q in (p, p2):
        q.add_argument("--encoders", nargs="+", help="default: every registered encoder")
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
    p.add_argument("--archives", type=_int_list, default=[100, 1_000, 10_000], help="archive sizes in slides")
    p.add_argument("--workdir", type=Path, default=Path("work/bench_slides"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.set_defaults(func=cmd_bench_slides)

    p = bench.add_parser("scale", help="embedding single-process vs Ray; FAISS vs Milvus Lite at 100k items, "
                                       "filtered searches; a 10^9-tile sizing")
    p.add_argument("--checkpoint", type=Path, required=True, help="a fine-tuned checkpoint folder to embed with")
    p.add_argument("--data", type=Path, default=Path("demo/collection/kather2016"),
                   help="real tiles (a dataset folder): embedded for the throughput rows; the collection is "
                        "sampled around their vectors, and some of them are the queries")
    p.add_argument("--items", type=int, default=100_000, help="items in each index")
    p.add_argument("--queries", type=int, default=200, help="real tiles held out as queries")
    p.add_argument("--workers", type=_int_list, default=[1, 2], help="Ray embedding actors to time")
    p.add_argument("--faiss-types", default="flat,hnsw,ivfpq,pq")
    p.add_argument("--milvus-types", default="flat,hnsw,ivf_flat,ivf_sq8", help="Milvus Lite index types ('' skips)")
    p.add_argument("--workdir", type=Path, default=Path("work/bench_scale"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.set_defaults(func=cmd_bench_scale)

    p = sub.add_parser("encoders", help="list the registered encoders and their specs")
    p.set_defaults(func=cmd_encoders)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss reports at INFO that it fell back from its AVX2 build: noise for users.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        args.func(args)
    except HistoseekError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`histoseek index build|add|remove|info`: index folders (FAISS files or Milvus collections)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from histoseek.errors import HistoseekError
from histoseek_cli.options import add_list, ray_arguments, triton_arguments


def build(args: argparse.Namespace) -> None:
    from server.index.build import build_index

    params = {"nlist": args.nlist, "nprobe": args.nprobe, "M": args.m, "nbits": args.bits,
              "ef_search": args.ef_search}
    out = build_index(args.encoder, args.data, args.out, index_type=args.type, triton_url=args.triton_url,
                      protocol=args.protocol, batch=args.batch, params=params, repo=args.repo,
                      backend=args.backend, backend_options=_milvus_options(args), ray=args.ray,
                      ray_workers=args.ray_workers, ray_engine=args.ray_engine)
    print(f"index written to {out}")


def add(args: argparse.Namespace) -> None:
    from server.index.build import add_items

    if (args.data is None) == (not args.image):
        raise HistoseekError("give either --data DIR (a dataset folder) or --image FILE… --label LABEL")
    if args.image and not args.label:
        raise HistoseekError("--image needs --label: the diagnosis stored with the new items")
    ids = add_items(args.index, args.data or list(args.image), label=args.label, group=args.group,
                    triton_url=args.triton_url, protocol=args.protocol, repo=args.repo, ray=args.ray,
                    ray_workers=args.ray_workers, ray_engine=args.ray_engine)
    print(f"added {len(ids)} items: ids {ids[0]}…{ids[-1]}" if ids else "added nothing")


def remove(args: argparse.Namespace) -> None:
    from server.index.folder import remove_items

    print(f"removed {remove_items(args.index, args.id)} of {len(args.id)} items")


def info(args: argparse.Namespace) -> None:
    from server.index.folder import index_info

    print(json.dumps(index_info(args.index), indent=2))


def _milvus_options(args: argparse.Namespace) -> dict:
    if args.backend != "milvus":
        if args.milvus_uri or args.collection:
            raise HistoseekError("--milvus-uri and --collection need --backend milvus")
        return {}
    # Without a URI the vectors go to a Milvus Lite database inside the index folder.
    return {"uri": args.milvus_uri, "collection": args.collection}


def register(sub: argparse._SubParsersAction) -> None:
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
    triton_arguments(p)
    ray_arguments(p)
    p.set_defaults(func=build)

    p = index.add_parser("add", help="add images to an index without a rebuild")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--data", type=Path, help="a dataset folder (labels and groups from it)")
    add_list(p, "--image", type=Path, metavar="FILE", help="image files")
    p.add_argument("--label", help="label of the --image files")
    p.add_argument("--group", help="group (source image, slide, patient) of the --image files")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="the model repository (read by --ray-engine onnxruntime)")
    triton_arguments(p)
    ray_arguments(p)
    p.set_defaults(func=add)

    p = index.add_parser("remove", help="remove items by id")
    p.add_argument("--index", type=Path, required=True)
    add_list(p, "--id", type=int, required=True, metavar="ID", help="item ids")
    p.set_defaults(func=remove)

    p = index.add_parser("info", help="encoder, model checksum, type, count, size on disk")
    p.add_argument("--index", type=Path, required=True)
    p.set_defaults(func=info)

"""`histoseek evaluate`: retrieval metrics of a checkpoint (PyTorch) or of the served path."""
from __future__ import annotations

import argparse
from pathlib import Path

from histoseek.errors import HistoseekError
from histoseek_cli.options import add_list, positive, triton_arguments


def run(args: argparse.Namespace) -> None:
    from histoseek.metrics import format_table

    if (args.checkpoint is None) == (args.index is None):
        raise HistoseekError("give either --checkpoint DIR --database DIR (PyTorch) or --index DIR --queries DIR "
                             "(the served path: Triton + FAISS)")
    ks = sorted(set(args.k))
    label_map = None
    if args.label_map is not None:
        from histoseek.label_map import read_label_map

        if args.queries is None:
            raise HistoseekError("--label-map needs --queries DIR from another collection")
        label_map = read_label_map(args.label_map)
    if args.index is not None:
        from server.evaluate_served import evaluate_index

        if args.queries is None:
            raise HistoseekError("--index needs --queries DIR: the images to search the index with")
        result = evaluate_index(args.index, args.queries, ks, args.triton_url, args.protocol, label_map=label_map)
    else:
        from training.evaluate import evaluate_checkpoint

        if args.database is None:
            raise HistoseekError("--checkpoint needs --database DIR")
        result = evaluate_checkpoint(args.checkpoint, args.database, args.queries, ks,
                                     database_split=args.database_split, queries_split=args.queries_split,
                                     label_map=label_map)
    print(format_table(result["metrics"], ks))
    if "similarity_spread" in result:
        from histoseek.collapse import describe

        print(f"database embeddings: {describe(result['similarity_spread'])}")
    if args.json:
        from histoseek import atomic

        atomic.write_json(args.json, result)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="precision@k, mAP@k, majority vote@k (PyTorch or served path)")
    p.add_argument("--checkpoint", type=Path, help="evaluate a checkpoint in PyTorch (with --database)")
    p.add_argument("--index", type=Path, help="evaluate the running system: this index + Triton (with --queries)")
    p.add_argument("--database", type=Path)
    p.add_argument("--queries", type=Path, help="query set (default: leave-one-out on the database)")
    p.add_argument("--database-split", help="use only this split of the database folder")
    p.add_argument("--queries-split", help="queries: this split (of --queries, else of --database)")
    p.add_argument("--label-map", type=Path, help="queries from another collection: a CSV of query_label,"
                   "database_label rows saying each query label in the database's words (e.g. "
                   "configs/label_maps/crc-val-he-7k_to_kather2016.csv)")
    add_list(p, "--k", type=positive(int), default=[1, 5, 10], metavar="K", help="cut-offs (default: 1 5 10)")
    p.add_argument("--json", type=Path)
    triton_arguments(p)
    p.set_defaults(func=run)

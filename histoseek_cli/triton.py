"""`histoseek triton start|stop|status` and `histoseek embed`: the local Triton and its embeddings."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from histoseek_cli.options import triton_arguments


def run(args: argparse.Namespace) -> None:
    from server import triton

    if args.action == "start":
        info = triton.start(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port, run_dir=args.run_dir)
        print(f"Triton ready: HTTP localhost:{args.http_port}, gRPC localhost:{args.grpc_port} ({info})")
    elif args.action == "stop":
        print("Triton stopped" if triton.stop(args.run_dir) else f"no Triton was running for {args.run_dir}")
    else:
        print(json.dumps(triton.status(args.run_dir), indent=2))


def embed(args: argparse.Namespace) -> None:
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton", help="start, stop or inspect the local Triton server")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--run-dir", type=Path, default=Path("runs/triton"))
    p.set_defaults(func=run)

    p = sub.add_parser("embed", help="embed images through the running Triton (prints the vectors)")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--model", default="dino", help="Triton model name (the encoder's name)")
    p.add_argument("--out", type=Path, help="also save the embeddings as a .npy file")
    triton_arguments(p)
    p.set_defaults(func=embed)

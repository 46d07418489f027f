"""`histoseek export`: checkpoint -> verified ONNX -> Triton model repository."""
from __future__ import annotations

import argparse
from pathlib import Path

from export.triton_config import MAX_QUEUE_DELAY_US


def run(args: argparse.Namespace) -> None:
    from export.export_checkpoint import export_checkpoint

    export_checkpoint(args.checkpoint, args.repo, fp16=args.fp16, verify_data=args.verify_data,
                      queue_delay_us=args.queue_delay_us, force=args.force)


def register(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)

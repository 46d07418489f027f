"""`histoseek export`: checkpoint -> verified ONNX -> Triton model repository.

`--encoder NAME [--weights FILE]` first writes the checkpoint folder of a pretrained
encoder (a foundation model from its published weights file, or the ImageNet backbone
that ships), so a model that needs no training exports in one command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from export.triton_config import MAX_QUEUE_DELAY_US
from histoseek.errors import HistoseekError


def run(args: argparse.Namespace) -> None:
    from export.export_checkpoint import export_checkpoint

    if args.encoder is not None:
        from training.foundation_weights import write_checkpoint

        if args.verify_data is None:
            raise HistoseekError(f"{args.encoder} was not trained here: pass --verify-data DIR, a few of your tiles "
                                 "to check the ONNX export against PyTorch")
        args.checkpoint = write_checkpoint(args.encoder, args.weights,
                                           args.checkpoint or Path("work/checkpoints") / args.encoder)
    elif args.checkpoint is None or args.weights:
        raise HistoseekError("give --checkpoint DIR (a trained encoder) or --encoder NAME [--weights FILE] "
                             "(a pretrained one; `histoseek encoders` lists them)")
    export_checkpoint(args.checkpoint, args.repo, fp16=args.fp16, verify_data=args.verify_data,
                      queue_delay_us=args.queue_delay_us, force=args.force)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> verified ONNX -> Triton model repository")
    p.add_argument("--checkpoint", type=Path,
                   help="a checkpoint folder; with --encoder, where the pretrained encoder's folder is written "
                        "(default: work/checkpoints/NAME)")
    p.add_argument("--encoder", help="a pretrained encoder that needs no training (`histoseek encoders`)")
    p.add_argument("--weights", help="with --encoder: its published weights file (safetensors or a PyTorch state "
                                     "dict; never a pickle with code), or hf-hub:ID online (default: its hub page)")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--fp16", action="store_true", help="half-precision weights (for GPUs)")
    p.add_argument("--queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US,
                   help="how long Triton's dynamic batcher may hold a request for others to join (0: no wait; "
                        "requests arriving while the model is busy are batched anyway)")
    p.add_argument("--verify-data", type=Path, help="images to verify on (default: the training data)")
    p.add_argument("--force", action="store_true",
                   help="export a collapsed model (all tiles embed alike) all the same, e.g. to time it")
    p.set_defaults(func=run)

"""`histoseek train`: train an encoder into a checkpoint folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histoseek_cli.options import positive

from histoseek_cli.options import add_list


def class_name(text: str) -> tuple[str, str]:
    """`LABEL=WORDS`, e.g. `T=tubular adenoma`."""
    label, sep, words = text.partition("=")
    if not sep or not label.strip() or not words.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=WORDS (e.g. 'T=tubular adenoma'), got {text!r}")
    return label.strip(), " ".join(words.split())


def run(args: argparse.Namespace) -> None:
    from training.train import TrainConfig, train

    cfg = TrainConfig(encoder=args.encoder, data=str(args.data), out=str(args.out), preset=args.preset,
                      epochs=args.epochs, steps=args.steps, max_minutes=args.max_minutes,
                      min_steps=args.min_steps, batch_size=args.batch_size,
                      init=args.init, split=args.split, seed=args.seed,
                      workers=args.workers, fresh=args.fresh, bits=args.bits,
                      class_names=dict(args.class_names) if args.class_names else None)
    try:
        out = train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    print(f"checkpoint written to {out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an encoder; writes a checkpoint folder")
    p.add_argument("--encoder", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=positive(int), help="step budget (instead of --epochs)")
    p.add_argument("--max-minutes", type=positive(float), help="time budget; the schedules follow the clock")
    p.add_argument("--min-steps", type=positive(int),
                   help="with --max-minutes: train at least this many steps, however slow the machine (the "
                        "clock ends training only after them); the log says how long they take here")
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
    add_list(p, "--class-names", type=class_name, metavar="LABEL=WORDS",
             help="what each class label means, for encoders that learn from text prompts (clip): the prompt "
                  "of class T becomes 'a histopathology image of tubular adenoma' with 'T=tubular adenoma' "
                  "(default: the label itself)")
    p.set_defaults(func=run)

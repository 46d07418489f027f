"""`histoseek encoders`: the registered encoders, their presets and specs."""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from training.encoders.registry import list_encoders
    from training.pretrained import describe_start

    for encoder in list_encoders():
        print(f"{encoder.name}: {encoder.method}")
        for name, preset in encoder.presets.items():
            spec = encoder.spec(name)
            print(f"  {name:7s} backbone={spec.backbone} input={spec.input_size}px dim={spec.embedding_dim} "
                  f"output={spec.output_kind} labels={'required' if encoder.needs_labels else 'unused'} "
                  f"start={describe_start(preset)}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoders", help="list the registered encoders and their specs")
    p.set_defaults(func=run)

"""`histoseek encoders`: the registered encoders, their presets and specs, then the pretrained
encoders that need no training (embedding size, cost per tile, licence, where the weights come from)."""
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
    _pretrained()


def _pretrained() -> None:
    from training.encoders.registry import list_pretrained

    print("\npretrained, no training (histoseek export --encoder NAME [--weights FILE] --verify-data DIR):")
    for encoder in list_pretrained():
        m = encoder.pretrained
        cost = "fits a CPU" if m.cpu_ok else "too slow for a CPU: wants a GPU"
        print(f"{m.name}: {m.title}")
        print(f"  dim={m.embedding_dim} ({m.embedding}) input={m.input_size}px params={m.params_m:.0f}M "
              f"{m.gflops:.1f} GFLOPs/tile ({cost})")
        print(f"  weights: {m.weights_file} from {m.page} ({m.layout}); licence: {m.licence}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoders", help="list the registered encoders and their specs")
    p.set_defaults(func=run)

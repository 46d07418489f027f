"""The `histoseek` entry point: the top parser, one registered subparser per command group."""
from __future__ import annotations

import argparse
import logging
import sys

from histoseek.errors import HistoseekError
from histoseek_cli import bench, data, encoders, evaluate, export, index, quickstart, search, serve, train, triton

# In the order `histoseek --help` lists them: the pipeline's stages, then the tools around them.
GROUPS = (data, train, evaluate, export, triton, index, search, serve, quickstart, bench, encoders)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoseek", description="Histopathology image retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
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

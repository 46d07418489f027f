"""Argument types and option groups that several command groups share.

Lists are given the argparse way everywhere: space-separated values after one flag
(`--k 1 5 10`, `--encoders dml clip`); a repeated flag adds to the list.
"""
from __future__ import annotations

import argparse
from typing import Callable


def positive(kind: Callable) -> Callable[[str], object]:
    """An argparse type: `kind(text)`, refused unless it is a positive finite number."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value
    return parse


class _Extend(argparse.Action):
    """argparse's `extend`, except that given values replace the default instead of adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*(current if current is not self.default and current else []), *values])


def add_list(p: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs) -> None:
    """A list option: `--flag A B …`, repeatable (values add up)."""
    p.add_argument(*flags, nargs="+", action=_Extend, **kwargs)


def triton_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--triton-url", default="localhost:8001", help="host:port of Triton (gRPC 8001, HTTP 8000)")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")


def ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="embed on Ray: a cluster's HOST:PORT or auto, or no value for a local Ray on this "
                        "machine; the images (and --repo) must be at the same paths on every node")
    p.add_argument("--ray-workers", type=positive(int),
                   help="embedding actors (default: one per node; each a client of its node's Triton)")
    p.add_argument("--ray-engine", choices=["triton", "onnxruntime"],
                   help="what the actors embed with: the Triton on their node at --triton-url (default), "
                        "or onnxruntime running --repo's model.onnx (no Triton needed)")

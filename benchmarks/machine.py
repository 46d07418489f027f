"""What a benchmark result was measured on: machine, libraries, command."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_stamp() -> dict:
    import torch

    versions = {}
    for package in ("torch", "timm", "lightly", "open_clip_torch", "pytorch-metric-learning", "onnxruntime",
                    "faiss-cpu", "tritonclient"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "versions": versions, "command": project_command(sys.argv),
    }


def project_command(argv: list[str]) -> str:
    """The command as someone would retype it in the project folder on another machine:
    `histoseek …` or `python -m benchmarks.…`, with paths inside the project made relative."""
    program = Path(argv[0])
    if program.name == "histoseek" or program.name == "__main__.py" and program.parent.name == "histoseek_cli":
        words = ["histoseek"]
    elif program.suffix == ".py" and _inside(program):
        module = program.resolve().relative_to(PROJECT).with_suffix("")
        words = ["python", "-m", ".".join(module.parts)]
    else:
        words = [argv[0]]
    words += [project_relative(arg) if arg.startswith("/") else arg for arg in argv[1:]]
    return " ".join(words)


def project_relative(path: str | Path) -> str:
    """`path` relative to the project folder when it lies inside it or beside it (the team's
    `../shared`), else as given."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(PROJECT.parent) and PROJECT.parent != Path(resolved.anchor):
        return os.path.relpath(resolved, PROJECT)
    return str(path)


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(PROJECT)

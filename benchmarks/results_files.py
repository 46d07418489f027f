"""Where a benchmark's results go: `<stem>.json` (with the machine stamp), `.md` and `.png`."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from benchmarks.machine import machine_stamp


def write_results(stem: Path, report: dict, markdown: str, plot: Callable[[Path], None]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stamp = machine_stamp()
    report = {"machine": stamp, **report}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown + "\n" + machine_line(stamp) + "\n")
    plot(stem.with_suffix(".png"))


def machine_line(stamp: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in stamp["versions"].items())
    return (f"Measured on {stamp['cpu']} ({stamp['cores']} cores, {stamp['torch_threads']} torch threads), "
            f"GPU: {stamp['gpu'] or 'none'}; Python {stamp['python']}; {versions}. Command: `{stamp['command']}`")


def paired_bars(path: Path, names: list[str], first: tuple[str, list[float]], second: tuple[str, list[float]],
                ylabel: str, title: str, spreads: tuple | None = None) -> None:
    """One bar pair per row (e.g. before / after), scores on a 0-1 axis, saved to `path`;
    `spreads`, when given, is each bar set's matplotlib `yerr` (e.g. the range over seeds)."""
    import numpy as np

    with figure(path, 1, 1, dpi=120, figsize=(8, 3.8)) as ax:
        x = np.arange(len(names))
        for offset, (label, values), spread in zip((-0.2, 0.2), (first, second), spreads or (None, None)):
            ax.bar(x + offset, values, 0.4, label=label, yerr=spread, capsize=2)
        ax.set_xticks(x, names, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(title)


@contextmanager
def figure(path: Path, *grid: int, dpi: int, **kwargs) -> Iterator:
    """`plt.subplots(*grid, **kwargs)`'s axes, drawn off-screen; saved to `path` at `dpi` on
    leaving the block, and the figure closed even when drawing fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **kwargs)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)

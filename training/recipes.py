"""The quickstart's recipe, shared by `histoseek quickstart` and the benchmark that measures it.

Torch-free, so the command line can read it without loading torch.
"""
from __future__ import annotations

from pathlib import Path

# 240 real colorectal H&E tiles that ship with the project (Kather et al. 2016, CC BY 4.0).
DEMO_COLLECTION = Path(__file__).resolve().parent.parent / "demo" / "collection" / "kather2016"
# The clock ends training: the epochs only bound it on a fast machine.
QUICKSTART_EPOCHS = 30

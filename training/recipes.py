"""The quickstart's recipe, shared by `histoseek quickstart` and the benchmark that measures it.

Torch-free, so the command line can read it without loading torch.
"""
from __future__ import annotations

from pathlib import Path

# 240 real colorectal H&E tiles that ship with the project (Kather et al. 2016, CC BY 4.0).
DEMO_COLLECTION = Path(__file__).resolve().parent.parent / "demo" / "collection" / "kather2016"
# The clock ends training on a fast machine (the epochs only bound it there), but never before
# QUICKSTART_MIN_STEPS: quality follows the steps, not the minutes (two minutes gave 55 steps
# and leave-one-out mMV@5 0.979 on one 2-core machine, 28 steps and 0.908 on a slower one).
QUICKSTART_EPOCHS = 30
QUICKSTART_MINUTES = 2.0
QUICKSTART_MIN_STEPS = 50

"""The CPU threads a process is meant to use.

The book's pipeline gives each notebook's kernel its share of the cores in ``OMP_NUM_THREADS``
(``make test`` gives every process one); where it is unset, a process may use the cores it runs on.
Code that splits its own work into threads (slices in :mod:`vstain.preprocess.classical`, FOVs in
:mod:`vstain.evaluate.fovpool`) asks here, so every such split agrees with the libraries' own.
"""
from __future__ import annotations

import os


def cpu_share() -> int:
    """``OMP_NUM_THREADS`` where it is set to a positive count (OpenMP's nested form ``"2,1"``
    counts its first level), else the cores this process may run on."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        threads = 0
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

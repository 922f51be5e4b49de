"""Per-FOV scoring in threads.

Scoring one FOV (reading its TIFFs, SSIM's filters, segmentation) runs almost entirely in C code
that releases the GIL, so FOVs scored in as many threads as the process may use CPU threads finish
about twice as fast on 2 cores, with the same numbers in the same order. Two FOVs are then in
memory at once instead of one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpu_threads() -> int:
    """The CPU threads this process is meant to use: ``OMP_NUM_THREADS`` where set (the book's
    pipeline sets it per kernel), else the cores it may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a whole number of threads") from None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_fovs(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]``, in ``workers`` threads (default :func:`cpu_threads`);
    results in the order of ``items``; the first exception is raised as it would be serially."""
    items = list(items)
    workers = min(workers or cpu_threads(), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="fov") as pool:
        return list(pool.map(fn, items))

"""The CPU threads a process is meant to use, and work split over them.

The book's pipeline gives each notebook's kernel its share of the cores in ``OMP_NUM_THREADS``
(``make test`` gives every process one); where it is unset, a process may use the cores it runs on.
Code that splits its own work into threads (slices in :mod:`vstain.preprocess.classical`, FOVs in
:mod:`vstain.evaluate.fovpool`) asks here, so every such split agrees with the libraries' own.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_share() -> int:
    """``OMP_NUM_THREADS`` where it is set to a positive count (OpenMP's nested form ``"2,1"``
    counts its first level), else :func:`available_cores`."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        threads = 0
    return threads if threads > 0 else available_cores()


def map_threads(fn: Callable[[T], R], items: Iterable[T], workers: int, name: str = "worker") -> list[R]:
    """``[fn(item) for item in items]`` in up to ``workers`` threads, for work whose C code
    releases the GIL; results in the order of ``items``, and the first item's error in that order
    is raised, as it would be serially. One worker (or one item) runs serially, without a pool;
    the pool's threads are named ``<name>_<k>``."""
    items = list(items)
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))

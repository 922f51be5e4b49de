"""Per-FOV scoring in threads.

Scoring one FOV (reading its TIFFs, SSIM's filters, segmentation, FFTs) runs almost entirely in C
code that releases the GIL, so FOVs scored in two threads finish about twice as fast on 2 cores,
with the same numbers in the same order. At most :data:`MAX_FOVS` FOVs are in memory at once,
whatever the number of cores: a real FOV with every model's prediction is several hundred MB.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

from vstain.threads import cpu_share

T = TypeVar("T")
R = TypeVar("R")

MAX_FOVS = 2  # FOVs scored at once: twice the speed on 2 cores, and the memory of two FOVs at most


def map_fovs(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(item) for item in items]`` in up to ``workers`` threads (default: the process's CPU
    share, :func:`vstain.threads.cpu_share`, at most :data:`MAX_FOVS`); results in the order of
    ``items``; the first item's error in that order is raised, as it would be serially."""
    items = list(items)
    workers = min(workers or min(cpu_share(), MAX_FOVS), len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="fov") as pool:
        return list(pool.map(fn, items))

"""Per-FOV scoring in threads.

Scoring one FOV (reading its TIFFs, SSIM's filters, segmentation, FFTs) runs almost entirely in C
code that releases the GIL, so FOVs scored in two threads finish about twice as fast on 2 cores,
with the same numbers in the same order. At most :data:`MAX_FOVS` FOVs are in memory at once,
whatever the number of cores: a real FOV with every model's prediction is several hundred MB.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from vstain.threads import cpu_share, map_threads

T = TypeVar("T")
R = TypeVar("R")

MAX_FOVS = 2  # FOVs scored at once: twice the speed on 2 cores, and the memory of two FOVs at most


def map_fovs(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """:func:`vstain.threads.map_threads` over FOVs, in up to ``workers`` threads (default: the
    process's CPU share, :func:`vstain.threads.cpu_share`, at most :data:`MAX_FOVS`)."""
    return map_threads(fn, items, workers or min(cpu_share(), MAX_FOVS), name="fov")

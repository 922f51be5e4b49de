"""Peaks sampled while a block of a benchmark runs: resident memory, bytes of a folder. A helper of
the benchmark scripts (``python benchmarks/<script>.py`` puts this folder on the import path)."""
from __future__ import annotations

import os
import threading
from typing import Callable


class Peak:
    """The largest value of ``read()`` while the ``with`` block runs (``base``: its value at the
    start), sampled by a thread every ``every`` seconds and once more at the end."""

    def __init__(self, read: Callable[[], int], every: float = 0.005):
        self.read, self.every, self.done = read, every, threading.Event()

    def __enter__(self):
        self.base = self.peak = self.read()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(self.every):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.read())


def rss() -> int:
    """Resident memory of this process, bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def folder_bytes(folder: str) -> int:
    """Bytes allocated under ``folder`` (a sparse file counts what has been written), files that
    vanish while it is walked left out."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total

"""Generator snapshots at log-spaced points of training, for test-set learning curves.

A learning curve asks how a verdict depends on the training budget. Keeping the generator's weights
at steps that double (``total/32, total/16, ..., total``) resolves the early phase, where most is
learned, and the late one, where a gap between two models closes, holds or widens, with six
checkpoints of a few MB each. :class:`Snapshots` writes ``snapshots/step_<N>.pt`` and a row of
``snapshots.csv`` (the step and the training wall time up to it, summed over resumed runs) as each
step is reached; a resumed run writes only the snapshots it has not written yet.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback

from vstain.modelfiles import SNAPSHOTS_CSV, read_snapshots, snapshot_path


def log_steps(total: int, n: int = 6, first: int | None = None) -> list[int]:
    """``n`` log-spaced steps from ``first`` to ``total`` (both included), rounded and distinct.

    ``first`` defaults to ``total / 2**(n - 1)``: the steps then double, e.g. 47, 94, 188, 375,
    750, 1500 for 1500 steps. Fewer than ``n`` come back only when ``total`` is too small to hold
    ``n`` distinct steps."""
    total, n = int(total), int(n)
    if total < 1 or n < 1:
        raise ValueError(f"log_steps needs total >= 1 and n >= 1, got total={total}, n={n}")
    first = max(1, int(round(total / 2 ** (n - 1)))) if first is None else int(first)
    if not 1 <= first <= total:
        raise ValueError(f"log_steps: first must be in 1..{total}, got {first}")
    steps = np.unique(np.round(np.geomspace(first, total, n)).astype(int))
    return [int(s) for s in steps]


class Snapshots(Callback):
    """Saves the module's ``generator`` weights once its step passes each of ``steps``.

    Args:
        out_dir: the stage folder (``snapshots/`` and ``snapshots.csv`` go here).
        steps: the steps to keep, in the unit ``step_of`` counts.
        step_of: the module's step from the trainer (default ``trainer.global_step``; a WGAN passes
            its generator iterations, ``global_step // steps_per_iteration``).

    The training wall time is part of the callback's state in Lightning's checkpoints, so a resumed
    run continues the clock where the checkpoint left it (the time lost to an interruption, between
    the last checkpoint and the kill, is not counted)."""

    def __init__(self, out_dir, steps, step_of=None):
        self.out_dir, self.steps = Path(out_dir), sorted(int(s) for s in steps)
        self.step_of = step_of or (lambda trainer: int(trainer.global_step))
        self._elapsed, self._t0 = 0.0, None

    def elapsed(self) -> float:
        """Training seconds so far, this run and the runs it resumed."""
        return self._elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self._elapsed = float(state.get("elapsed", 0.0))

    def on_train_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = self.step_of(trainer)
        for s in self.steps:
            if s <= step and not snapshot_path(self.out_dir, s).exists():
                self._save(trainer, pl_module, s)

    def _save(self, trainer, pl_module, step: int) -> None:
        wall = self.elapsed()
        if not trainer.is_global_zero:
            return
        path = snapshot_path(self.out_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.generator.state_dict().items()}
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        csv = self.out_dir / SNAPSHOTS_CSV
        rows = read_snapshots(self.out_dir, check=False)
        rows = rows[rows["step"] != step]
        row = pd.DataFrame([{"step": step, "wall_s": round(wall, 2), "path": str(path.relative_to(self.out_dir))}])
        pd.concat([rows, row]).sort_values("step").to_csv(csv, index=False)

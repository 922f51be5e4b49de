"""The conditional flow's probability path and its ODE solver: the one module that imports Meta's
``flow_matching`` library (Lipman et al. 2023; paths and solvers, the solver on ``torchdiffeq``).

- :func:`path_sample`: a training pair on the conditional optimal-transport path (rectified flow,
  Liu et al. 2023): ``y_t = (1 - t) y_0 + t y_1`` and the velocity ``y_1 - y_0`` to regress.
  The network predicts ``y_1``; :func:`vstain.models.velocity_from_clean` turns that into a velocity.
- :func:`sample_volume`: one sample of a whole FOV. Every velocity evaluation of the fixed-step ODE
  solver is a whole-FOV prediction (:func:`vstain.inference.infer.predict_volume`) of the network at
  that time (:meth:`vstain.models.VelocityNet.at`), so a volume above the memory budget is tiled
  seam-free as any other. The noise is drawn for the whole volume from the seed, so a tiled and a
  one-pass sample start from the same noise.
- :func:`sample_fov`: ``K`` samples, each from its own seed, their mean and their spread.
"""
from __future__ import annotations

import numpy as np
import torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CondOTScheduler
from flow_matching.solver import ODESolver
from flow_matching.utils import ModelWrapper
from torch import Tensor

from vstain.channels import TARGETS
from vstain.models import velocity_from_clean

from .infer import predict_volume
from .tta import mean_and_sd

# torchdiffeq's fixed-grid solvers (velocity evaluations per step: 1, 2, 2, 4)
METHODS = {"euler": 1, "midpoint": 2, "heun2": 2, "rk4": 4}
PATH = AffineProbPath(scheduler=CondOTScheduler())  # y_t = (1 - t) y_0 + t y_1
DYES = ("dna", "membrane")  # the two dyes every FOV carries beside its one tagged structure


def path_sample(y0: Tensor, y1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(y_t, u_t)`` on the conditional OT path for noise ``y0``, targets ``y1`` (``N C Z Y X``)
    and times ``t`` ``[N]`` in [0, 1]: the noisy targets and the velocity the network regresses."""
    s = PATH.sample(x_0=y0, x_1=y1, t=t)
    return s.x_t, s.dx_t


def noise_seed(seed: int, k: int) -> int:
    """The torch seed of sample ``k`` of a FOV sampled with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


def channel_groups(channels=TARGETS) -> list[tuple[int, ...]]:
    """The channel sets a training FOV carries together: the two dyes (DNA, membrane) and one
    tagged structure. Without the structures the dyes form the one group."""
    dyes = [channels.index(c) for c in DYES if c in channels]
    rest = [i for i in range(len(channels)) if i not in dyes]
    return [tuple(dyes + [i]) for i in rest] or [tuple(dyes)]


class _Velocity(ModelWrapper):
    """The solver's view of the network: ``v(y, t)`` for one FOV, through whole-FOV prediction.

    The network never saw two tagged structures together in training (a FOV carries one), and
    showing it all six noisy channels at once takes it outside what it learned (measured: PCC
    0.58 instead of 0.93 for a structure at t = 0.5). So each velocity is one pass per
    :func:`channel_groups` group, the other channels zero as in training: each structure's clean
    estimate from its own pass, the dyes' averaged over the passes."""

    def __init__(self, net, brightfield: Tensor, max_voxels, workdir):
        super().__init__(net)
        self.x, self.max_voxels, self.workdir = brightfield, max_voxels, workdir
        self.groups = channel_groups(TARGETS[:net.cfg.out_channels]) if net.cfg.out_channels == len(TARGETS) \
            else [tuple(range(net.cfg.out_channels))]

    def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
        g = self.model.at(float(t))
        y = x[0].to(self.x.device)  # [6, Z, Y, X]
        total, count = torch.zeros_like(y), torch.zeros(len(y), 1, 1, 1)
        for group in self.groups:
            keep = torch.zeros(len(y), 1, 1, 1)
            keep[list(group)] = 1
            inp = torch.cat([self.x, y * keep], dim=0)  # [7, Z, Y, X]
            y1_hat = predict_volume(g, inp, max_voxels=self.max_voxels, workdir=self.workdir)  # [6, Z, Y, X]
            total += torch.from_numpy(y1_hat) * keep
            count += keep
        return velocity_from_clean((total / count)[None].to(x.device), x, float(t))


def sample_volume(net, x, steps: int = 8, method: str = "euler", seed: int = 0, max_voxels: int | None = None,
                  workdir=None) -> np.ndarray:
    """One sample ``[C, Z, Y, X]`` (float32) of the targets given a brightfield ``x`` ``[1, Z, Y, X]``.

    Args:
        net: a trained :class:`vstain.models.VelocityNet`.
        x: the brightfield volume, every axis >= 8.
        steps: solver steps from t = 0 (noise) to t = 1 (targets), >= 1.
        method: a fixed-step solver, a key of :data:`METHODS` (``"euler"``; ``"heun2"`` and
            ``"midpoint"`` cost two network passes per step).
        seed: seeds the starting noise (whole volume, standard normal).
        max_voxels, workdir: as :func:`vstain.inference.infer.predict_volume` (tiling budget,
            scratch folder).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if xt.dim() != 4 or xt.shape[0] != 1:
        raise ValueError(f"sample_volume expects a [1, Z, Y, X] brightfield volume, got shape {tuple(xt.shape)}")
    c = net.cfg.out_channels
    y0 = torch.randn((1, c, *xt.shape[1:]), generator=torch.Generator().manual_seed(int(seed)))
    was_training = net.training
    net.eval()
    try:
        solver = ODESolver(velocity_model=_Velocity(net, xt, max_voxels, workdir))
        y1 = solver.sample(x_init=y0, step_size=1.0 / steps, method=method,
                           time_grid=torch.tensor([0.0, 1.0]))
    finally:
        net.train(was_training)
    return y1[0].float().numpy()


def sample_fov(net, x, k: int = 4, steps: int = 8, method: str = "euler", seed: int = 0,
               max_voxels: int | None = None, workdir=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first, mean, sd)`` of ``k`` samples of one FOV (each ``[C, Z, Y, X]`` float32): sample
    ``j`` starts from the noise of :func:`noise_seed` ``(seed, j)``; ``sd`` is the samples'
    standard deviation with ``k - 1`` degrees of freedom (0 for one sample)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (samples per FOV) must be a positive integer, got {k!r}")
    first = []

    def samples():
        for j in range(k):
            y = sample_volume(net, x, steps, method, noise_seed(seed, j), max_voxels, workdir)
            if not first:
                first.append(y)
            yield y

    mean, sd = mean_and_sd(samples(), ddof=1)
    return first[0], mean, sd

"""Kernel inception distance (KID; Binkowski et al. 2018) between generated and measured patches, in
the feature space of the study's 3D classifier.

KID is the squared maximum mean discrepancy between two sets of feature vectors under the
polynomial kernel ``(x·y / d + 1)^3``, estimated without bias (torchmetrics' ``poly_mmd``, the
estimator of its ``KernelInceptionDistance``), so it suits the few hundred patches a channel has
here. It compares *distributions*: a model whose patches look like measured patches anywhere scores
near 0, whether or not each patch matches its own target (that is the perceptual distance's
question, a distortion). The features are the classifier's last stage, averaged over space (the
vector its final layer classifies); the patches are those of :mod:`vstain.evaluate.patches`.

:func:`kid_table` gives each model's KID per channel and over all channels with a bootstrap
interval over FOVs (whole FOVs resampled, real and generated patches together), and its paired
difference from a control model in the same resamples. A resample needs no new kernel evaluation:
:func:`kernel_blocks` sums the kernel once per pair of FOVs, and :func:`kid_of_fovs` gives the KID of
any multiset of FOVs from those sums, exactly as ``poly_mmd`` on the repeated patches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.image.kid import poly_kernel, poly_mmd

from .classifier import ClassifierConfig, apply_batches, features
from .patches import REAL, fov_scoring_patches, no_patch_error

ALL = "all"  # the channel name of the KID over every channel's patches together


def embed(model, patches: np.ndarray, cfg: ClassifierConfig, device: str = "cpu", precision: str = "32-true",
          batch_size: int = 64) -> np.ndarray:
    """The classifier's feature vector ``[N, D]`` of each patch ``[N, pz, py, px]``: its last stage
    averaged over space."""
    return apply_batches(model, patches, cfg, lambda m, x: m.avgpool(features(m, x)[-1]).flatten(1), device,
                         precision, batch_size)


def patch_embeddings(model, cfg: ClassifierConfig, stage_in, pred_dirs: dict[str, str | Path], split: str = "test",
                     reference: str = "target", device: str = "cpu", precision: str = "32-true"
                     ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The feature vectors of the measured patches (``REAL``) and of every model's patches at the
    same places: ``(meta, vectors)``, ``meta`` one row per patch (``fov_id, channel, class, z, y,
    x``), ``vectors`` ``{name: [N, D]}`` in ``meta``'s order. ``pred_dirs``: name -> folder of
    ``<fov_id>.tif`` predictions."""
    metas, vecs = [], {REAL: [], **{m: [] for m in pred_dirs}}
    for meta, p in fov_scoring_patches(stage_in, split, cfg, pred_dirs, reference):
        metas.append(meta)
        for m in vecs:
            vecs[m].append(embed(model, p[m], cfg, device, precision))
    if not metas:
        raise no_patch_error(split, cfg)
    meta = pd.concat(metas, ignore_index=True)
    meta["fov_id"] = meta["fov_id"].astype(str)
    return meta, {m: np.concatenate(v) for m, v in vecs.items()}


def kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased KID of two feature sets ``[N, D]`` and ``[M, D]`` (each at least 2 vectors)."""
    if len(real) < 2 or len(fake) < 2:
        return float("nan")
    a, b = (torch.from_numpy(np.asarray(v, np.float64)) for v in (real, fake))
    return float(poly_mmd(a, b))


@dataclass(frozen=True)
class KernelBlocks:
    """Sums of the polynomial kernel over the patches of each pair of FOVs.

    Args:
        xx, yy, xy: ``[F, F]`` block sums of ``k(real, real)``, ``k(fake, fake)``, ``k(real, fake)``.
        dx, dy: ``[F]`` each FOV's sum of the self-kernel ``k(x_i, x_i)`` (the diagonal).
        counts: ``[F]`` patches per FOV.
    """

    xx: np.ndarray
    yy: np.ndarray
    xy: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    counts: np.ndarray


def kernel_blocks(real: np.ndarray, fake: np.ndarray, fov: np.ndarray, n_fovs: int) -> KernelBlocks:
    """The kernel block sums of paired feature sets ``real`` and ``fake`` ``[N, D]`` whose patch ``i``
    belongs to FOV ``fov[i]`` (``0 .. n_fovs - 1``); the kernel is torchmetrics' ``poly_kernel``."""
    a, b = (torch.from_numpy(np.asarray(v, np.float64)) for v in (real, fake))
    onehot = np.zeros((len(fov), int(n_fovs)))
    onehot[np.arange(len(fov)), np.asarray(fov, int)] = 1.0
    blocks = {}
    for name, (u, v) in {"xx": (a, a), "yy": (b, b), "xy": (a, b)}.items():
        k = poly_kernel(u, v).numpy()
        blocks[name] = onehot.T @ k @ onehot
        if name != "xy":
            blocks["d" + name[0]] = onehot.T @ np.diag(k)
    return KernelBlocks(blocks["xx"], blocks["yy"], blocks["xy"], blocks["dx"], blocks["dy"], onehot.sum(0))


def kid_of_fovs(blocks: KernelBlocks, take) -> float:
    """Unbiased KID of the patches of the FOVs ``take`` (indices, repeats allowed: a bootstrap
    resample), equal to ``poly_mmd`` of those patches stacked with their repeats."""
    w = np.bincount(np.asarray(take, int), minlength=len(blocks.counts)).astype(float)
    m = float(w @ blocks.counts)
    if m < 2:
        return float("nan")
    xx = w @ blocks.xx @ w - w @ blocks.dx
    yy = w @ blocks.yy @ w - w @ blocks.dy
    return float((xx + yy) / (m * (m - 1)) - 2 * (w @ blocks.xy @ w) / m**2)


def kid_table(meta: pd.DataFrame, vectors: dict[str, np.ndarray], models: list[str], control: str | None = None,
              n_resamples: int = 999, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each model's KID against the measured patches, per channel and over all channels (``ALL``),
    with a percentile bootstrap interval over FOVs and, where ``control`` is given, the paired
    difference ``model - control`` in the same resamples.

    Returns one row per ``(channel, model)``: ``kid, low, high, n`` (FOVs), ``patches``, ``diff,
    diff_low, diff_high`` and ``decided`` (the difference's interval excludes 0). Lower is more
    realistic."""
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    rows = []
    for channel in [ALL] + list(dict.fromkeys(meta["channel"])):
        sel = np.ones(len(meta), bool) if channel == ALL else (meta["channel"] == channel).to_numpy()
        fovs = np.array(sorted(set(meta.loc[sel, "fov_id"])))
        fov = pd.Series(np.arange(len(fovs)), index=fovs)[meta.loc[sel, "fov_id"]].to_numpy()
        blocks = {m: kernel_blocks(vectors[REAL][sel], vectors[m][sel], fov, len(fovs)) for m in models}
        point = {m: kid(vectors[REAL][sel], vectors[m][sel]) for m in models}
        boots = {m: [] for m in models}
        for _ in range(n_resamples if len(fovs) >= 2 else 0):
            take = rng.integers(0, len(fovs), len(fovs))
            for m in models:
                boots[m].append(kid_of_fovs(blocks[m], take))
        for m in models:
            b = np.asarray(boots[m])
            lo, hi = (np.nanquantile(b, [alpha, 1 - alpha]) if len(b) else (np.nan, np.nan))
            row = {"channel": channel, "model": m, "kid": point[m], "low": float(lo), "high": float(hi),
                   "n": len(fovs), "patches": int(sel.sum())}
            if control is not None:
                d = b - np.asarray(boots[control]) if len(b) else np.array([])
                dlo, dhi = (np.nanquantile(d, [alpha, 1 - alpha]) if len(d) else (np.nan, np.nan))
                row.update(diff=point[m] - point[control], diff_low=float(dlo), diff_high=float(dhi),
                           decided=bool(m != control and (dlo > 0 or dhi < 0)))
            rows.append(row)
    return pd.DataFrame(rows)

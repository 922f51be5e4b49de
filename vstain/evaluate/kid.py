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
difference from a control model in the same resamples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.image.kid import poly_mmd

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
        idx = {f: np.flatnonzero(sel & (meta["fov_id"] == f).to_numpy()) for f in fovs}
        point = {m: kid(vectors[REAL][sel], vectors[m][sel]) for m in models}
        boots = {m: [] for m in models}
        for _ in range(n_resamples if len(fovs) >= 2 else 0):
            take = np.concatenate([idx[f] for f in rng.choice(fovs, size=len(fovs), replace=True)])
            for m in models:
                boots[m].append(kid(vectors[REAL][take], vectors[m][take]))
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

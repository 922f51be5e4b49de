"""Does a spread say where a prediction is wrong? Uncertainty checked against the clean truth.

A model that gives several predictions of one FOV (the flow's samples, the four flips of
test-time augmentation) gives a mean and a spread per voxel. With the simulator's clean truth three
questions have exact answers:

- **Coverage** (:func:`coverage_rows`): a central predictive interval at a nominal level (50, 80,
  95%) should hold that share of the truth's voxels. From ``k`` draws the interval for one more
  draw is ``mean ± t_{k-1} · sd · sqrt(1 + 1/k)`` (Student's t, ``sd`` with ``k - 1`` degrees of
  freedom); a calibrated spread treats the truth as one more draw.
- **Voxel AUROC** (:func:`error_auroc`): how well the spread finds the voxels whose error is among
  the largest (the top decile of the FOV's channel), 0.5 for a spread that knows nothing.
- **Object AUROC** (:func:`object_rows`): how well the mean spread over a nucleus flags the true
  nuclei the prediction misses and the nuclei it invents, against the matched ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy import stats as sstats
from torchmetrics.functional.classification import binary_auroc

from vstain.channels import TARGETS

from .downstream import iou_matrix
from .segment import segment_nuclei

LEVELS = (0.5, 0.8, 0.95)  # nominal levels of the central intervals
TOP_ERRORS = 0.1  # the share of a channel's voxels called "large errors" for the voxel AUROC
MAX_VOXELS = 200_000  # voxels sampled per FOV and channel for the AUROC (seeded)


def interval_halfwidth(sd: np.ndarray, k: int, level: float) -> np.ndarray:
    """Half-width of the central predictive interval at ``level`` from ``k`` draws of standard
    deviation ``sd`` (``k - 1`` degrees of freedom): ``t_{k-1} · sd · sqrt(1 + 1/k)``."""
    if k < 2 or not 0 < level < 1:
        raise ValueError(f"an interval needs k >= 2 draws and a level in (0, 1), got k={k}, level={level}")
    return sstats.t.ppf((1 + level) / 2, k - 1) * sd * np.sqrt(1 + 1 / k)


def error_auroc(sd: np.ndarray, err: np.ndarray, top: float = TOP_ERRORS, max_voxels: int = MAX_VOXELS,
                seed: int = 0) -> float:
    """AUROC of ``sd`` for the voxels whose absolute error ``err`` is in the top ``top`` share
    (torchmetrics' ``binary_auroc``, on at most ``max_voxels`` seeded voxels). NaN when every
    sampled voxel falls on one side."""
    sd, err = np.ravel(sd), np.ravel(err)
    if sd.size > max_voxels:
        pick = np.random.default_rng(seed).choice(sd.size, size=max_voxels, replace=False)
        sd, err = sd[pick], err[pick]
    large = err >= np.quantile(err, 1 - top)
    if large.all() or not large.any():
        return float("nan")
    return float(binary_auroc(torch.from_numpy(sd.astype(np.float32)), torch.from_numpy(large.astype(np.int64))))


def coverage_rows(model: str, fov_id, mean: np.ndarray, sd: np.ndarray, truth: np.ndarray, k: int,
                  levels: Sequence[float] = LEVELS, seed: int = 0) -> list[dict]:
    """Per channel of one FOV (``[C, Z, Y, X]`` arrays; channels whose truth is NaN are skipped):
    one row per nominal level with the observed ``coverage`` (share of truth voxels inside the
    interval), and one row (``level`` NaN) with the voxel ``auroc`` and the median ``sd`` and error."""
    rows = []
    for c, name in enumerate(TARGETS):
        if np.isnan(truth[c]).all():
            continue
        err = np.abs(mean[c] - truth[c])
        for level in levels:
            inside = err <= interval_halfwidth(sd[c], k, level)
            rows.append({"model": model, "fov_id": str(fov_id), "channel": name, "level": level,
                         "coverage": float(inside.mean())})
        rows.append({"model": model, "fov_id": str(fov_id), "channel": name, "level": float("nan"),
                     "auroc": error_auroc(sd[c], err, seed=seed), "sd_median": float(np.median(sd[c])),
                     "error_median": float(np.median(err))})
    return rows


def object_rows(model: str, fov_id, mean_dna: np.ndarray, sd_dna: np.ndarray, truth_dna: np.ndarray,
                voxel_size_zyx: Sequence[float]) -> list[dict]:
    """The nuclei of one FOV, as segmented in the clean truth and in the mean prediction
    (:func:`vstain.evaluate.segment.segment_nuclei`), matched at IoU > 0.5. One row per object:
    ``kind`` (``"matched"``, ``"missed"``: a true nucleus without a match, ``"invented"``: a
    predicted one without a match), ``error`` (True unless matched) and ``spread``, the mean ``sd``
    of the DNA channel over the object's voxels (the true nucleus' for matched and missed ones)."""
    true_l = segment_nuclei(truth_dna, voxel_size_zyx)
    pred_l = segment_nuclei(mean_dna, voxel_size_zyx)
    iou, _, _ = iou_matrix(pred_l, true_l)
    t_ids, p_ids = np.unique(true_l)[1:], np.unique(pred_l)[1:]
    matched_t = (iou > 0.5).any(axis=1) if iou.size else np.zeros(len(t_ids), bool)
    matched_p = (iou > 0.5).any(axis=0) if iou.size else np.zeros(len(p_ids), bool)
    t_spread = ndimage_mean(sd_dna, true_l, t_ids)
    p_spread = ndimage_mean(sd_dna, pred_l, p_ids)
    rows = [{"model": model, "fov_id": str(fov_id), "kind": "matched" if m else "missed", "error": not m,
             "spread": s} for m, s in zip(matched_t, t_spread)]
    rows += [{"model": model, "fov_id": str(fov_id), "kind": "invented", "error": True, "spread": s}
             for m, s in zip(matched_p, p_spread) if not m]
    return rows


def ndimage_mean(values: np.ndarray, labels: np.ndarray, ids) -> np.ndarray:
    """Mean of ``values`` over each label of ``ids``."""
    return np.asarray(ndimage.mean(values, labels, ids), dtype=float) if len(ids) else np.zeros(0)


def object_auroc(objects: pd.DataFrame) -> pd.DataFrame:
    """Per model: how many objects are errors (missed or invented) and the AUROC of the mean
    spread for finding them (NaN without both kinds)."""
    rows = []
    for model, g in objects.groupby("model", sort=False):
        y = g["error"].to_numpy(bool)
        scores = torch.tensor(g["spread"].to_numpy(np.float32))
        auroc = (float(binary_auroc(scores, torch.from_numpy(y.astype(np.int64)))) if y.any() and not y.all()
                 else float("nan"))
        rows.append({"model": model, "objects": len(g), "missed": int((g["kind"] == "missed").sum()),
                     "invented": int((g["kind"] == "invented").sum()), "auroc": auroc})
    return pd.DataFrame(rows)


def calibration_summary(rows: pd.DataFrame, n_resamples: int = 9999, confidence: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Per model, channel and level: the mean observed ``coverage`` over FOVs (and per model and
    channel the mean voxel ``auroc``, ``level`` NaN), each with a bootstrap interval over FOVs
    (scipy's percentile bootstrap; a single FOV has no interval) and ``n``."""
    out = []
    for (model, channel, level), g in rows.groupby(["model", "channel", "level"], sort=False, dropna=False):
        col = "auroc" if pd.isna(level) else "coverage"
        v = g[col].dropna().to_numpy(float)
        lo = hi = float("nan")
        if len(v) >= 2 and np.ptp(v) > 0:
            ci = sstats.bootstrap((v,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                                  random_state=seed, method="percentile").confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        elif len(v) >= 2:  # every FOV alike: a zero-width interval
            lo = hi = float(v.mean())
        out.append({"model": model, "channel": channel, "level": level, "measure": col,
                    "value": float(v.mean()) if len(v) else float("nan"), "low": lo, "high": hi, "n": len(v)})
    return pd.DataFrame(out)

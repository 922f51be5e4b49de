"""Scores inside the true structure: what whole-volume pixel metrics hide on sparse channels.

On a channel whose structure fills a few percent of the volume (nucleoli, mitochondria, the
envelope), SSIM over the whole volume is dominated by background that any blank prediction
matches, so a model that predicts nothing can score close to one that predicts the structure.
Per FOV and channel, against the reference (the clean truth where the data have one, else the
measured target), this module measures

- ``ssim_fg``: SSIM averaged over the voxels of the *dilated true structure* (the reference's
  Otsu foreground, grown by ``dilate`` voxels), beside the whole-volume ``ssim``;
- ``contrast``: the prediction's mean inside the structure minus its mean outside, over the same
  difference in the reference (1: as much signal on the structure as the reference; 0: none);
- ``spread``: the prediction's standard deviation over the reference's (whole volume);

and calls a model's channel *blank* (it predicts (almost) nothing of it) when its contrast is below
:data:`BLANK_FRACTION` on at least half of the FOVs, before any other score is read. A blank
channel whose prediction still varies (``spread`` at least :data:`OFF_SPREAD`) puts its signal off
the structure (for example, over the whole nucleus instead of its envelope) rather than nowhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.preprocess.processed import load_fov, read_manifest, read_volume

from .fovpool import map_fovs
from .metrics import ssim_window

BLANK_FRACTION = 0.1  # under a tenth of the reference's contrast on the structure: (almost) nothing predicted
BLANK_SHARE = 0.5  # ... on at least this share of the FOVs
OFF_SPREAD = 0.25  # a blank prediction varying at least this much (sd over the reference's): signal off the structure


def structure_mask(ref: np.ndarray, dilate: int = 1) -> np.ndarray:
    """The reference's structure ``[Z, Y, X]``: voxels above its Otsu threshold, grown by ``dilate``
    voxels (a prediction slightly off the structure still counts inside). Empty for a constant volume."""
    if np.ptp(ref) == 0:
        return np.zeros(ref.shape, bool)
    mask = ref > threshold_otsu(ref)
    return ndimage.binary_dilation(mask, iterations=dilate) if dilate else mask


def ssim_whole_and_inside(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The 3D SSIM of ``pred`` against ``ref`` (7-voxel window, data range of ``ref``, as
    :func:`vstain.evaluate.metrics.ssim3d`) over the whole volume, and its map averaged over ``mask``
    (NaN for an empty mask)."""
    win = ssim_window(ref.shape)
    rng = float(np.ptp(ref)) or 1.0
    whole, full = structural_similarity(pred.astype(np.float64), ref.astype(np.float64), data_range=rng,
                                        win_size=win, full=True)
    return float(whole), float(full[mask].mean()) if mask.any() else float("nan")


def contrast(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """The prediction's signal on the structure relative to the reference's: (mean inside - mean
    outside) of ``pred`` over the same of ``ref``; NaN when the mask is empty or the whole volume."""
    if not mask.any() or mask.all():
        return float("nan")
    den = float(ref[mask].mean() - ref[~mask].mean())
    return float((pred[mask].mean() - pred[~mask].mean()) / den) if den > 0 else float("nan")


def structure_table(stage_in: str | Path, pred_dirs: dict[str, str | Path], split: str = "test",
                    reference: str = "auto", dilate: int = 1) -> pd.DataFrame:
    """``ssim`` (whole volume), ``ssim_fg``, ``contrast`` and ``spread`` of every model on every FOV of
    ``split`` and every channel the reference has.

    Args:
        stage_in: the ``03_denoising`` stage folder.
        pred_dirs: model name -> folder of ``<fov_id>.tif`` predictions ``[6, Z, Y, X]``.
        split: the scored split.
        reference: ``"truth"``, ``"target"`` or ``"auto"`` (the truth where every FOV has one).
        dilate: voxels by which the true structure is grown (:func:`structure_mask`).

    Returns a long table ``fov_id, model, channel, metric, value, reference``.
    """
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")
    if reference == "auto":
        reference = "truth" if df["truth_path"].astype(bool).all() else "target"
    if reference not in ("truth", "target"):
        raise ValueError(f"reference must be 'truth', 'target' or 'auto', got {reference!r}")

    def one_fov(r) -> list[dict]:
        rows = []
        _, target, truth = load_fov(r)
        ref = truth if reference == "truth" else target
        if ref is None:
            raise ValueError(f"FOV {r['fov_id']} has no clean truth: reference='truth' needs simulated data")
        preds = {m: read_volume(Path(d) / f"{r['fov_id']}.tif") for m, d in pred_dirs.items()}
        for c, name in enumerate(TARGETS):
            if not np.isfinite(ref[c]).all():
                continue
            mask = structure_mask(ref[c], dilate)
            for model, pred in preds.items():
                whole, inside = ssim_whole_and_inside(pred[c], ref[c], mask)
                spread = float(pred[c].std() / ref[c].std()) if ref[c].std() > 0 else float("nan")
                scores = (("ssim", whole), ("ssim_fg", inside), ("contrast", contrast(pred[c], ref[c], mask)),
                          ("spread", spread))
                for metric, value in scores:
                    rows.append({"fov_id": r["fov_id"], "model": model, "channel": name, "metric": metric,
                                 "value": float(value), "reference": reference})
        return rows

    rows = [row for fov_rows in map_fovs(one_fov, [r for _, r in df.iterrows()]) for row in fov_rows]
    return pd.DataFrame(rows, columns=["fov_id", "model", "channel", "metric", "value", "reference"])


def blank_channels(table: pd.DataFrame, fraction: float = BLANK_FRACTION, share: float = BLANK_SHARE) -> pd.DataFrame:
    """The (model, channel) cells whose prediction is blank: ``contrast`` below ``fraction`` on at
    least ``share`` of the FOVs. Returns ``model, channel, blank, n, median_contrast, median_spread``
    (NaN where the table has no ``spread``) and ``off`` (the prediction varies, :data:`OFF_SPREAD`:
    its signal lies off the structure)."""
    c = table[table["metric"] == "contrast"].dropna(subset=["value"])
    spread = table[table["metric"] == "spread"].groupby(["model", "channel"])["value"].median()
    rows = []
    for (model, channel), g in c.groupby(["model", "channel"], sort=False):
        k = int((g["value"] < fraction).sum())
        if k / len(g) >= share:
            sd = float(spread.get((model, channel), np.nan))
            rows.append({"model": model, "channel": channel, "blank": k, "n": len(g),
                         "median_contrast": float(g["value"].median()), "median_spread": sd,
                         "off": bool(sd >= OFF_SPREAD)})
    return pd.DataFrame(rows, columns=["model", "channel", "blank", "n", "median_contrast", "median_spread", "off"])


def blank_sentence(blank: pd.DataFrame, fraction: float = BLANK_FRACTION) -> str:
    """The blank cells of :func:`blank_channels` (its ``off`` column included) in words, to be read
    before any score of them."""
    if blank.empty:
        return (f"Every model puts at least {fraction:.0%} of the reference's contrast on the true structure of "
                "every channel on most FOVs: no prediction is blank.")
    parts = [f"the {r['model']} on {TARGET_LABELS[r['channel']]} ({r['blank']} of {r['n']} FOVs, median contrast "
             f"{round(r['median_contrast'], 2) + 0.0:.0%} of the reference's"  # no "-0%"
             + (f"; its prediction varies, {r['median_spread']:.0%} of the reference's spread, but off the "
                "structure)" if r["off"] else ")") for _, r in blank.iterrows()]
    return ("**Blank predictions**, read before any score: " + "; ".join(parts) + f". Each puts under {fraction:.0%} "
            "of the reference's contrast on the true structure, so it predicts (almost) nothing there, whatever "
            "its whole-volume SSIM says" + (": where its prediction varies, the signal lies beside or around the "
            "structure, not on it." if blank["off"].any() else "."))


def structure_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median over FOVs of each measure, per channel (rows, :data:`TARGETS` order) and model (columns)."""
    wide = table.groupby(["channel", "metric", "model"], sort=False)["value"].median().unstack(["metric", "model"])
    return wide.reindex([c for c in TARGETS if c in wide.index])

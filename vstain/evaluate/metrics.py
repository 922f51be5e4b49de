"""Pixel metrics of predicted channels and the layout of the thesis' Table 4.1 (thesis 4.2).

Per test FOV and target channel: SSIM (3D, scikit-image, ``data_range`` from the target), MSE,
MAE and the Pearson correlation (PCC). Against the processed targets only the channels a FOV
carries are scored (a NaN channel is no label); on simulated data the same metrics against the clean
six-channel truth score every channel. Results are long-format tables (one row per FOV, channel,
model and metric).

This module knows nothing of models: it reads volumes and compares arrays. The classifier's
columns (F1clf, the perceptual distance) come from :mod:`vstain.evaluate.perceptual`;
:mod:`vstain.evaluate.comparison` turns both into Table 4.1 with intervals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from skimage.metrics import structural_similarity

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.preprocess.processed import load_fov, read_manifest, read_volume

from .fovpool import map_fovs

METRICS = ("ssim", "mse", "mae", "pcc")
# Which direction is better, for every column Table 4.1 can hold.
HIGHER_IS_BETTER = {"ssim": True, "mse": False, "mae": False, "pcc": True, "f1clf": True, "perceptual": False}
COLUMN_LABELS = {"ssim": "SSIM", "mse": "MSE", "mae": "MAE", "pcc": "PCC", "f1clf": "F1clf",
                 "perceptual": "Perceptual dist."}

# The thesis' own Table 4.1 (test set, real Allen hiPSC data, models at thesis scale): THE THESIS'
# REPORTED VALUES, typed in as a reference for side-by-side comparison, not computed here.
# Rows: (channel, model, ssim, ssim_std, mse, mse_std, mae, mae_std, pcc, pcc_std, f1clf).
THESIS_TABLE41_ROWS = [
    ("dna", "U-Net", 0.75, 0.08, 0.40, 0.10, 0.42, 0.06, 0.79, 0.07, 0.9750),
    ("dna", "WGAN", 0.73, 0.09, 0.43, 0.14, 0.39, 0.07, 0.76, 0.08, 0.9796),
    ("membrane", "U-Net", 0.69, 0.09, 0.60, 0.10, 0.43, 0.06, 0.65, 0.08, 0.8908),
    ("membrane", "WGAN", 0.64, 0.09, 0.60, 0.10, 0.46, 0.06, 0.61, 0.08, 0.9889),
    ("mito", "U-Net", 0.79, 0.05, 0.35, 0.06, 0.29, 0.03, 0.81, 0.04, 0.9086),
    ("mito", "WGAN", 0.77, 0.05, 0.39, 0.08, 0.31, 0.04, 0.79, 0.05, 0.9528),
    ("envelope", "U-Net", 0.85, 0.05, 0.19, 0.04, 0.24, 0.02, 0.89, 0.02, 0.7707),
    ("envelope", "WGAN", 0.82, 0.06, 0.25, 0.05, 0.27, 0.03, 0.86, 0.03, 0.9410),
    ("actomyosin", "U-Net", 0.72, 0.09, 0.50, 0.20, 0.43, 0.07, 0.70, 0.10, 0.9855),
    ("actomyosin", "WGAN", 0.70, 0.10, 0.50, 0.20, 0.47, 0.09, 0.70, 0.10, 0.9919),
    ("nucleoli", "U-Net", 0.93, 0.03, 0.14, 0.05, 0.15, 0.02, 0.92, 0.03, 0.9500),
    ("nucleoli", "WGAN", 0.91, 0.04, 0.19, 0.06, 0.17, 0.03, 0.90, 0.04, 0.9789),
]


# The channel names of the thesis' Table 4.1, kept where a table reports the thesis.
THESIS_CHANNEL_NAMES = {"dna": "DNA", "membrane": "Cell mem.", "mito": "Mito.", "envelope": "N. env.",
                        "actomyosin": "Myofib.", "nucleoli": "Nucleoli"}


def thesis_table41(thesis_names: bool = False) -> pd.DataFrame:
    """The thesis' reported Table 4.1 (mean and standard deviation over its test set, and F1clf):
    index ``(channel, model)``, columns ``<metric>_mean``, ``<metric>_std``, ``f1clf``. With
    ``thesis_names`` the channels carry the thesis' own names (``"Myofib."`` for the actomyosin
    bundles)."""
    cols = ["channel", "model", "ssim_mean", "ssim_std", "mse_mean", "mse_std", "mae_mean", "mae_std",
            "pcc_mean", "pcc_std", "f1clf"]
    table = pd.DataFrame(THESIS_TABLE41_ROWS, columns=cols)
    if thesis_names:
        table["channel"] = table["channel"].map(THESIS_CHANNEL_NAMES)
    return table.set_index(["channel", "model"])


# ---------------------------------------------------------------------------------------------
# One channel
# ---------------------------------------------------------------------------------------------
def ssim_window(shape) -> int:
    """The SSIM window: 7 voxels, or the largest odd size that fits a smaller axis."""
    return min(7, *(s if s % 2 else s - 1 for s in shape))


def ssim3d(pred: np.ndarray, target: np.ndarray) -> float:
    """3D SSIM (scikit-image, uniform 7-voxel window, or the largest odd window that fits a smaller
    axis) with ``data_range`` = the target's max - min."""
    win = ssim_window(target.shape)
    if win < 3:
        raise ValueError(f"SSIM needs at least 3 voxels along every axis, got a volume of shape {target.shape}")
    rng = float(target.max() - target.min())
    if rng == 0:
        rng = 1.0  # a constant target: SSIM still defined through its stabilising constants
    return float(structural_similarity(pred.astype(np.float64), target.astype(np.float64),
                                       data_range=rng, win_size=win))


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred.astype(np.float64) - target) ** 2))


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(pred.astype(np.float64) - target)))


def pcc(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation over all voxels; 0 where either volume is constant."""
    a = pred.astype(np.float64).ravel() - pred.mean()
    b = target.astype(np.float64).ravel() - target.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def channel_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SSIM, MSE, MAE and PCC of one predicted channel ``[Z,Y,X]`` against its target."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    return {"ssim": ssim3d(pred, target), "mse": mse(pred, target), "mae": mae(pred, target), "pcc": pcc(pred, target)}


def labelled_channels(target: np.ndarray) -> list[int]:
    """Indices of the channels of a ``[6,Z,Y,X]`` target that carry a label (not all NaN).

    A channel is either a label (all finite) or no label (all NaN); a partly-NaN channel is an
    error, since the processed set never writes one."""
    out = []
    for c in range(target.shape[0]):
        finite = np.isfinite(target[c])
        if finite.all():
            out.append(c)
        elif finite.any():
            raise ValueError(f"target channel {c} ({TARGETS[c]}) is partly NaN: expected a whole channel or none")
    return out


# ---------------------------------------------------------------------------------------------
# FOVs and models
# ---------------------------------------------------------------------------------------------
def fov_metrics(pred: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """Metrics of a ``[6,Z,Y,X]`` prediction on every labelled channel of ``target``.

    Returns a long table with columns ``channel, metric, value`` (channels as TARGETS keys)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    rows = []
    for c in labelled_channels(target):
        for k, v in channel_metrics(pred[c], target[c]).items():
            rows.append({"channel": TARGETS[c], "metric": k, "value": v})
    return pd.DataFrame(rows, columns=["channel", "metric", "value"])


def evaluate_predictions(stage_in: str | Path, pred_dirs: dict[str, str | Path], split: str = "test",
                         reference: str = "target") -> pd.DataFrame:
    """Pixel metrics of every model on every FOV of one split of the processed set.

    Args:
        stage_in: the ``03_denoising`` stage folder (manifest and processed volumes).
        pred_dirs: model name -> folder of ``<fov_id>.tif`` predictions ``[6,Z,Y,X]``.
        split: which split to score (default ``"test"``, as Table 4.1).
        reference: ``"target"`` scores the labelled channels against the processed targets;
            ``"truth"`` scores all six channels against the clean simulated truth (simulated data only).

    Returns a long table ``fov_id, structure, model, channel, metric, value``.
    """
    if reference not in ("target", "truth"):
        raise ValueError(f"reference must be 'target' or 'truth', got {reference!r}")
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")

    def one_fov(row) -> list[pd.DataFrame]:
        _, target, truth = load_fov(row)
        if reference == "truth":
            if truth is None:
                raise ValueError(f"FOV {row['fov_id']} has no clean truth: reference='truth' needs simulated data")
            target = truth
        frames = []
        for model, d in pred_dirs.items():
            pred = read_volume(Path(d) / f"{row['fov_id']}.tif")
            m = fov_metrics(pred, target)
            m.insert(0, "model", model)
            m.insert(0, "structure", row["structure"])
            m.insert(0, "fov_id", row["fov_id"])
            frames.append(m)
        return frames

    per_fov = map_fovs(one_fov, [row for _, row in df.iterrows()])
    return pd.concat([f for frames in per_fov for f in frames], ignore_index=True)


def coverage(long: pd.DataFrame, split: str = "test") -> str:
    """A sentence on how many FOVs each channel of a :func:`evaluate_predictions` table was scored on."""
    n = long.groupby("channel")["fov_id"].nunique()
    total = long["fov_id"].nunique()
    parts = []
    for c in TARGETS:
        if c in n:
            parts.append(f"{TARGET_LABELS[c]} on {n[c]}")
    return f"Scored on {total} {split} FOVs ({', '.join(parts)})."

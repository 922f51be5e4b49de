"""Figures of the flow study (notebook 07d): its training curve, a FOV's samples beside the truth,
and the calibration of the spreads. Each returns a matplotlib Figure and never saves or shows it."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.preprocess.processed import load_fov, read_manifest
from vstain.volumes import read_volume


def flow_curves(losses: pd.DataFrame) -> plt.Figure:
    """The flow's loss per step (training, thin) and at each validation (points): the masked squared
    error of the predicted clean targets."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    tr = losses.dropna(subset=["train_loss"])
    ax.plot(tr["step"], tr["train_loss"], lw=0.6, alpha=0.6, label="training batch")
    if "val_loss" in losses:
        va = losses.dropna(subset=["val_loss"])
        ax.plot(va["step"], va["val_loss"], "o-", ms=3, label="validation (fixed noise and times)")
    ax.set(xlabel="optimiser step", ylabel="masked MSE of the clean targets", yscale="log",
           title="Conditional flow matching: training loss")
    ax.grid(color="0.92")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def samples_panel(stage_in, fov_id, dirs: dict[str, Path], spread_path: Path, channel: str) -> plt.Figure:
    """One FOV's central plane of ``channel``: the clean truth, each model's prediction (``dirs``:
    name -> folder with ``predictions/<fov_id>.tif``), and the flow's spread, on one colour scale
    (the truth's 1st-99.5th percentile) except the spread."""
    df = read_manifest(stage_in)
    row = df[df["fov_id"].astype(str) == str(fov_id)].iloc[0]
    _, target, truth = load_fov(row)
    ref = truth if truth is not None else target
    c = TARGETS.index(channel)
    z = ref.shape[1] // 2
    panels = [("clean truth" if truth is not None else "target", ref[c, z])]
    panels += [(m, read_volume(Path(d) / "predictions" / f"{fov_id}.tif")[c, z]) for m, d in dirs.items()]
    lo, hi = np.nanpercentile(ref[c, z], [1, 99.5])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.3 * (len(panels) + 1), 2.6))
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(name, fontsize=8)
    sd = read_volume(spread_path)[c, z]
    im = axes[-1].imshow(sd, cmap="magma")
    axes[-1].set_title("flow spread (sd)", fontsize=8)
    fig.colorbar(im, ax=axes[-1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{TARGET_LABELS[channel]}, FOV {fov_id}, plane z = {z}", fontsize=9)
    fig.tight_layout()
    return fig


def calibration_plot(table: pd.DataFrame) -> plt.Figure:
    """Observed against nominal coverage of the central intervals, one panel per model, one line per
    channel with its 95% interval over FOVs; the diagonal is a calibrated spread."""
    cov = table[table["measure"] == "coverage"]
    models = list(dict.fromkeys(cov["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, m in zip(axes[0], models):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
        for i, ch in enumerate(TARGETS):
            g = cov[(cov["model"] == m) & (cov["channel"] == ch)].sort_values("level")
            if g.empty:
                continue
            err = np.vstack([g["value"] - g["low"], g["high"] - g["value"]]).clip(min=0)
            ax.errorbar(g["level"], g["value"], yerr=err, marker="o", ms=3, lw=1, capsize=2, color=colors(i),
                        label=TARGET_LABELS[ch])
        ax.set(xlim=(0.4, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="observed coverage of the clean truth",
               title=m)
        ax.grid(color="0.92")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig

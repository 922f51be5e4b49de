"""Figures of the page "Use the model on your own stack": a prediction of a new file beside its
clean truth, with the spread of the flip-averaged prediction as an uncertainty map."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from vstain.channels import TARGET_LABELS, TARGETS


def prediction_with_uncertainty(bf: np.ndarray, pred: np.ndarray, spread: np.ndarray, truth: np.ndarray,
                                voxel_size_zyx, z: int | None = None, title: str = "") -> plt.Figure:
    """Central XY slice (or ``z``) of the input, then per channel the clean truth, the prediction and
    the TTA spread. Truth and prediction share the truth's display range (1st-99.8th percentile,
    z-scored both), the spread has its own colour bar; a 10 µm scale bar on the input.

    Args:
        bf: brightfield ``[Z, Y, X]``; pred, spread, truth: ``[6, Z, Y, X]``.
        voxel_size_zyx: µm, for the scale bar.
    """
    z = pred.shape[1] // 2 if z is None else int(z)
    fig, axes = plt.subplots(len(TARGETS) + 1, 3, figsize=(8.4, 2.4 * (len(TARGETS) + 1)),
                             gridspec_kw={"width_ratios": [1, 1, 1]})
    ax = axes[0, 0]
    fig.colorbar(ax.imshow(bf[z], cmap="gray"), ax=ax, shrink=0.8, label="counts")
    ax.set_title(f"brightfield input, z = {z * float(voxel_size_zyx[0]):.1f} µm", fontsize=9)
    px = float(voxel_size_zyx[2])
    bar = 10.0 / px
    ax.plot([bf.shape[2] * 0.05, bf.shape[2] * 0.05 + bar], [bf.shape[1] * 0.92] * 2, color="white", lw=3, gid="scale bar")
    ax.text(bf.shape[2] * 0.05, bf.shape[1] * 0.88, "10 µm", color="white", fontsize=8)
    for a in axes[0, 1:]:
        a.axis("off")
    for r, name in enumerate(TARGETS, start=1):
        t = (truth[r - 1] - truth[r - 1].mean()) / (truth[r - 1].std() + 1e-6)
        lo, hi = np.percentile(t, [1, 99.8])
        for c, (img, label) in enumerate(((t[z], "clean truth"), (pred[r - 1, z], "prediction"))):
            im = axes[r, c].imshow(img, cmap="magma", vmin=lo, vmax=hi)
            axes[r, c].set_title(f"{TARGET_LABELS[name]}: {label}", fontsize=9)
        fig.colorbar(im, ax=axes[r, :2].tolist(), shrink=0.8, label="z-scored intensity")
        im = axes[r, 2].imshow(spread[r - 1, z], cmap="viridis", vmin=0)
        axes[r, 2].set_title("TTA spread (std of 4 flips)", fontsize=9)
        fig.colorbar(im, ax=axes[r, 2], shrink=0.8, label="std, z-score units")
    for a in axes.ravel():
        a.set_xticks([]), a.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig

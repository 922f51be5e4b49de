"""Figures of the models stage: loss curves, predictions beside the ground truth, and the
architecture diagrams of the generator (thesis Figure 3.1) and the critic (Figure 3.2), drawn from
:func:`vstain.models.summarize` rows so they always show the model that was built."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from vstain.channels import TARGET_LABELS, TARGETS

from .views import channel_ranges, section_grid, voxel_size


def plot_losses(losses: pd.DataFrame, ax=None, title: str = "U-Net baseline: masked L1"):
    """Training (per step, with a running mean) and validation masked L1 against the step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    tr = losses.dropna(subset=["train_l1"])
    ax.plot(tr["step"], tr["train_l1"], color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    win = max(1, len(tr) // 20)
    ax.plot(tr["step"], tr["train_l1"].rolling(win, min_periods=1).mean(), color="tab:blue", lw=1.8,
            label=f"train (running mean of {win})")
    if "val_l1" in losses:
        va = losses.dropna(subset=["val_l1"])
        ax.plot(va["step"], va["val_l1"], "o-", color="tab:orange", lw=1.8, label="validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("masked L1 (z-scored units)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def plot_prediction(bf: np.ndarray, target: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None,
                    view: str = "xy", title: str = "", *, voxel_size_zyx: Sequence[float]):
    """Brightfield and the six channels: measured target, prediction and (where the simulator gave
    it) the clean truth, as rows; a channel the FOV carries no label for is marked ``no label``.
    All panels of a channel share one display range (:func:`vstain.plots.views.display_range`:
    the clean truth's, else the labelled target's, else the prediction's), shown by a colour bar
    in z-score units under the channel; the XZ section is drawn at the voxel aspect ``z / x``.

    Args:
        bf: brightfield ``[1, Z, Y, X]``; target: ``[6, Z, Y, X]`` with NaN for missing labels;
        pred: ``[6, Z, Y, X]``; truth: ``[6, Z, Y, X]`` or None.
        view: ``"xy"`` (central z-slice) or ``"xz"`` (section through the central row).
        voxel_size_zyx: voxel size ``(z, y, x)`` in µm of the run (:func:`vstain.plots.views.voxel_size`).
    """
    rows = [("measured target", target), ("prediction", pred)] + ([("clean truth", truth)] if truth is not None else [])
    return section_grid(bf, rows, channel_ranges(truth, target, [pred]), view, bf.shape[1] // 2, bf.shape[2] // 2,
                        voxel_size_zyx, title, [TARGET_LABELS[k] for k in TARGETS])


# --------------------------------------------------------------------------------------------
# Architecture diagrams
# --------------------------------------------------------------------------------------------
def _shape(s) -> str:
    return f"{s[0]}×" + "×".join(str(v) for v in s[1:])


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=color, ec="0.2", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def _arrow(ax, a, b, text="", color="0.2", style="-|>", ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=color, lw=1.2, linestyle=ls))
    if text:
        ax.text((a[0] + b[0]) / 2 + 0.05, (a[1] + b[1]) / 2, text, fontsize=6.5, color=color, va="center")


def plot_generator(rows: list[dict], title: str = "Generator (3D U-Net, thesis Fig. 3.1)"):
    """A U-shaped box diagram of :func:`vstain.models.summarize` rows of a Generator: encoder
    down the left, bottleneck at the bottom, decoder up the right; each box gives the block's
    output shape (C×Z×Y×X) and parameters; arrows are the k2s2 convolutions, the transposed
    convolutions and the concatenated skips."""
    by = {r["name"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(11, 6.5))
    w, h = 2.2, 0.75
    pos = {"enc1": (1.5, 4), "enc2": (2.5, 2.8), "enc3": (3.5, 1.6), "bottleneck": (5.5, 0.4),
           "up3": (7.5, 1.6), "up2": (8.5, 2.8), "up1": (9.5, 4), "head": (9.5, 5.3)}
    colors = {"enc": "#cfe2f3", "bottleneck": "#f9cb9c", "up": "#d9ead3", "head": "#fff2cc"}
    for name, (x, y) in pos.items():
        r = by[name]
        kind = "enc" if name.startswith("enc") else "up" if name.startswith("up") else name
        label = {"enc": f"{name}: 2×(conv3·IN·LReLU)", "up": f"{name}: convT2 ⧺ skip, 2×conv3",
                 "bottleneck": "bottleneck: 2×(conv3·IN·LReLU)", "head": "head: conv3 → 6 channels"}[kind]
        _box(ax, x, y, w, h, f"{label}\n{_shape(r['out_shape'])}\n{_params(r['params'])} params", colors[kind])
    inp = by["enc1"]["in_shape"]
    _box(ax, 1.5, 5.3, w, 0.55, f"brightfield input\n{_shape(inp)} (padded to ×8)", "white")
    _arrow(ax, (1.5, 5.3 - 0.28), (1.5, 4 + h / 2))
    chain = [("enc1", "enc2", "down1"), ("enc2", "enc3", "down2"), ("enc3", "bottleneck", "down3")]
    for a, b, d in chain:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        _arrow(ax, (xa, ya - h / 2), (xb - w / 2 + 0.2, yb + h / 2), f"{d}: conv k2 s2 ({_params(by[d]['params'])})", "tab:blue")
    for a, b in [("bottleneck", "up3"), ("up3", "up2"), ("up2", "up1")]:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        _arrow(ax, (xa + w / 2 - 0.2, ya + h / 2), (xb, yb - h / 2), "convT k2 s2", "tab:green")
    for a, b in [("enc1", "up1"), ("enc2", "up2"), ("enc3", "up3")]:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        _arrow(ax, (xa + w / 2, ya), (xb - w / 2, yb), "", "0.5", ls="--")
        ax.text((xa + xb) / 2, ya + 0.08, "skip (concatenate)", fontsize=6.5, color="0.4", ha="center")
    _arrow(ax, (9.5, 4 + h / 2), (9.5, 5.3 - h / 2))
    total = sum(r["params"] for r in rows)
    ax.set_xlim(0, 11), ax.set_ylim(-0.3, 6)
    ax.axis("off")
    ax.set_title(f"{title}: {total:,} parameters")
    return fig


def plot_critic(rows: list[dict], title: str = "Critic (3D PatchGAN, thesis Fig. 3.2)", receptive_field: int | None = None):
    """A left-to-right chain of the critic's blocks from :func:`vstain.models.summarize` rows,
    each with its operation, output shape and parameters; box heights shrink with the volume."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ops = {"block1": "conv k4 s2, LReLU", "block2": "conv k4 s2, IN, LReLU", "block3": "conv k4 s2, IN, LReLU",
           "block4": "conv k3 s1, IN, LReLU", "score": "conv k3 s1 → 1"}
    inp = rows[0]["in_shape"]
    items = [("input", f"brightfield ⧺ 6 targets\n{_shape(inp)}", inp)] + [
        (r["name"], f"{r['name']}\n{ops.get(r['name'], r['kind'])}\n{_shape(r['out_shape'])}\n{_params(r['params'])} params", r["out_shape"])
        for r in rows]
    vmax = np.prod(inp[1:])
    for i, (name, text, shape) in enumerate(items):
        hgt = 0.9 + 1.6 * (np.prod(shape[1:]) / vmax) ** (1 / 3)
        x = 1.2 + 2.1 * i
        _box(ax, x, 1.6, 1.9, hgt, text, "white" if name == "input" else "#cfe2f3" if name != "score" else "#f4cccc")
        if i:
            _arrow(ax, (x - 2.1 + 0.95, 1.6), (x - 0.95, 1.6))
    total = sum(r["params"] for r in rows)
    rf = f"; receptive field {receptive_field} voxels" if receptive_field else ""
    ax.set_xlim(0, 2.1 * len(items) + 0.3), ax.set_ylim(0, 3.3)
    ax.axis("off")
    ax.set_title(f"{title}: {total:,} parameters{rf}; output = map of realness scores")
    return fig

"""Figures of the evaluation (thesis chapter 4): classifier training curves, confusion matrices
(Figure 4.1), an input with its prediction (Figure 4.2) and ground-truth/prediction galleries
(Figures 4.3 and 4.4). Every function returns a matplotlib Figure and never saves or shows it."""
from __future__ import annotations

import textwrap
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.evaluate.patches import REAL

from .views import (RANGE_RULE, brightfield_panel, channel_panel, channel_ranges, colorbar, robust_range, scale_bar,

    show_section, voxel_size)

PALETTE = {REAL: "0.6", "U-Net": "tab:blue", "WGAN": "tab:orange", "WGAN-GP": "tab:orange",
           "WGAN-GP from U-Net": "tab:green"}
SHORT = {"dna": "DNA", "membrane": "Membrane", "mito": "Mito.", "envelope": "N. env.",
         "actomyosin": "Actomyosin", "nucleoli": "Nucleoli"}


def training_curves(history: pd.DataFrame, title: str = "Classifier training") -> plt.Figure:
    """Loss and accuracy per epoch on the measured train patches and the held-out val patches."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(history["epoch"], history["train_loss"], "o-", label="train")
    a.plot(history["epoch"], history["val_loss"], "s-", label="val (held out)")
    a.set(xlabel="epoch", ylabel="cross-entropy (nats per patch)", title="Loss")
    b.plot(history["epoch"], history["train_acc"], "o-", label="train")
    b.plot(history["epoch"], history["val_acc"], "s-", label="val (held out)")
    b.axhline(1 / len(TARGETS), color="grey", ls=":", label="chance")
    b.set(xlabel="epoch", ylabel="accuracy (fraction of patches)", title="Accuracy", ylim=(0, 1.02))
    for ax in (a, b):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_heatmap(conf: np.ndarray, ax: plt.Axes, title: str = "", labels=TARGETS) -> plt.Axes:
    """Row-normalised confusion matrix (rows: the true channel, columns: the classifier's answer),
    annotated with fractions; rows without patches stay empty."""
    conf = np.asarray(conf, float)
    rows = conf.sum(1, keepdims=True)
    frac = np.divide(conf, rows, out=np.full_like(conf, np.nan), where=rows > 0)
    names = [SHORT[c] for c in labels]
    sns.heatmap(frac, ax=ax, vmin=0, vmax=1, cmap="Blues", annot=True, fmt=".2f", annot_kws={"size": 7},
                xticklabels=names, yticklabels=[f"{n} ({int(r)})" for n, r in zip(names, rows[:, 0])],
                cbar_kws={"label": "fraction of the row's patches"}, square=True)
    ax.set(xlabel="classified as", ylabel="true channel (patches)", title=title)
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    return ax


def confusion_pair(confs: dict[str, np.ndarray], title: str) -> plt.Figure:
    """One heatmap per model side by side (Figure 4.1: (A) U-Net, (B) WGAN)."""
    fig, axes = plt.subplots(1, len(confs), figsize=(5.6 * len(confs), 4.8))
    axes = np.atleast_1d(axes)
    for i, (ax, (name, conf)) in enumerate(zip(axes, confs.items())):
        confusion_heatmap(conf, ax, f"({chr(65 + i)}) {name}")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def input_and_prediction(bf: np.ndarray, pred: np.ndarray, title: str, z: int | None = None, *,
                         voxel_size_zyx: Sequence[float], target: np.ndarray | None = None,
                         truth: np.ndarray | None = None) -> plt.Figure:
    """Figure 4.2: (A) the brightfield input and (B) the six predicted channels, one z-plane
    (default: the central one) of ``bf [1,Z,Y,X]`` and ``pred [6,Z,Y,X]``. Each channel is drawn
    in the range the galleries (Figures 4.3/4.4) give the same FOV and channel
    (:func:`vstain.plots.views.display_range` of ``truth``, else of the labelled ``target``, else
    of the prediction), with its colour bar in z-score units; (A) carries a µm scale bar.

    Args:
        voxel_size_zyx: voxel size ``(z, y, x)`` in µm (:func:`vstain.plots.views.voxel_size`).
        target, truth: the FOV's ``[6,Z,Y,X]`` measured target (NaN = no label) and clean truth,
            the references of the display ranges; pass the same as to :func:`gallery`.
    """
    z = pred.shape[1] // 2 if z is None else z
    ranges = channel_ranges(truth, target, [pred])
    fig = plt.figure(figsize=(12, 4.6), constrained_layout=True)
    gs = fig.add_gridspec(2, 4, width_ratios=[2, 1, 1, 1])
    ax = fig.add_subplot(gs[:, 0])
    brightfield_panel(ax, bf[0, z], voxel_size_zyx, "xy")
    scale_bar(ax, voxel_size_zyx[2], bf.shape[3])
    ax.set_title(f"(A) brightfield input, z={z}")
    for c, name in enumerate(TARGETS):
        a = fig.add_subplot(gs[c // 3, 1 + c % 3])
        im = channel_panel(a, pred[c, z], voxel_size_zyx, "xy", ranges[c])
        if im is not None:
            colorbar(fig, im, a, shrink=0.9)
        a.set_title(("(B) " if c == 0 else "") + TARGET_LABELS[name], fontsize=9)
    fig.suptitle(f"{title}\n{RANGE_RULE}", fontsize=9)
    return fig


def _no_label(ax, like: np.ndarray, voxel_size_zyx: Sequence[float]) -> None:
    """A hatched grey panel marked "no label", the size of ``like``."""
    show_section(ax, np.zeros_like(like), voxel_size_zyx, "xy", cmap="gray", vmin=-1, vmax=1)
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, hatch="//", color="0.4"))
    ax.text(0.5, 0.5, "no label", transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="w", bbox={"facecolor": "0.25", "edgecolor": "none"})


def gallery(fov_ids: list[str], targets: list[np.ndarray], preds: list[np.ndarray], title: str,
            z: int | None = None, *, voxel_size_zyx: Sequence[float],
            truths: list[np.ndarray | None] | None = None) -> plt.Figure:
    """Figures 4.3/4.4: FOVs in columns; for each of the six channels a ground-truth row and a
    prediction row (central z-plane). A channel the FOV carries no label for is drawn as a hatched
    grey panel marked "no label"; its prediction is shown all the same. Each GT/prediction pair
    shares one display range, with its colour bar in z-score units: that of the FOV's clean truth
    where given, else of the labelled ground truth, else of the prediction
    (:func:`vstain.plots.views.display_range`); so an unlabelled channel is drawn on the same scale
    as in every other figure of the FOV whenever a clean truth exists. The first prediction panel
    carries a µm scale bar.

    Args:
        targets, preds: per FOV ``[6,Z,Y,X]`` (targets NaN where unlabelled).
        voxel_size_zyx: voxel size ``(z, y, x)`` in µm (:func:`vstain.plots.views.voxel_size`).
        truths: per FOV the clean truth ``[6,Z,Y,X]`` or None (real data).
    """
    n = len(fov_ids)
    truths = [None] * n if truths is None else list(truths)
    if not len(targets) == len(preds) == len(truths) == n:
        raise ValueError(f"gallery: {n} fov_ids but {len(targets)} targets, {len(preds)} preds, {len(truths)} truths")
    fig, axes = plt.subplots(2 * len(TARGETS), n, figsize=(2.5 * n + 1.2, 1.75 * 2 * len(TARGETS)), squeeze=False,
                             constrained_layout=True)
    for j, (fid, tgt, prd, tru) in enumerate(zip(fov_ids, targets, preds, truths)):
        zz = tgt.shape[1] // 2 if z is None else z
        ranges = channel_ranges(tru, tgt, [prd])
        for c, name in enumerate(TARGETS):
            g, p = tgt[c, zz], prd[c, zz]
            ag, ap = axes[2 * c, j], axes[2 * c + 1, j]
            if np.isfinite(g).all():
                channel_panel(ag, g, voxel_size_zyx, "xy", ranges[c])
            else:
                _no_label(ag, p, voxel_size_zyx)
            im = channel_panel(ap, p, voxel_size_zyx, "xy", ranges[c])
            if im is not None:
                colorbar(fig, im, [ag, ap], shrink=0.85, aspect=15)
            if j == 0:
                ag.set_ylabel(f"{SHORT[name]}\nGT", fontsize=8)
                ap.set_ylabel(f"{SHORT[name]}\npred.", fontsize=8)
        axes[0, j].set_title(str(fid), fontsize=9)
    scale_bar(axes[1, 0], voxel_size_zyx[2], preds[0].shape[3])
    fig.suptitle(f"{title}\n{textwrap.fill(RANGE_RULE, 28 * n)}", fontsize=9)
    return fig


def patch_rule(ref: np.ndarray, all_starts, kept_starts, patch, title: str, z: int | None = None,
               pixel_x_um: float | None = None) -> plt.Figure:
    """The background rule on one channel: the central plane of ``ref [Z,Y,X]`` with the grid's
    patches that cross it, kept ones in green, excluded ones in red (dashed); a colour bar in the
    channel's z-score units and, given the voxel width, a µm scale bar."""
    z = ref.shape[0] // 2 if z is None else z
    kept = set(map(tuple, kept_starts))
    fig, ax = plt.subplots(figsize=(5.2, 4.5), layout="constrained")
    lo, hi = robust_range(ref[z])
    im = ax.imshow(ref[z], cmap="magma", vmin=lo, vmax=hi)
    colorbar(fig, im, ax)
    for s in all_starts:
        if not s[0] <= z < s[0] + patch[0]:
            continue
        ok = tuple(s) in kept
        ax.add_patch(Rectangle((s[2] - 0.5, s[1] - 0.5), patch[2], patch[1], fill=False,
                               ec="lime" if ok else "red", ls="-" if ok else "--", lw=1.5 if ok else 1))
    if pixel_x_um is not None:
        scale_bar(ax, pixel_x_um, ref.shape[2])
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return fig


def patch_examples(patches: np.ndarray, classes: np.ndarray, per_class: int = 4, title: str = "",
                   seed: int = 0, pixel_x_um: float | None = None) -> plt.Figure:
    """A few patches ``[N,pz,py,px]`` of each class (central plane), one row per class, drawn in one
    display range per class with its colour bar (z-score units), and a µm scale bar given the voxel width."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(TARGETS), per_class, figsize=(1.5 * per_class + 1.6, 1.5 * len(TARGETS)),
                             squeeze=False, layout="constrained")
    for c, name in enumerate(TARGETS):
        pick = rng.permutation(np.flatnonzero(classes == c))[:per_class]
        lo, hi = robust_range(patches[pick]) if len(pick) else (0.0, 1.0)
        im = None
        for k in range(per_class):
            ax = axes[c, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(pick):
                p = patches[pick[k]]
                im = ax.imshow(p[p.shape[0] // 2], cmap="magma", vmin=lo, vmax=hi)
                if k == 0 and pixel_x_um is not None:
                    scale_bar(ax, pixel_x_um, p.shape[2])
            if k == 0:
                ax.set_ylabel(SHORT[name], fontsize=8)
        if im is not None:
            colorbar(fig, im, axes[c, :], label="z-score")
    fig.suptitle(title)
    return fig


def classifier_scores(scores: pd.DataFrame, title: str) -> plt.Figure:
    """F1clf and the perceptual distance per channel, one bar per model (``summarise_scores`` output)."""
    df = scores.reset_index()
    df["channel"] = [SHORT[c] for c in df["channel"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    pal = {m: PALETTE.get(m, f"C{i + 2}") for i, m in enumerate(dict.fromkeys(df["model"]))}
    sns.barplot(df, x="channel", y="f1clf", hue="model", ax=a, palette=pal)
    a.set(ylim=(0, 1.02), xlabel="target channel", ylabel="F1 of the classifier (0-1)", title="F1clf (higher is better)")
    sns.barplot(df[df["model"] != REAL], x="channel", y="perceptual_mean", hue="model", ax=b, palette=pal)
    b.set(xlabel="target channel", ylabel="LPIPS-style distance to the measured patch\n(0 = identical, at most 4)",
          title="Perceptual distance (lower is better)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig

"""Figures of the WGAN-GP stage: the training curves of Algorithm 1, the generator's two gradients,
predictions beside the ground truth and the U-Net baseline's, and the sharpness comparison."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS

from .views import channel_ranges, section_grid, voxel_size

STEP_LABEL = "optimiser step (n_critic + 1 per iteration)"


def _curve(ax, df: pd.DataFrame, col: str, color: str, label: str):
    """Per-step values (faint) and their running mean against the optimiser step."""
    d = df.dropna(subset=[col])
    if d.empty:
        return
    win = max(1, len(d) // 15)
    if win == 1:
        ax.plot(d["step"], d[col], color=color, lw=1.5, label=label)
        return
    ax.plot(d["step"], d[col], color=color, alpha=0.3, lw=0.8)
    ax.plot(d["step"], d[col].rolling(win, min_periods=1).mean(), color=color, lw=1.8,
            label=f"{label} (running mean of {win})")


def plot_curves(losses: pd.DataFrame, title: str = "WGAN-GP training (Algorithm 1)"):
    """Five panels against the optimiser step: critic loss, Wasserstein estimate, gradient
    penalty (critic steps), masked L1 with the validation L1, and the adversarial term
    ``-mean D(x, ỹ)`` (generator steps). ``losses``: :data:`vstain.training.wgan.LOSS_COLUMNS`."""
    critic = losses[losses["kind"] == "critic"]
    gen = losses[losses["kind"] == "generator"]
    val = losses[losses["kind"] == "val"]
    fig, axes = plt.subplots(1, 5, figsize=(18, 3.4), constrained_layout=True)
    panels = [
        (critic, "critic_loss", "tab:red", "critic loss", "D(x,ỹ) - D(x,y) + λ_gp·GP (critic score)"),
        (critic, "wasserstein", "tab:purple", "Wasserstein estimate", "mean D(real) - mean D(fake) (critic score)"),
        (critic, "gp", "tab:brown", "gradient penalty", "(‖∇ŷ D‖₂ - 1)² (0 = 1-Lipschitz)"),
        (gen, "l1", "tab:blue", "masked L1 (train)", "masked L1 (z-scored units)"),
        (gen, "adv", "tab:green", "adversarial term", "-mean D(x, ỹ) (critic score)"),
    ]
    for ax, (d, col, color, label, ylabel) in zip(axes, panels):
        _curve(ax, d, col, color, label)
        if col == "l1" and "val_l1" in val and val["val_l1"].notna().any():
            ax.plot(val["step"], val["val_l1"], "o-", color="tab:orange", lw=1.5, ms=3, label="validation")
        if col == "wasserstein":
            ax.axhline(0, color="0.5", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel(STEP_LABEL, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def plot_gradients(losses: pd.DataFrame, title: str = "Generator and critic gradients"):
    """Left: the ratio of the weighted adversarial gradient to the L1 gradient at the generator's
    output (1 = equal pull), log scale. Right: the gradient norms of both networks' weights."""
    gen = losses[losses["kind"] == "generator"]
    critic = losses[losses["kind"] == "critic"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), constrained_layout=True)
    _curve(a, gen, "grad_ratio", "tab:green", "|λ_adv ∇adv| / |∇L1|")
    a.axhline(1.0, color="0.4", ls="--", lw=1, label="equal")
    a.set_yscale("log")
    a.set_xlabel(STEP_LABEL)
    a.set_ylabel("gradient ratio at the generator output\n(dimensionless, log scale)")
    a.set_title("adversarial vs L1 gradient")
    a.legend(fontsize=7)
    a.grid(alpha=0.3, which="both")
    _curve(b, critic, "grad_norm_critic", "tab:red", "critic")
    _curve(b, gen, "grad_norm_generator", "tab:blue", "generator")
    b.set_yscale("log")
    b.set_xlabel(STEP_LABEL)
    b.set_ylabel("‖∇ weights‖₂ (loss per unit weight, log scale)")
    b.set_title("weight-gradient norms")
    b.legend(fontsize=7)
    b.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    return fig


def plot_comparison(bf: np.ndarray, target: np.ndarray, preds: dict[str, np.ndarray], truth: np.ndarray | None = None,
                    view: str = "xy", z: int | None = None, y: int | None = None, title: str = "", *,
                    voxel_size_zyx: Sequence[float]):
    """One FOV, the same section for every row: measured target, clean truth (when given), then
    each model's prediction (e.g. ``{"U-Net": ..., "WGAN": ...}``); columns are the brightfield and
    the six channels. Every panel of a channel, models included, shares one display range
    (:func:`vstain.plots.views.display_range`: the clean truth's, else the labelled target's, else
    that of all the predictions together), shown by a colour bar in z-score units; the XZ section
    is drawn at the voxel aspect ``z / x``.

    Args:
        bf: ``[1, Z, Y, X]``; target, truth and each prediction: ``[6, Z, Y, X]`` (target NaN
            where unlabelled; truth None on real data).
        view: ``"xy"`` (slice ``z``, default central) or ``"xz"`` (row ``y``, default central).
        voxel_size_zyx: voxel size ``(z, y, x)`` in µm of the run (:func:`vstain.plots.views.voxel_size`).
    """
    z = bf.shape[1] // 2 if z is None else int(z)
    y = bf.shape[2] // 2 if y is None else int(y)
    rows = [("measured target", target)] + ([("clean truth", truth)] if truth is not None else [])
    rows += list(preds.items())
    return section_grid(bf, rows, channel_ranges(truth, target, list(preds.values())), view, z, y, voxel_size_zyx,
                        title, [TARGET_LABELS[k] for k in TARGETS])


def plot_sharpness(table: pd.DataFrame, title: str | None = None):
    """Per channel, the median over FOVs (with the FOVs as dots) of each model's coherent
    high-frequency transfer (left; 1 = as sharp as the reference, noise adds nothing) and of the
    plain high-frequency power ratio (right; noise and invented texture raise it).
    ``table``: :func:`vstain.evaluate.sharpness.sharpness_table`."""
    ref = "clean truth" if table["reference"].iloc[0] == "truth" else "measured target"
    title = title or f"Sharpness against the {ref}"
    models = list(dict.fromkeys(table["model"]))
    colors = dict(zip(models, ["tab:blue", "tab:red", "tab:green", "tab:purple"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), constrained_layout=True)
    width = 0.8 / len(models)
    for ax, col, label in ((axes[0], "transfer", f"coherent HF transfer (vs {ref})"),
                           (axes[1], "power", f"HF power ratio (pred. / {ref})")):
        for k, m in enumerate(models):
            d = table[table["model"] == m]
            means = d.groupby("channel")[col].median().reindex(TARGETS)
            xs = np.arange(len(TARGETS)) + (k - (len(models) - 1) / 2) * width
            ax.bar(xs, means.to_numpy(), width=width, color=colors[m], alpha=0.75, label=m)
            for i, key in enumerate(TARGETS):
                v = d.loc[d["channel"] == key, col].to_numpy()
                ax.plot(np.full(len(v), xs[i]), v, "k.", ms=3)
        ax.axhline(1.0, color="0.3", ls="--", lw=1)
        ax.set_xticks(range(len(TARGETS)), [TARGET_LABELS[t] for t in TARGETS], rotation=20, fontsize=8)
        ax.set_xlabel("target channel")
        ax.set_ylabel(f"{label}\n(ratio; 1 = the {ref})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[0].set_title(f"fine detail reproduced in phase with the {ref} (1 = as sharp)")
    axes[1].set_title("high-frequency power (noise and texture inflate it)")
    fig.suptitle(title)
    return fig


def plot_l1_pair(runs: dict[str, pd.DataFrame], title: str = "Masked L1 from the same start"):
    """The masked L1 of the generator steps (running mean) and the validation L1 of several runs
    (``name -> losses.csv`` table), against the generator iteration."""
    fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
    for (name, losses), color in zip(runs.items(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        gen = losses[losses["kind"] == "generator"].assign(step=lambda d: d["iteration"])
        _curve(ax, gen, "l1", color, f"{name}, train")
        val = losses[losses["kind"] == "val"]
        if "val_l1" in val and val["val_l1"].notna().any():
            ax.plot(val["iteration"], val["val_l1"], "o--", color=color, lw=1.2, ms=3, label=f"{name}, validation")
    ax.set_xlabel("generator iteration")
    ax.set_ylabel("masked L1 (z-scored units)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig

"""Figures of the realism page: where the walls are against the nuclei's Voronoi walls, the
refractive-index map, what the geometry alone predicts, the learnability ordering and the per-channel
learning curves it is measured at."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.evaluate import learnability, realism

from .views import colorbar, scale_bar


def _extent(shape_yx, pixel_yx):
    return (0, shape_yx[1] * pixel_yx[1], shape_yx[0] * pixel_yx[0], 0)


def walls_and_index(f: dict, n_medium: float, title: str):
    """(A) an XY slice through the middle of the cell layer: brightfield with the true cell walls
    (cyan) and the walls of the nuclei's Voronoi partition (magenta); (B) the refractive index of
    the same slice."""
    z = (f["focus_z_lo"] + f["focus_z_hi"]) // 2
    px = f["pixel_size"]
    cells, nuclei = f["labels"]["cells"][z], f["labels"]["nuclei"]
    vor = realism.nuclear_voronoi(nuclei, px)[z]
    bf = f["brightfield"][z].astype(np.float32)
    ext = _extent(bf.shape, px[1:])
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    im = axes[0].imshow(bf, cmap="gray", extent=ext)
    colorbar(fig, im, axes[0], label="brightfield (counts)")
    for lab, colour, name in ((cells, "cyan", "true cell walls"), (vor, "magenta", "Voronoi walls of the nuclei")):
        axes[0].contour(realism.walls(lab).astype(float), levels=[0.5], colors=colour, linewidths=1.0, extent=ext,
                        origin="upper")
        axes[0].plot([], [], color=colour, label=name)
    axes[0].contour((nuclei[z] > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.8, linestyles="--",
                    extent=ext, origin="upper")
    axes[0].plot([], [], color="yellow", ls="--", label="nuclei")
    axes[0].legend(loc="lower right", fontsize=8, framealpha=0.8)
    axes[0].set_title("(A) brightfield, walls and nuclei")
    im = axes[1].imshow(f["refractive_index"][z] + n_medium, cmap="magma", extent=ext)
    colorbar(fig, im, axes[1], label="refractive index")
    axes[1].set_title("(B) refractive index")
    for ax in axes:
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        scale_bar(ax, 1.0, int(ext[1]), color="white")
    fig.suptitle(f"{title}, slice z = {z * px[0]:.1f} µm")
    return fig


def predictability_bars(table: pd.DataFrame):
    """PCC of the geometry-only predictor per channel: from cells and nuclei, and from the nuclei alone."""
    fig, ax = plt.subplots(figsize=(8, 3.6), layout="constrained")
    x = np.arange(len(TARGETS))
    for k, (source, colour) in enumerate((("cells and nuclei", "tab:blue"), ("nuclei only", "tab:orange"))):
        t = table[table["source"] == source].set_index("channel").reindex(list(TARGETS))
        ax.bar(x + (k - 0.5) * 0.38, t["pcc"], 0.38, color=colour, label=f"from {source}")
    ax.set_xticks(x, [TARGET_LABELS[c] for c in TARGETS], rotation=20, ha="right")
    ax.set_ylabel("PCC with the clean truth")
    ax.set_ylim(min(0.0, float(table["pcc"].min()) - 0.05), 1)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.legend(fontsize=8)
    ax.set_title(f"Each channel predicted from the true instances alone ({int(table['n'].iloc[0])} scored FOVs)")
    return fig


def learnability_scatter(table: pd.DataFrame, summary: pd.DataFrame):
    """The model's per-channel PCC against the thesis' Table 4.1, with the identity line and the
    band within which a channel counts as matching."""
    s = summary.iloc[0]
    fig, ax = plt.subplots(figsize=(5.2, 5), layout="constrained")
    lim = (min(0.0, float(table["pcc"].min()) - 0.05), 1.0)
    ax.fill_between(lim, np.array(lim) - learnability.WITHIN, np.array(lim) + learnability.WITHIN, color="0.9",
                    label=f"within {learnability.WITHIN}")
    ax.plot(lim, lim, color="0.5", lw=0.8)
    ax.scatter(table["thesis_pcc"], table["pcc"], color="tab:blue", zorder=3)
    for r in table.itertuples():
        ax.annotate(f"{r.label} (n={r.n})", (r.thesis_pcc, r.pcc), textcoords="offset points", xytext=(5, 3),
                    fontsize=8)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("thesis U-Net PCC (Table 4.1, measured Allen data)")
    ax.set_ylabel(f"{s['model']} PCC here (test FOVs, measured targets)")
    interval = f" [{s['rho_lo']:.2f}, {s['rho_hi']:.2f}]" if np.isfinite(s["rho_lo"]) else " (no interval)"
    ax.set_title(f"Spearman's rho = {s['rho']:.2f}{interval}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def brightfield_shares(table: pd.DataFrame):
    """Each compartment's share of the brightfield's fine-scale variance: mean over FOVs, with
    the range of the FOVs as a line."""
    t = table.sort_values("mean", ascending=False)
    fig, ax = plt.subplots(figsize=(8, 3.4), layout="constrained")
    x = np.arange(len(t))
    ax.bar(x, t["mean"], color="tab:gray")
    ax.vlines(x, t["min"], t["max"], color="black", lw=1)
    ax.set_xticks(x, t["compartment"], rotation=30)
    ax.set_ylabel("share of the fine-scale variance")
    ax.set_ylim(0, max(1e-3, float(t["max"].max())) * 1.1)
    ax.set_title("What the brightfield carries of each compartment (bars: mean over FOVs; lines: their range)")
    return fig


def channel_curves(curves: pd.DataFrame, budget: pd.DataFrame):
    """The model's PCC against the clean truth per channel at each snapshot (log-spaced steps), with
    its interval over the test FOVs; the half-way and last snapshots, between which
    :func:`vstain.evaluate.learnability.channel_budget` decides, are marked."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for c in TARGETS:
        g = curves[curves["channel"] == c].sort_values("step")
        line, = ax.plot(g["step"], g["mean"], marker="o", ms=3, label=TARGET_LABELS[c])
        ax.fill_between(g["step"], g["low"], g["high"], color=line.get_color(), alpha=0.15, lw=0)
    for step in (budget["mid_step"].iloc[0], budget["last_step"].iloc[0]):
        ax.axvline(step, color="0.6", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    steps = sorted(curves["step"].unique())
    ax.set_xticks(steps, [str(int(s)) for s in steps])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training step (log scale; dashed: half-way and last)")
    ax.set_ylabel("PCC against the clean truth")
    ax.legend(fontsize=8, ncol=2)
    return fig

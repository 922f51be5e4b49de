"""Figures of the U-Net ablation (notebook 03b): each variant's effect on each channel, as the
paired difference to the baseline with its interval (:func:`vstain.studies.ablation.compare_to_baseline`).
Returns a matplotlib Figure and never saves or shows it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vstain.channels import TARGET_LABELS

from .stats import COLOR

NEED = ["variant", "channel", "metric", "n", "diff", "ci_low", "ci_high", "better"]


def effect_forest(comparisons: pd.DataFrame, metrics=("pcc", "ssim"), labels: dict[str, str] | None = None,
                  panel_size: tuple[float, float] = (2.3, 0.34)) -> plt.Figure:
    """Forest plot of every variant's paired difference to the baseline: one panel per channel
    (columns) and metric (rows), the variants down the y axis, the mean difference over FOVs with
    its interval on the x axis (right: the variant scores higher than the baseline). A filled
    marker is a difference that calls a winner (interval excludes 0 with enough FOVs); the dashed
    line marks no difference. Panels of one metric share their x range, so effects compare across
    channels.

    Args:
        comparisons: :func:`vstain.studies.ablation.compare_to_baseline`'s table (columns ``variant``,
            ``channel``, ``metric``, ``n``, ``diff``, ``ci_low``, ``ci_high``, ``better``).
        metrics: the metrics drawn, one row of panels each (higher is better for both defaults).
        labels: display names of the metrics (default: the keys).
        panel_size: inches of a panel's width and of one variant row's height.
    """
    missing = [c for c in NEED if c not in comparisons.columns]
    if missing or comparisons.empty:
        raise ValueError(f"effect_forest needs a non-empty compare_to_baseline() table; missing column(s) {missing}")
    absent = [m for m in metrics if m not in set(comparisons["metric"])]
    if absent:
        raise ValueError(f"metric(s) {absent} are not in the table (it has {sorted(set(comparisons['metric']))})")
    labels = labels or {}
    channels = list(dict.fromkeys(comparisons["channel"]))
    variants = list(dict.fromkeys(comparisons["variant"]))
    fig, axes = plt.subplots(len(metrics), len(channels), squeeze=False, sharey=True,
                             figsize=(panel_size[0] * len(channels) + 1.4,
                                      (panel_size[1] * len(variants) + 1.0) * len(metrics) + 0.6))
    for metric, axrow in zip(metrics, axes):
        cells = comparisons[comparisons["metric"] == metric]
        bounds = np.abs(cells[["ci_low", "ci_high", "diff"]].to_numpy(float))
        reach = float(np.nanmax(bounds)) * 1.1 if np.isfinite(bounds).any() else 1.0
        for ch, ax in zip(channels, axrow):
            for _, r in cells[cells["channel"] == ch].iterrows():
                y = len(variants) - 1 - variants.index(r["variant"])
                x, lo, hi = r["diff"], r["ci_low"], r["ci_high"]
                xerr = [[x - lo], [hi - x]] if np.isfinite(lo) and np.isfinite(hi) else None
                ax.errorbar(x, y, xerr=xerr, fmt="o", color=COLOR, capsize=3, mec=COLOR,
                            mfc=COLOR if r["better"] != "none" else "white")
            ax.axvline(0, color="0.4", ls="--", lw=1)
            n = cells.loc[cells["channel"] == ch, "n"]
            ax.set_title(f"{TARGET_LABELS.get(ch, ch)}\n(n = {int(n.min()) if len(n) else 0})", fontsize=9)
            ax.set_xlim(-reach, reach)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", color="0.9")
        axrow[0].set_yticks(range(len(variants)))
        axrow[0].set_yticklabels(variants[::-1])
        axrow[0].set_ylim(-0.6, len(variants) - 0.4)
        axrow[len(channels) // 2].set_xlabel(f"{labels.get(metric, metric)}: variant − baseline (right: variant higher)")
    handles = [Line2D([], [], marker="o", ls="", color=COLOR, label="interval excludes 0 (enough FOVs)"),
               Line2D([], [], marker="o", ls="", color=COLOR, mfc="white", label="no difference called")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig

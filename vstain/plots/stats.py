"""Figures of paired model comparisons (thesis 4.2): a forest plot of the per-FOV paired
differences that :func:`vstain.evaluate.stats.compare` computes, and the same beside the
seed-to-seed difference (:func:`vstain.evaluate.seeds.seed_comparison`). Returns a matplotlib Figure and
never saves or shows it."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

COLOR = "tab:blue"


def _gain(row: pd.Series) -> tuple[float, float, float]:
    """The difference and its interval turned so that positive favours ``model_b``."""
    if row["higher_is_better"]:
        return row["diff"], row["ci_low"], row["ci_high"]
    return -row["diff"], -row["ci_high"], -row["ci_low"]


def forest_plot(comparisons: pd.DataFrame | list[pd.DataFrame], labels: dict[str, str] | None = None,
                panel_size: tuple[float, float] = (4.2, 0.32)) -> plt.Figure:
    """Mean paired difference with its interval per channel, one panel per model pair and metric.

    Every panel is turned so that right means ``model_b`` better: the axis shows ``b - a`` for a
    higher-is-better metric and ``a - b`` for a lower-is-better one, and says which. Metrics keep
    their own panels (and units), since an SSIM and an MSE difference share no scale. A filled
    marker is a cell where a winner is called (interval excludes 0 with enough FOVs, the
    table's ``better``); an open one is not. The dashed line marks no difference.

    Args:
        comparisons: :func:`vstain.evaluate.stats.compare` tables (one per model pair, or
            concatenated); columns ``channel``, ``metric``, ``model_a``, ``model_b``, ``n``,
            ``diff``, ``ci_low``, ``ci_high``, ``higher_is_better``, ``better``.
        labels: display names of metrics (default: the metric keys).
        panel_size: inches of a panel's width and of one channel row's height.
    """
    table = pd.concat(comparisons, ignore_index=True) if isinstance(comparisons, list) else comparisons
    need = ["channel", "metric", "model_a", "model_b", "n", "diff", "ci_low", "ci_high", "higher_is_better", "better"]
    missing = [c for c in need if c not in table.columns]
    if missing or table.empty:
        raise ValueError(f"forest_plot needs a non-empty compare() table; missing column(s) {missing}")
    labels = labels or {}
    pairs = list(dict.fromkeys(zip(table["model_a"], table["model_b"])))
    metrics = list(dict.fromkeys(table["metric"]))
    rows = table["channel"].nunique()
    fig, axes = plt.subplots(len(pairs), len(metrics), squeeze=False,
                             figsize=(panel_size[0] * len(metrics) + 1.2, panel_size[1] * rows * len(pairs) + 1.4 * len(pairs)))
    channels = list(dict.fromkeys(table["channel"]))
    for (a, b), axrow in zip(pairs, axes):
        for metric, ax in zip(metrics, axrow):
            cells = table[(table["model_a"] == a) & (table["model_b"] == b) & (table["metric"] == metric)]
            for _, r in cells.iterrows():
                y = len(channels) - 1 - channels.index(r["channel"])
                _point(ax, r, y, COLOR, "o", COLOR if r["better"] != "none" else "white")
            ax.axvline(0, color="0.4", ls="--", lw=1)
            name = labels.get(metric, metric)
            hib = bool(cells["higher_is_better"].iloc[0]) if len(cells) else True
            order = f"{b} − {a}\n(right: {b} better)" if hib else f"{a} − {b}\n(lower is better; right: {b} better)"
            ax.set(title=f"{b} vs {a}: {name}", xlabel=f"paired difference in {name}: {order}")
            ns = cells.set_index("channel")["n"]
            ax.set_yticks(range(len(channels)))
            ax.set_yticklabels([f"{c} (n = {int(ns[c])})" if c in ns else c for c in channels][::-1])
            ax.set_ylim(-0.6, len(channels) - 0.4)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.grid(axis="x", color="0.9")
    handles = [Line2D([], [], marker="o", ls="", color=COLOR, label="winner called (interval excludes 0, enough FOVs)"),
               Line2D([], [], marker="o", ls="", color=COLOR, mfc="white", label="no winner called")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def seed_forest_plot(table: pd.DataFrame, labels: dict[str, str] | None = None,
                     panel_size: tuple[float, float] = (4.2, 0.42)) -> plt.Figure:
    """Model differences with the seed-to-seed difference beside them, one panel per model pair and
    metric, turned as :func:`forest_plot` (right: the second model better; for the seed row, the
    second seed).

    Per channel the model difference is drawn on the row and the seed difference (grey diamond)
    just below it; a grey band spans ± the seed interval's reach, the sizes a change of seed alone
    is compatible with. A filled marker is a finding (winner called and beyond the seed spread), a
    marker with an orange edge a winner within the seed spread, an open one no winner.

    Args:
        table: :func:`vstain.evaluate.seeds.seed_comparison`'s table (``kind``, ``seed_reach``,
            ``finding`` and :func:`vstain.evaluate.stats.compare`'s columns).
        labels: display names of metrics (default: the metric keys).
        panel_size: inches of a panel's width and of one channel row's height.
    """
    need = ["kind", "channel", "metric", "model_a", "model_b", "n", "diff", "ci_low", "ci_high", "higher_is_better",
            "better", "seed_reach", "finding"]
    missing = [c for c in need if c not in table.columns]
    if missing or not (table["kind"] == "seed").any() or not (table["kind"] == "model").any():
        raise ValueError(f"seed_forest_plot needs seed_comparison()'s table with seed and model rows; missing {missing}")
    labels = labels or {}
    seed_rows, model_rows = table[table["kind"] == "seed"], table[table["kind"] == "model"]
    seed_name = seed_rows["model_b"].iloc[0]
    pairs = list(dict.fromkeys(zip(model_rows["model_a"], model_rows["model_b"])))
    metrics = list(dict.fromkeys(model_rows["metric"]))
    channels = list(dict.fromkeys(table["channel"]))
    fig, axes = plt.subplots(len(pairs), len(metrics), squeeze=False,
                             figsize=(panel_size[0] * len(metrics) + 1.2,
                                      panel_size[1] * len(channels) * len(pairs) + 1.4 * len(pairs)))
    seed_at = seed_rows.set_index(["channel", "metric"])
    for (a, b), axrow in zip(pairs, axes):
        for metric, ax in zip(metrics, axrow):
            cells = model_rows[(model_rows["model_a"] == a) & (model_rows["model_b"] == b) & (model_rows["metric"] == metric)]
            for _, r in cells.iterrows():
                y = len(channels) - 1 - channels.index(r["channel"])
                if (r["channel"], metric) in seed_at.index:
                    s = seed_at.loc[(r["channel"], metric)]
                    if np.isfinite(s["seed_reach"]):
                        ax.barh(y - 0.1, 2 * s["seed_reach"], left=-s["seed_reach"], height=0.7, color="0.9", zorder=0)
                    _point(ax, s, y - 0.28, "0.45", "D", "0.45")
                face = COLOR if (r["better"] != "none" and r["finding"]) else "white"
                _point(ax, r, y, COLOR, "o", face, edge="tab:orange" if r["better"] != "none" and not r["finding"] else COLOR)
            ax.axvline(0, color="0.4", ls="--", lw=1)
            name = labels.get(metric, metric)
            hib = bool(cells["higher_is_better"].iloc[0]) if len(cells) else True
            ax.set(title=textwrap.fill(f"{b} vs {a}: {name}", 40),
                   xlabel=f"paired difference in {name}\n" + textwrap.fill(
                       f"(right: {b} or {seed_name} better" + (")" if hib else "; lower is better)"), 44))
            ax.set_yticks(range(len(channels)))
            ax.set_yticklabels(channels[::-1])
            ax.set_ylim(-0.7, len(channels) - 0.4)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.grid(axis="x", color="0.9")
    handles = [Line2D([], [], marker="o", ls="", color=COLOR, label="finding (winner beyond the seed spread)"),
               Line2D([], [], marker="o", ls="", color=COLOR, mfc="white", mec="tab:orange", label="winner within the seed spread"),
               Line2D([], [], marker="o", ls="", color=COLOR, mfc="white", label="no winner"),
               Line2D([], [], marker="D", ls="", color="0.45", label=f"{seed_name} vs {seed_rows['model_a'].iloc[0]} (seed spread; band: its reach)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _point(ax, row: pd.Series, y: float, color, marker: str, face, edge=None) -> None:
    """One difference with its interval at height ``y``, turned as :func:`_gain`."""
    x, lo, hi = _gain(row)
    xerr = [[x - lo], [hi - x]] if np.isfinite(lo) and np.isfinite(hi) else None
    ax.errorbar(x, y, xerr=xerr, fmt=marker, color=color, capsize=3, mec=edge or color, mfc=face)

"""Figures of the adversarial weight sweep (notebook 07c): the perception-distortion plane of Blau &
Michaeli (CVPR 2018), one point per weight from :func:`vstain.studies.sweep.sweep_summary`. Returns a
matplotlib Figure and never saves or shows it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

CMAP = "viridis"


def perception_distortion(summary: pd.DataFrame, models: list[str], distortion_reference: str | None = None,
                          panel_size: tuple[float, float] = (4.3, 3.2), join: bool = True,
                          title: str = "Perception-distortion plane of the adversarial weight sweep") -> plt.Figure:
    """Perception against distortion, one panel per (distortion, perception) pair: x is ``1 - PCC``
    or ``1 - SSIM`` (right: more distortion), y F1clf, the perceptual distance or the coherent
    sharpness, each arrow pointing to more realism. One point per model with its interval in both
    directions, joined in weight order and labelled.

    Args:
        summary: :func:`vstain.studies.sweep.sweep_summary`'s table.
        models: the models in weight order (the control first); their labels are drawn.
        distortion_reference: ``"truth"`` or ``"target"``; default the truth when the table has it.
        panel_size: inches per panel.
        join: join the points in model order (a sweep); False for unordered models.
        title: the figure's title (the interval level is added).
    """
    need = ["metric", "reference", "model", "estimate", "ci_low", "ci_high", "higher_is_better", "label", "role"]
    missing = [c for c in need if c not in summary.columns]
    if missing or summary.empty:
        raise ValueError(f"perception_distortion needs a non-empty sweep_summary() table; missing {missing}")
    ref = distortion_reference or ("truth" if (summary["reference"] == "truth").any() else "target")
    roles = summary.drop_duplicates("metric").set_index("metric")
    xs = list(dict.fromkeys(summary.loc[(summary["role"] == "distortion") & (summary["reference"] == ref), "metric"]))
    ys = list(dict.fromkeys(summary.loc[summary["role"] == "perception", "metric"]))
    if not xs or not ys:
        raise ValueError(f"the table lacks a distortion measure against the {ref} or a perception measure")
    colors = plt.get_cmap(CMAP)(np.linspace(0, 0.85, len(models)))
    fig, axes = plt.subplots(len(xs), len(ys), squeeze=False,
                             figsize=(panel_size[0] * len(ys), panel_size[1] * len(xs)))
    for xm, axrow in zip(xs, axes):
        xt = summary[(summary["metric"] == xm) & (summary["reference"] == ref)].set_index("model")
        for ym, ax in zip(ys, axrow):
            yt = summary[summary["metric"] == ym].set_index("model")
            shown = [m for m in models if m in xt.index and m in yt.index]
            px = [1 - xt.loc[m, "estimate"] for m in shown]
            py = [yt.loc[m, "estimate"] for m in shown]
            if join:
                ax.plot(px, py, color="0.7", lw=1, zorder=0)
            for i, (m, x, y) in enumerate(zip(shown, px, py)):
                c = colors[models.index(m)]
                xerr = [[x - (1 - xt.loc[m, "ci_high"])], [(1 - xt.loc[m, "ci_low"]) - x]]
                yerr = [[y - yt.loc[m, "ci_low"]], [yt.loc[m, "ci_high"] - y]]
                ax.errorbar(x, y, xerr=_finite(xerr), yerr=_finite(yerr), fmt="o", color=c, capsize=2)
                below = not join and i % 2  # unordered points: every other label below its point
                ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, -10 if below else 4), fontsize=7, color=c)
            hib, label = roles.loc[ym, "higher_is_better"], roles.loc[ym, "label"]
            ax.set(xlabel=f"1 − {roles.loc[xm, 'label']} vs {ref} (distortion, right: worse)",
                   ylabel=f"{label} ({'up' if hib else 'down'}: more realistic)")
            ax.grid(color="0.92")
    fig.suptitle(f"{title} (intervals: 95% over test FOVs)", fontsize=10)
    fig.tight_layout()
    return fig


def _finite(err):
    """An errorbar extent, or None where the interval is missing."""
    return err if np.isfinite(np.asarray(err, float)).all() else None

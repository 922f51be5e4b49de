"""The test-set learning curves: every model's PCC and SSIM against the clean truth, F1clf and KID
at each kept snapshot, against its training steps and against training wall time."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

LABELS = {"pcc": "PCC vs clean truth", "ssim": "SSIM vs clean truth", "f1clf": "F1clf (macro)",
          "kid": "KID (lower: more realistic)"}
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def learning_curves(table: pd.DataFrame, metrics=("pcc", "ssim", "f1clf", "kid"), channel: str = "all",
                    title: str = "Test-set learning curves"):
    """Two rows of panels, one panel per metric: against generator steps since random weights (log
    axis; a WGAN-GP counts generator iterations, a fine-tune adds the steps of the model it started
    from) and against training wall time counted the same way. Each point is the mean over the test
    FOVs with its 95% interval (band)."""
    sel = table[table["channel"] == channel]
    models = list(dict.fromkeys(sel["model"]))
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 6.4), squeeze=False, constrained_layout=True)
    for j, metric in enumerate(metrics):
        for i, x in enumerate(("step", "wall_s")):
            ax = axes[i, j]
            for model, color in zip(models, COLORS):
                d = sel[(sel["model"] == model) & (sel["metric"] == metric)].sort_values(x)
                if d.empty:
                    continue
                ax.plot(d[x], d["mean"], "o-", color=color, ms=3, lw=1.5, label=model)
                ax.fill_between(d[x], d["low"], d["high"], color=color, alpha=0.15, lw=0)
            ax.set_xscale("log")
            ax.set_xlabel("generator steps since random weights" if x == "step"
                          else "training wall time since random weights (s)", fontsize=8)
            ax.set_ylabel(LABELS.get(metric, metric), fontsize=8)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{title} ({channel} channels; bands: 95% intervals over the test FOVs)")
    return fig

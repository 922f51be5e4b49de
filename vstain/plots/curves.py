"""The test-set learning curves: every model's PCC and SSIM against the clean truth, F1clf and KID
at each kept snapshot, against its training steps and against training wall time."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import NullFormatter

LABELS = {"pcc": "PCC vs clean truth", "ssim": "SSIM vs clean truth", "f1clf": "F1clf (macro)",
          "kid": "KID (lower: more realistic)"}
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
STYLES = ("o-", "s--", "^-.", "D:", "v-")  # marker and line per model: a model hidden under another stays visible


def fine_tune_starts(snapshots: pd.DataFrame | None) -> dict[str, int]:
    """Model -> the generator step it started from, for the models of ``snapshots`` (the
    ``snapshots`` table of :func:`vstain.studies.curves.run_curves`) that began from another model."""
    if snapshots is None or "start_step" not in snapshots:
        return {}
    starts = snapshots.groupby("model", sort=False)["start_step"].max()
    return {m: int(s) for m, s in starts.items() if s > 0}


def learning_curves(table: pd.DataFrame, snapshots: pd.DataFrame | None = None, metrics=("pcc", "ssim", "f1clf", "kid"),
                    channel: str = "all", title: str = "Test-set learning curves"):
    """Rows of panels, one panel per metric: against generator steps since random weights (log
    axis; a WGAN-GP counts generator iterations, a fine-tune adds the steps of the model it started
    from) and against training wall time counted the same way. When ``snapshots`` names fine-tunes
    (:func:`fine_tune_starts`), a third row shows them alone against the steps after their start on
    a linear axis, where the log axis squeezes them together. Each point is the mean over the test
    FOVs with its 95% interval (band)."""
    sel = table[table["channel"] == channel]
    models = list(dict.fromkeys(sel["model"]))
    colors, styles = dict(zip(models, COLORS)), dict(zip(models, STYLES))
    starts = {m: s for m, s in fine_tune_starts(snapshots).items() if m in colors}
    rows = ("step", "wall_s") + (("after",) if starts else ())
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(rows)), squeeze=False,
                             constrained_layout=True)
    for j, metric in enumerate(metrics):
        for i, x in enumerate(rows):
            ax = axes[i, j]
            drawn = False
            for model in (starts if x == "after" else models):
                d = sel[(sel["model"] == model) & (sel["metric"] == metric)].sort_values("step")
                if d.empty:
                    continue
                xs = d["step"] - starts[model] if x == "after" else d[x]
                ax.plot(xs, d["mean"], styles[model], color=colors[model], ms=4, lw=1.5, mfc="none", label=model)
                ax.fill_between(xs, d["low"], d["high"], color=colors[model], alpha=0.15, lw=0)
                drawn |= bool(d["mean"].notna().any())
            if not drawn:  # e.g. a KID from too few patches: say so rather than draw an empty log axis
                ax.text(0.5, 0.5, "no value at any snapshot", ha="center", va="center", transform=ax.transAxes,
                        fontsize=8, color="0.4")
            elif x != "after":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd each other
            ax.set_xlabel({"step": "generator steps since random weights",
                           "wall_s": "training wall time since random weights (s)",
                           "after": "fine-tunes: generator steps after their start (linear)"}[x], fontsize=8)
            ax.set_ylabel(LABELS.get(metric, metric), fontsize=8)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    if starts:
        axes[2, 0].legend(fontsize=7)
    fig.suptitle(f"{title} ({channel} channels; bands: 95% intervals over the test FOVs)")
    return fig

"""Figures of notebook 08_downstream: the true instances beside the instances segmented from the
clean truth, the measured target and each model, on one XY section; and the segmentation scores of
every source with their intervals. Every function returns a matplotlib Figure and never saves or
shows it."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from skimage.segmentation import find_boundaries

from vstain.channels import TARGETS
from vstain.evaluate.downstream_stage import METRIC_LABELS, OBJECTS

from .views import channel_panel, colorbar, display_range, scale_bar, show_section

# cyan: true outline, magenta: segmented; both stand out on the grey sections (yellow vanished on magma)
TRUE_COLOUR, SEGMENTED_COLOUR = (0.2, 0.9, 1.0), (1.0, 0.2, 0.85)


def _outline(ax, labels: np.ndarray, colour) -> None:
    """The instance boundaries of a 2D label section drawn over ``ax``'s image."""
    edge = find_boundaries(labels, mode="inner")
    rgba = np.zeros((*labels.shape, 4))
    rgba[edge] = (*colour, 1.0)
    ax.imshow(rgba, aspect=ax.get_aspect(), interpolation="nearest")


def segmentation_outlines(volumes: Mapping[str, np.ndarray], true: Mapping[str, np.ndarray],
                          segmented: Mapping[str, Mapping[str, np.ndarray]], voxel_size_zyx: Sequence[float],
                          title: str, z: int | None = None) -> plt.Figure:
    """One XY section per object (rows: nuclei on DNA, cells on membrane) and source (columns): the
    source's channel in grey, one display range per row (the clean truth's), the true instances'
    outlines in cyan and the instances segmented from that source in magenta.

    Args:
        volumes: source -> ``[6, Z, Y, X]`` (the sources of :func:`vstain.evaluate.downstream_stage.fov_volumes`).
        true: ``{"nuclei", "cells"}`` true labels ``[Z, Y, X]``.
        segmented: source -> ``{"nuclei", "cells"}`` segmented labels (a source may lack cells).
        voxel_size_zyx: voxel size in µm.
        z: the section (default: the slice with the most true nucleus voxels).
    """
    sources = [s for s in volumes if s in segmented]
    if z is None:
        z = int(np.argmax((true["nuclei"] > 0).sum(axis=(1, 2))))
    fig, axes = plt.subplots(len(OBJECTS), len(sources), figsize=(2.4 * len(sources), 2.5 * len(OBJECTS)),
                             squeeze=False, layout="constrained")
    for i, (obj, channel) in enumerate(OBJECTS.items()):
        c = TARGETS.index(channel)
        ref = volumes[sources[0]][c]
        vrange = display_range(ref if np.isfinite(ref).any() else None, None, [volumes[s][c] for s in sources])
        im = None
        for j, source in enumerate(sources):
            ax = axes[i, j]
            sec = volumes[source][c][z]
            if np.isnan(sec).all():
                channel_panel(ax, sec, voxel_size_zyx, "xy", vrange)
            else:
                im = show_section(ax, sec, voxel_size_zyx, "xy", cmap="gray", vmin=vrange[0], vmax=vrange[1])
            _outline(ax, true[obj][z], TRUE_COLOUR)
            if obj in segmented[source]:
                _outline(ax, segmented[source][obj][z], SEGMENTED_COLOUR)
            if i == 0:
                ax.set_title(source, fontsize=8)
        axes[i, 0].set_ylabel(f"{obj} ({channel})", fontsize=8)
        scale_bar(axes[i, 0], voxel_size_zyx[2], true[obj].shape[2])
        if im is not None:
            colorbar(fig, im, axes[i].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle(f"{title}, z = {z * voxel_size_zyx[0]:.1f} µm: true instances in cyan, segmented from the panel's image in magenta "
                 "(drawn on top: where both agree only magenta shows)", fontsize=9)
    return fig


def score_intervals(summary: pd.DataFrame, metrics: Sequence[str] = ("f1", "mean_iou"),
                    title: str = "Segmentation against the true instances") -> plt.Figure:
    """Each source's mean over FOVs with its interval, one panel per object and metric
    (:func:`vstain.evaluate.downstream_stage.summarise`'s table)."""
    objects = [o for o in OBJECTS if (summary["object"] == o).any()]
    fig, axes = plt.subplots(len(objects), len(metrics), figsize=(4 * len(metrics), 0.5 + 1.6 * len(objects)),
                             squeeze=False)
    for i, obj in enumerate(objects):
        for j, metric in enumerate(metrics):
            ax, s = axes[i, j], summary[(summary["object"] == obj) & (summary["metric"] == metric)]
            y = np.arange(len(s))[::-1]
            err = np.vstack([s["estimate"] - s["ci_low"], s["ci_high"] - s["estimate"]])
            ax.errorbar(s["estimate"], y, xerr=np.nan_to_num(err), fmt="o", color="0.2", capsize=3)
            ax.set_yticks(y, [f"{src} (n = {n})" for src, n in zip(s["source"], s["n"])], fontsize=7)
            ax.set(xlabel=METRIC_LABELS[metric], title=f"{obj.capitalize()}: {METRIC_LABELS[metric]}")
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

"""Drawing rules shared by the prediction figures of notebooks 04, 05, 05b and 07: one display
range per channel and FOV for the truth, the target and every model; sections drawn at the true
voxel aspect; a colour bar per channel in z-score units and a µm scale bar.

The volumes drawn are ``[C, Z, Y, X]`` float arrays z-scored per channel and FOV
(:mod:`vstain.preprocess.processed`), with NaN where a FOV carries no label. The voxel size of a run comes from
its ``01_data/fovs.csv`` (:func:`vstain.data.stage.voxel_size`).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from vstain.data.stage import voxel_size

PERCENTILES = (1.0, 99.8)  # robust display range: clips hot pixels and the empty background's tail
MAX_SAMPLES = 2_000_000  # voxels a range is computed from (a regular subsample of larger volumes)
COLORBAR_LABEL = "z-scored intensity"
SCALE_BAR_GID = "scale bar"
RANGE_RULE = (f"Colours: one range per channel and FOV for all its panels, the {PERCENTILES[0]:g}-"
              f"{PERCENTILES[1]:g} percentiles of the clean truth (else of the labelled target, else of "
              "the predictions)")


def _finite(a: np.ndarray) -> np.ndarray:
    """The finite values of ``a``, regularly subsampled to at most :data:`MAX_SAMPLES`."""
    v = np.asarray(a, dtype=np.float32).ravel()
    v = v[np.isfinite(v)]
    return v[:: v.size // MAX_SAMPLES + 1]


def robust_range(a: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """``(vmin, vmax)``: the ``percentiles`` of the finite values of ``a`` (``(0, 1)`` if none;
    ``vmax = vmin + 1`` where they coincide, so a flat image still has a range)."""
    v = _finite(a)
    if not v.size:
        return 0.0, 1.0
    lo, hi = np.percentile(v, percentiles)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def display_range(truth: np.ndarray | None = None, target: np.ndarray | None = None,
                  preds: Sequence[np.ndarray] = (), percentiles: tuple[float, float] = PERCENTILES
                  ) -> tuple[float, float]:
    """One channel's display range, shared by its truth, target and every model's prediction.

    The reference is, in this order: the clean truth if given, else the measured target if the FOV
    carries the label, else the union of the predictions. Its ``percentiles`` (default 1st-99.8th,
    over the whole volume, so an XY and an XZ section of a FOV agree) give ``(vmin, vmax)``.
    Referring to data rather than to each panel keeps a faint prediction faint and an invented
    structure no brighter than the reference makes it.

    Args:
        truth, target: ``[Z, Y, X]`` (or any shape) of one channel, or None; NaN means no label.
        preds: the predictions of that channel.
    """
    refs = [r for r in (truth, target) if r is not None and np.isfinite(r).any()]
    ref = refs[0] if refs else np.concatenate([_finite(p) for p in preds]) if len(preds) else np.empty(0)
    if not np.isfinite(ref).any():
        raise ValueError("display_range: no finite values in the truth, the target or the predictions")
    return robust_range(ref, percentiles)


def channel_ranges(truth: np.ndarray | None, target: np.ndarray | None, preds: Sequence[np.ndarray]
                   ) -> list[tuple[float, float]]:
    """:func:`display_range` of every channel of ``[C, Z, Y, X]`` volumes (truth and target may be None)."""
    n = len(next(v for v in (truth, target, *preds) if v is not None))
    return [display_range(None if truth is None else truth[c], None if target is None else target[c],
                          [p[c] for p in preds]) for c in range(n)]


def section(vol: np.ndarray, view: str, z: int, y: int) -> np.ndarray:
    """``vol`` ``[Z, Y, X]`` -> the XY plane at ``z`` (``view="xy"``) or the XZ plane at row ``y`` (``"xz"``)."""
    if view not in ("xy", "xz"):
        raise ValueError(f"view must be 'xy' or 'xz', got {view!r}")
    return vol[z] if view == "xy" else vol[:, y, :]


def aspect(voxel_size_zyx: Sequence[float], view: str) -> float:
    """Height of a displayed pixel over its width: ``voxel_y / voxel_x`` in XY, ``voxel_z / voxel_x`` in XZ."""
    if len(voxel_size_zyx) != 3 or min(voxel_size_zyx) <= 0:
        raise ValueError(f"voxel_size_zyx must be three positive µm values (z, y, x), got {voxel_size_zyx}")
    vz, vy, vx = (float(v) for v in voxel_size_zyx)
    return (vy if view == "xy" else vz) / vx


def show_section(ax, img: np.ndarray, voxel_size_zyx: Sequence[float], view: str, **imshow_kw):
    """``ax.imshow`` of a 2D section at the true voxel aspect, without ticks; returns the AxesImage."""
    im = ax.imshow(img, aspect=aspect(voxel_size_zyx, view), interpolation="nearest", **imshow_kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def channel_panel(ax, sec: np.ndarray, voxel_size_zyx: Sequence[float], view: str, vrange: tuple[float, float]):
    """One channel's section in ``vrange`` (magma), or a grey "no label" panel where the section is
    all NaN; returns the AxesImage of a drawn section, None for a "no label" panel."""
    if np.isnan(sec).all():
        show_section(ax, np.zeros_like(sec), voxel_size_zyx, view, cmap="gray", vmin=0, vmax=1)
        ax.text(0.5, 0.5, "no label", color="0.6", ha="center", va="center", transform=ax.transAxes)
        return None
    return show_section(ax, sec, voxel_size_zyx, view, cmap="magma", vmin=vrange[0], vmax=vrange[1])


def brightfield_panel(ax, sec: np.ndarray, voxel_size_zyx: Sequence[float], view: str):
    """The brightfield section in grey on its own robust range (it has no reference to share)."""
    lo, hi = robust_range(sec, PERCENTILES)
    return show_section(ax, sec, voxel_size_zyx, view, cmap="gray", vmin=lo, vmax=hi)


def colorbar(fig, im, axes, label: str = COLORBAR_LABEL, **kw):
    """A colour bar of ``im`` beside ``axes``, labelled (default: z-score units, :data:`COLORBAR_LABEL`)."""
    cb = fig.colorbar(im, ax=axes, **kw)
    cb.set_label(label, fontsize=7)
    cb.ax.tick_params(labelsize=6)
    return cb


def scale_length(width_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) of at most a fifth of ``width_um``."""
    if width_um <= 0:
        raise ValueError(f"scale_length: width must be positive, got {width_um}")
    target = width_um / 5
    k = np.floor(np.log10(target))
    return float(max(m * 10**k for m in (1, 2, 5) if m * 10**k <= target))


def scale_bar(ax, pixel_x_um: float, width_px: int, color: str = "white") -> AnchoredSizeBar:
    """A µm scale bar in the lower right of an image panel ``width_px`` pixels wide (gid
    :data:`SCALE_BAR_GID`); its length is :func:`scale_length` of the panel's width."""
    length = scale_length(width_px * pixel_x_um)
    bar = AnchoredSizeBar(ax.transData, length / pixel_x_um, f"{length:g} µm", "lower right", pad=0.2,
                          sep=2, frameon=True, color=color, size_vertical=max(width_px / 80, 0.5),
                          fontproperties={"size": 7})
    bar.patch.set(facecolor="black", edgecolor="none", alpha=0.5)  # readable on bright and dark images
    bar.set_gid(SCALE_BAR_GID)
    ax.add_artist(bar)
    return bar


def section_grid(bf: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], ranges: Sequence[tuple[float, float]],
                 view: str, z: int, y: int, voxel_size_zyx: Sequence[float], title: str, labels: Sequence[str]):
    """The grid of the prediction figures: the brightfield and one column per channel, one row per
    named volume (target, truth, each model), all at the section ``view`` (XY at ``z``, XZ at row
    ``y``) and the true voxel aspect. Every panel of a channel uses ``ranges[c]``; a colour bar under
    each channel column gives it in z-score units; the brightfield panel carries a µm scale bar.

    Args:
        bf: ``[1, Z, Y, X]``; rows: ``(name, [C, Z, Y, X])`` pairs, NaN channels drawn "no label".
        ranges: ``(vmin, vmax)`` per channel (:func:`channel_ranges`); labels: channel titles.
        voxel_size_zyx: µm; the XZ aspect is ``z / x``.
    """
    img = section(bf[0], view, z, y)
    asp = aspect(voxel_size_zyx, view)
    panel_h = max(0.6, 1.9 * img.shape[0] * asp / img.shape[1])
    ncol = 1 + len(labels)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, panel_h * len(rows) + 1.6),
                             squeeze=False, constrained_layout=True)
    brightfield_panel(axes[0, 0], img, voxel_size_zyx, view)
    axes[0, 0].set_title("brightfield", fontsize=9)
    scale_bar(axes[0, 0], voxel_size_zyx[2], img.shape[1])
    drawn: list[list] = [[] for _ in labels]  # the AxesImages of each channel column
    for r, (name, vol) in enumerate(rows):
        axes[r, 0].set_ylabel(name.replace(" ", "\n", 1), fontsize=8)
        if r > 0:
            axes[r, 0].set_xticks([]), axes[r, 0].set_yticks([])
            axes[r, 0].set_frame_on(False)
        for c in range(len(labels)):
            im = channel_panel(axes[r, c + 1], section(vol[c], view, z, y), voxel_size_zyx, view, ranges[c])
            drawn[c] += [im] if im is not None else []
    for c, label in enumerate(labels):
        axes[0, c + 1].set_title(label, fontsize=9)
        if drawn[c]:
            colorbar(fig, drawn[c][0], list(axes[:, c + 1]), location="bottom", shrink=0.9, aspect=12)
    where = (f"XY section at z = {z * voxel_size_zyx[0]:.1f} µm" if view == "xy"
             else f"XZ section at y = {y * voxel_size_zyx[1]:.1f} µm")
    fig.suptitle(f"{title} {where}\n{RANGE_RULE}".strip(), fontsize=9)
    return fig


def save_and_show(fig, path, dpi: int = 100) -> None:
    """Write ``fig`` to the PNG ``path`` and show that file in the notebook: one rendering where
    ``savefig`` and then ``plt.show()`` draw it twice (a 72-panel gallery takes seconds to draw)."""
    from IPython.display import Image, display

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))

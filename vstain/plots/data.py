"""Figures of notebook 01_data: a per-FOV gallery, intensity histograms and the label layout.

Every function takes arrays (``[C, Z, Y, X]``) or the ``fovs.csv`` table and returns a matplotlib
figure; nothing reads files here.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap

from vstain.channels import TARGET_LABELS, TARGETS, VOLUME_CHANNELS

from .views import robust_range

CHANNELS = VOLUME_CHANNELS
LABELS = {"brightfield": "Brightfield", **TARGET_LABELS}


def _blank(ax, text: str = "not carried\n(NaN)", extent=None) -> None:
    ax.set_facecolor("0.85")
    if extent is not None:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def default_sections(bf: np.ndarray, target: np.ndarray, focus_z: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(z, y)`` a gallery shows: the middle of the true in-focus range where known, else the
    slice where the DNA channel is brightest; then the row (among the middle half) through the most
    signal of the FOV's tagged structure (DNA where it carries none) in that slice."""
    dna = target[TARGETS.index("dna")]
    if focus_z is not None:
        z = (focus_z[0] + focus_z[1]) // 2
    elif np.isfinite(dna).any():
        z = int(np.nanargmax(np.nanmean(dna, axis=(1, 2))))
    else:
        z = bf.shape[1] // 2
    ny = bf.shape[2]
    tagged = [target[i] for i in range(2, len(TARGETS)) if np.isfinite(target[i]).any()]
    guide = tagged[0] if tagged else dna
    if not np.isfinite(guide).any():
        return z, ny // 2
    lo, hi = ny // 4, max(ny // 4 + 1, 3 * ny // 4)  # stay clear of the FOV's edges
    rows = np.nansum(guide[z, lo:hi] - np.nanmedian(guide[z]), axis=1)
    return z, lo + int(np.argmax(rows))


def fov_gallery(bf: np.ndarray, target: np.ndarray, pixel_size: Sequence[float], title: str,
                z: int | None = None, y: int | None = None, focus_z: tuple[int, int] | None = None):
    """One FOV, every channel: the XY slice at ``z`` over the XZ section at row ``y`` (defaults:
    :func:`default_sections`), brightfield first, then the six targets in TARGETS order.
    Channels the FOV does not carry (all NaN) are drawn as grey "not carried" panels. The XZ
    panels keep the physical aspect ratio; ``focus_z`` (``[lo, hi)``) is marked on them.

    Args:
        bf: ``[1, Z, Y, X]``; target: ``[6, Z, Y, X]`` with NaN; pixel_size: ``(z, y, x)`` µm.
    """
    vol = np.concatenate([bf, target])
    _, nz, ny, nx = vol.shape
    z0, y0 = default_sections(bf, target, focus_z)
    z, y = (z0 if z is None else z), (y0 if y is None else y)
    pz, py, px = pixel_size
    xz_h = nz * pz / (nx * px)
    xy_h = ny * py / (nx * px)
    fig, axes = plt.subplots(2, len(CHANNELS), figsize=(2.0 * len(CHANNELS), 2.0 * (xy_h + xz_h) + 1.6),
                             gridspec_kw={"height_ratios": [xy_h, xz_h]}, squeeze=False, layout="constrained")
    for c, name in enumerate(CHANNELS):
        top, bottom = axes[0, c], axes[1, c]
        top.set_title(LABELS[name], fontsize=9)
        ch = vol[c]
        extent_xy = (0, nx * px, ny * py, 0)
        extent_xz = (0, nx * px, nz * pz, 0)
        if np.isnan(ch).all():
            _blank(top, extent=extent_xy)
            _blank(bottom, "", extent=extent_xz)
            bottom.set_xlabel("x (µm)", fontsize=8)
            continue
        vmin, vmax = robust_range(ch)
        cmap = "gray" if name == "brightfield" else "magma"
        im = top.imshow(ch[z], cmap=cmap, vmin=vmin, vmax=vmax, extent=extent_xy, interpolation="nearest")
        top.axhline(y * py, color="c", lw=0.6, ls=":")
        bottom.imshow(ch[:, y, :], cmap=cmap, vmin=vmin, vmax=vmax, extent=extent_xz, aspect="equal",
                      interpolation="nearest")
        bottom.axhline((z + 0.5) * pz, color="c", lw=0.6, ls=":")
        if focus_z is not None:
            for edge in focus_z:
                bottom.axhline(edge * pz, color="lime", lw=0.8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=6)
        cb = fig.colorbar(im, ax=bottom, orientation="horizontal", fraction=0.12, pad=0.35, aspect=15)
        cb.set_label("counts", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel(f"XY at z = {z * pz:.1f} µm\ny (µm)", fontsize=8)
    axes[1, 0].set_ylabel(f"XZ at y = {y * py:.1f} µm\nz (µm)", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("x (µm)", fontsize=8)
    note = "" if focus_z is None else (f"; green: true in-focus range z from {focus_z[0] * pz:.1f} to "
                                       f"{focus_z[1] * pz:.1f} µm")
    fig.suptitle(f"{title}  (dotted cyan: the section of the other row{note}; colour bars: raw counts)", fontsize=10)
    return fig


def intensity_histograms(samples: dict[str, dict[str, np.ndarray]], bins: int = 60):
    """Histograms of raw intensities (counts) per channel, one line per cell line (gene).

    Args:
        samples: ``{channel: {gene: 1D array of voxel values}}``, channels in :data:`CHANNELS`
            order; a gene is absent from a channel its FOVs do not carry.
        bins: bins per panel (integer-wide when the counts are integers).
    """
    fig, axes = plt.subplots(2, 4, figsize=(12, 5.2))
    genes = sorted({g for per in samples.values() for g in per})
    colors = dict(zip(genes, plt.cm.tab10.colors))
    for ax, name in zip(axes.flat, CHANNELS):
        per = {g: v for g, v in samples.get(name, {}).items() if v.size}
        ax.set_title(LABELS[name], fontsize=9)
        if not per:
            _blank(ax, "no FOV\ncarries it")
            continue
        allv = np.concatenate(list(per.values()))
        lo, hi = robust_range(allv, (0.0, 99.9))
        width = (hi - lo) / bins
        if np.all(allv == np.round(allv)):  # counts: whole-number bins, no empty combs
            width = max(1.0, np.ceil(width))
            lo = np.floor(lo) - 0.5
        edges = np.arange(lo, hi + width, width)
        for g, v in per.items():
            ax.hist(v, bins=edges, histtype="step", density=True, color=colors[g], label=g)
        ax.set_yscale("log")
        ax.set_xlabel("intensity (counts)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("density (log scale)", fontsize=8)
    legend_ax = axes.flat[len(CHANNELS)]
    legend_ax.axis("off")
    legend_ax.legend([plt.Line2D([], [], color=colors[g]) for g in genes], [f"{g} FOVs" for g in genes],
                     loc="center", fontsize=9, title="cell line")
    fig.suptitle("Raw intensities per channel (random voxels of every FOV that carries the channel)", fontsize=10)
    fig.tight_layout()
    return fig


def brightfield_through_focus(bf: np.ndarray, pixel_size: Sequence[float], title: str,
                              focus_z: tuple[int, int] | None = None, n: int = 7, y: int | None = None):
    """Brightfield contrast through focus: ``n`` XY slices evenly spaced over the stack, each shown
    as ``I / mean(I) - 1`` on one shared symmetric colour scale, so a sign flip of the contrast (dark
    <-> bright) and its weakening near focus are visible. Slices inside ``focus_z`` are titled green.

    Args:
        bf: ``[1, Z, Y, X]`` (or ``[Z, Y, X]``); pixel_size: ``(z, y, x)`` µm.
    """
    v = bf.reshape(bf.shape[-3:]).astype(np.float64)
    nz, ny, nx = v.shape
    zs = np.linspace(0, nz - 1, n).round().astype(int)
    contrast = v / v.mean(axis=(1, 2), keepdims=True) - 1
    lim = float(np.percentile(np.abs(contrast[zs]), 99.5))
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.5), squeeze=False)
    pz, py, px = pixel_size
    for ax, z in zip(axes[0], zs):
        im = ax.imshow(contrast[z], cmap="RdBu_r", vmin=-lim, vmax=lim, extent=(0, nx * px, ny * py, 0))
        inside = focus_z is not None and focus_z[0] <= z < focus_z[1]
        ax.set_title(f"z = {z * pz:.1f} µm", fontsize=8, color="green" if inside else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label="I / mean − 1")
    note = "" if focus_z is None else (f"; green titles: true in-focus range, z from {focus_z[0] * pz:.1f} to "
                                       f"{focus_z[1] * pz:.1f} µm")
    fig.suptitle(f"{title}: brightfield contrast through focus{note}", fontsize=9)
    return fig


def label_matrix(fovs: pd.DataFrame, carried: np.ndarray):
    """The six-channel target's NaN layout: FOVs (rows, grouped by structure) x target channels;
    a filled cell means the FOV carries that label, an empty one that the target holds NaN there.

    Args:
        fovs: the ``fovs.csv`` table (``fov_id``, ``gene``, ``structure``).
        carried: bool ``[n_fovs, 6]`` in the table's row order.
    """
    order = np.argsort(fovs["structure"].map(TARGETS.index).to_numpy(), kind="stable")
    m = carried[order].astype(int)
    fig, ax = plt.subplots(figsize=(5.5, 1.8 + 0.22 * len(fovs)))
    ax.imshow(m, cmap=ListedColormap(["0.92", "tab:blue"]), vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(TARGETS)), [TARGET_LABELS[t] for t in TARGETS], rotation=30, ha="right", fontsize=8)
    rows = fovs.iloc[order]
    ax.set_yticks(range(len(rows)), [f"{g} · {f}" for f, g in zip(rows["fov_id"], rows["gene"])], fontsize=7)
    ax.set_xticks(np.arange(-0.5, len(TARGETS)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("target channel")
    ax.set_ylabel("FOV (gene · id)")
    ax.set_title(f"Labels present (blue) and NaN (grey): {int(m.sum())} of {m.size} target channels carried",
                 fontsize=9)
    fig.tight_layout()
    return fig

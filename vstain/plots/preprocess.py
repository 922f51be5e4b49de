"""Figures of notebooks 02_plls and 03_denoising (thesis 2.2): power spectra (Figure 2.1), focus
curves, the window on an XZ section, the blind spot (Figure 2.2) and the denoising gallery.

Every function takes arrays or tables and returns a matplotlib Figure; nothing reads files here.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from vstain.channels import TARGET_LABELS, TARGETS, VOLUME_CHANNELS
from vstain.preprocess import focus

from .views import colorbar, robust_range, scale_bar

LABELS = {"brightfield": "Brightfield", **TARGET_LABELS}
METHOD_LABELS = {"plls": "PLLS", "nvar": "normalised variance", "brenner": "Brenner gradient",
                 "noisy": "noisy input", "n2v": "Noise2Void", "bm3d": "BM3D", "nlm": "non-local means",
                 "truth": "clean truth"}


def power_spectra(slices: dict[str, np.ndarray], band: tuple[float, float], title: str) -> plt.Figure:
    """Thesis Figure 2.1: the radially averaged power spectrum of each named slice on log-log
    axes, one panel per slice, with the PLLS line fitted over ``band`` (shaded)."""
    fig, axes = plt.subplots(1, len(slices), figsize=(4.2 * len(slices), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (letter, (name, img)) in zip(axes, zip("ABCDEFG", slices.items())):
        f, p = focus.radial_power_spectrum(img)
        ax.loglog(f, p, ".", ms=4, color="tab:blue", label="power per annulus")
        keep = (f >= band[0]) & (f <= band[1]) & (p > 0)
        slope, icpt = np.polyfit(np.log(f[keep]), np.log(p[keep]), 1)
        ff = f[keep]
        ax.loglog(ff, np.exp(icpt) * ff**slope, "-", color="tab:red", lw=2, label=f"fit: PLLS = {slope:.2f}")
        ax.axvspan(*band, color="0.9", zorder=0, label="fit band")
        ax.set(title=f"({letter}) {name}", xlabel="spatial frequency (cycles / pixel)")
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("mean power (a.u.)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def focus_curves(curves: pd.DataFrame, row: pd.Series, title: str = "") -> plt.Figure:
    """PLLS against z for every channel of one FOV (``curves``: the long ``focus_curves.csv`` rows of
    that FOV), with the selected window, its centre and the true in-focus range."""
    chans = [c for c in VOLUME_CHANNELS if c in set(curves["channel"])]
    fig, axes = plt.subplots(1, len(chans), figsize=(2.6 * len(chans), 3.2), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, ch in zip(axes, chans):
        d = curves[(curves["channel"] == ch) & (curves["method"] == "plls")]
        ax.plot(d["z"], d["value"], "o-", ms=3, label="PLLS")
        ax.axvspan(row["z_lo"] - 0.5, row["z_hi"] - 0.5, color="tab:orange", alpha=0.15, label="selected window")
        ax.axvline(row["center"], color="tab:orange", lw=1.5, label="selected centre")
        if np.isfinite(row.get("true_center", np.nan)):
            ax.axvline(row["true_center"], color="k", ls=":", lw=1.2, label="true centre")
        ax.set(title=LABELS.get(ch, ch), xlabel="z (slice)")
    axes[0].set_ylabel("PLLS (log-log slope)")
    h, lab = [], []
    for ax in axes:
        for hh, ll in zip(*ax.get_legend_handles_labels()):
            if ll not in lab:
                h.append(hh)
                lab.append(ll)
    fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def xz_window(stack: np.ndarray, row: pd.Series, pixel_size_zx: tuple[float, float], y: int | None = None,
              channel: str = "dna", title: str = "") -> plt.Figure:
    """An XZ section of one channel (``stack [Z, Y, X]``) at row ``y`` (default: the brightest row of
    the focus slice), in µm, with the selected window and the true in-focus range."""
    z0 = int(row["center"])
    if y is None:
        y = int(np.nanargmax(np.nansum(stack[z0], axis=1)))
    sec = stack[:, y, :]
    dz, dx = pixel_size_zx
    nz, nx = sec.shape
    fig, ax = plt.subplots(figsize=(7.6, 7 * nz * dz / (nx * dx) + 1.2), layout="constrained")
    vmin, vmax = robust_range(sec)
    im = ax.imshow(sec, cmap="gray", vmin=vmin, vmax=vmax, extent=(0, nx * dx, nz * dz, 0), aspect="equal",
                   interpolation="nearest")
    colorbar(fig, im, ax, label="counts", fraction=0.046, pad=0.02)
    for z, style, lab in ((row["z_lo"], "-", "selected window"), (row["z_hi"], "-", None)):
        ax.axhline(z * dz, color="tab:orange", ls=style, lw=2, label=lab)
    if np.isfinite(row.get("true_center", np.nan)) and "true_lo" in row:
        for z, lab in ((row["true_lo"], "true in-focus range"), (row["true_hi"], None)):
            ax.axhline(z * dz, color="tab:cyan", ls="--", lw=1.5, label=lab)
    ax.set(xlabel="x (µm)", ylabel="z (µm)",
           title=title or f"{LABELS.get(channel, channel)}, XZ section at y = {y * dx:.1f} µm")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.8)
    return fig


def focus_error_scatter(df: pd.DataFrame, title: str = "Selected vs true focus centre") -> plt.Figure:
    """Selected centre against the true centre per FOV and measure (``focus.csv``)."""
    fig, ax = plt.subplots(figsize=(4.4, 4))
    d = df[np.isfinite(df["true_center"])]
    for m, mk in zip(focus.METHODS, "os^"):
        ax.plot(d["true_center"], d[f"center_{m}"], mk, alpha=0.7, label=METHOD_LABELS[m])
    lim = [d["true_center"].min() - 2, d["true_center"].max() + 2]
    ax.plot(lim, lim, "k:", lw=1, label="exact")
    ax.set(xlabel="true centre (slice)", ylabel="selected centre (slice)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def blind_spot(patch: np.ndarray, masked: np.ndarray, mask: np.ndarray, rf: np.ndarray,
               at: tuple[int, int], roi_size: int, zoom: int = 16, title: str = "") -> plt.Figure:
    """Thesis Figure 2.2 on a measured patch: (A) the patch with the pixels N2V masks, (B) the masked
    input, (C) a ``2 zoom + 1`` crop around one masked pixel ``at``: the network's receptive field
    there (``rf``, a centred ``|d out / d in|`` map) and the pixel itself left out, its value replaced
    by a neighbour's from the dashed ``roi_size`` box."""
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.6), layout="constrained")
    vmin, vmax = robust_range(patch)
    colorbar(fig, axes[0].imshow(patch, cmap="gray", vmin=vmin, vmax=vmax), axes[:2].tolist(), label="counts",
             fraction=0.046, pad=0.02)
    yy, xx = np.nonzero(mask)
    axes[0].plot(xx, yy, "s", ms=3, mfc="none", mec="tab:red", mew=0.8)
    axes[0].set_title(f"(A) patch and its {int(mask.sum())} masked pixels", fontsize=10)
    axes[1].imshow(masked, cmap="gray", vmin=vmin, vmax=vmax)
    axes[1].set_title("(B) network input:\nmasked pixels hold a neighbour's value", fontsize=10)
    y0, x0 = at
    field = np.zeros(patch.shape)  # rf re-centred on (y0, x0), clipped to the patch
    ry, rx = rf.shape[0] // 2, rf.shape[1] // 2
    for (a, b), v in np.ndenumerate(rf):
        y, x = y0 + a - ry, x0 + b - rx
        if 0 <= y < patch.shape[0] and 0 <= x < patch.shape[1]:
            field[y, x] = v
    field /= field.max() or 1.0
    ax = axes[2]
    ax.imshow(masked, cmap="gray", vmin=vmin, vmax=vmax)
    colorbar(fig, ax.imshow(np.ma.masked_where(field < 1e-3, field), cmap="viridis", alpha=0.6, vmin=0, vmax=1), ax,
         label="receptive field (relative |d out / d in|)", fraction=0.046, pad=0.02)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), 1, 1, fc="white", ec="tab:red", lw=1.5))
    r = roi_size // 2
    ax.add_patch(Rectangle((x0 - r - 0.5, y0 - r - 0.5), roi_size, roi_size, fill=False, ec="tab:red", ls="--", lw=1))
    ax.set_xlim(x0 - zoom - 0.5, x0 + zoom + 0.5)
    ax.set_ylim(y0 + zoom + 0.5, y0 - zoom - 0.5)
    ax.set_title("(C) one masked pixel (white): receptive field\n(colour), replacement box (dashed)", fontsize=10)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    return fig


def denoise_gallery(gallery: np.ndarray, rows: pd.DataFrame, methods=("noisy", "n2v", "bm3d", "nlm", "truth"),
                    title: str = "Denoising, one slice per target channel",
                    method_labels: dict[str, str] | None = None, pixel_um: float | None = None) -> plt.Figure:
    """Before/after per channel: ``gallery [6, len(methods), Y, X]`` (NaN rows: no FOV carries the
    channel; a NaN panel: the method did not run on that FOV). The panels of a row share the noisy
    input's display range, except the clean truth, which has its own. ``method_labels`` overrides
    :data:`METHOD_LABELS` (e.g. ``{"bm3d": "BM4D"}``). Each row has a colour bar of its shared range
    and the truth panel its own; ``pixel_um`` (the lateral voxel size) adds a µm scale bar to each row."""
    labels = {**METHOD_LABELS, **(method_labels or {})}
    chans = [c for c in TARGETS if c in set(rows["channel"])]
    fig, axes = plt.subplots(len(chans), len(methods), figsize=(2.6 * len(methods), 2.4 * len(chans)), squeeze=False,
                             layout="constrained")
    info = rows.set_index("channel")
    for i, ch in enumerate(chans):
        g = gallery[TARGETS.index(ch)]
        ref = g[list(methods).index("noisy")]
        vmin, vmax = robust_range(ref, (1, 99.7))
        shared = None
        for j, m in enumerate(methods):
            ax = axes[i, j]
            img = g[j]
            if m == "truth" and np.isfinite(img).any():
                tv = robust_range(img, (1, 99.7))
                colorbar(fig, ax.imshow(img, cmap="magma", vmin=tv[0], vmax=tv[1]), ax, label="clean signal",
                         fraction=0.046, pad=0.02)
            elif np.isfinite(img).any():
                shared = ax.imshow(img, cmap="magma", vmin=vmin, vmax=vmax)
                if j == 0 and pixel_um:
                    scale_bar(ax, pixel_um, img.shape[1])
            else:
                ax.set_facecolor("0.85")
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels.get(m, m), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{LABELS[ch]}\nFOV {info.loc[ch, 'fov_id']}, z {info.loc[ch, 'z']}", fontsize=8)
        shown = [a for a, m in zip(axes[i], methods) if m != "truth"]
        if shared is not None:
            colorbar(fig, shared, shown, label="counts", fraction=0.046, pad=0.02)
    fig.suptitle(title + " (colour bars: each row's shared range of counts, and the clean truth's own)")
    return fig


def denoise_scores(summary: pd.DataFrame, title: str = "Denoising against the clean truth",
                   method_labels: dict[str, str] | None = None) -> plt.Figure:
    """Mean PSNR and SSIM per channel and method (``vstain.evaluate.denoising.denoise_summary``; each method over
    the volumes it ran on)."""
    labels = {**METHOD_LABELS, **(method_labels or {})}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    chans = [c for c in TARGETS if c in set(summary["channel"])]
    methods = [m for m in ("noisy", "n2v", "bm3d", "nlm") if m in set(summary["method"])]
    w = 0.8 / len(methods)
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for k, m in enumerate(methods):
            d = summary[summary["method"] == m].set_index("channel").reindex(chans)
            ax.bar(np.arange(len(chans)) + (k - (len(methods) - 1) / 2) * w, d[metric], w, label=labels.get(m, m))
        ax.set_xticks(np.arange(len(chans)), [LABELS[c] for c in chans], rotation=25, ha="right", fontsize=8)
        ax.set(xlabel="target channel", ylabel="PSNR (dB)" if metric == "psnr" else "SSIM (-1 to 1)", title=metric.upper())
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(title)
    fig.tight_layout()
    return fig

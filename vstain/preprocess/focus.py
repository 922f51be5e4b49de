"""In-focus slice selection: the power-spectrum log-log slope (PLLS) and classic focus measures.

Thesis 2.2.1 selects the in-focus z-planes of each FOV with the PLLS of Bray et al. (2012): the
slope of the radially averaged power spectrum of a slice against spatial frequency, on log-log
axes. Optics predicts a *less* negative slope in focus (more high-frequency power); the thesis
found the opposite on the Allen FOVs, because pixel noise flattens the high frequencies in every
slice alike while the in-focus structure adds power at middle frequencies, which steepens the
fit. So this module never assumes which extremum of the PLLS curve marks focus: with
``extremum="auto"`` it decides per FOV from the data (see :func:`focus_center`).

Conventions:
    * spatial frequency in cycles per pixel, from ``1 / min(Y, X)`` up to the Nyquist 0.5;
    * the power spectrum is the *mean* power per frequency annulus, so white noise has slope 0
      and ``1/f**a`` noise slope ``-a`` (CellProfiler sums the annulus instead, which adds +1 to
      every slope and changes no ranking);
    * a blank (constant or all-zero) slice has no structure: its PLLS is 0.0 (a flat spectrum),
      never NaN, and it is never chosen as the focus;
    * the window is ``[z_lo, z_hi)``, ``window`` slices, centred on the focus slice and shifted
      to stay inside the stack.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

METHODS = ("plls", "nvar", "brenner")
EXTREMA = ("auto", "min", "max")


def radial_power_spectrum(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The radially averaged power spectrum of a 2D image.

    Args:
        img: a ``[Y, X]`` slice (any real dtype; NaN is treated as the slice mean).

    Returns:
        ``(freq, power)``: the annulus centres in cycles per pixel (integer radii ``r`` of the
        shorter axis, ``f = r / min(Y, X)``, ``r = 1 .. min(Y, X) // 2``) and the mean power of
        the mean-subtracted image's 2D FFT in each annulus.
    """
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"radial_power_spectrum expects a 2D [Y, X] slice, got shape {a.shape}")
    if np.isnan(a).all():
        a = np.zeros_like(a)
    a = np.where(np.isnan(a), np.nanmean(a), a)
    ny, nx = a.shape
    power = np.abs(np.fft.fft2(a - a.mean())) ** 2 / (ny * nx)
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.fftfreq(nx)[None, :]
    n = min(ny, nx)
    radius = np.rint(np.sqrt(fy**2 + fx**2) * n).astype(int)  # in units of 1/n cycles per pixel
    r = np.arange(1, n // 2 + 1)
    sums = ndimage.sum_labels(power, radius, r)
    counts = ndimage.sum_labels(np.ones_like(power), radius, r)
    return r / n, sums / np.maximum(counts, 1)


def plls(img: np.ndarray, band: tuple[float, float] = (0.02, 0.5)) -> float:
    """The power-spectrum log-log slope of one slice (Bray et al. 2012).

    Args:
        img: a ``[Y, X]`` slice.
        band: ``(f_lo, f_hi)``, the frequency band of the fit in cycles per pixel
            (``0 < f_lo < f_hi <= 0.5``); the default fits everything above the coarsest
            ~50-pixel scale.

    Returns:
        The least-squares slope of ``log power`` against ``log frequency`` over the band; 0.0 for
        a slice with no power (blank), never NaN.
    """
    f_lo, f_hi = band
    if not 0 < f_lo < f_hi <= 0.5:
        raise ValueError(f"band must satisfy 0 < f_lo < f_hi <= 0.5 cycles/pixel, got {band}")
    f, p = radial_power_spectrum(img)
    keep = (f >= f_lo) & (f <= f_hi) & (p > 0)
    if keep.sum() < 2:
        return 0.0  # blank slice (or a band holding < 2 frequencies): no structure, flat
    slope = np.polyfit(np.log(f[keep]), np.log(p[keep]), 1)[0]
    return float(slope)


def normalized_variance(img: np.ndarray) -> float:
    """Classic focus measure (Groen et al. 1985): variance over mean intensity; 0 for blank."""
    a = np.asarray(img, dtype=np.float64)
    mean = np.nanmean(a) if not np.isnan(a).all() else 0.0
    if not np.isfinite(mean) or abs(mean) < 1e-12:
        return 0.0
    return float(np.nanvar(a) / abs(mean))


def brenner(img: np.ndarray) -> float:
    """Classic focus measure (Brenner 1971): mean squared difference of pixels two apart (X and Y)."""
    a = np.asarray(img, dtype=np.float64)
    if np.isnan(a).all():
        return 0.0
    a = np.where(np.isnan(a), np.nanmean(a), a)
    return float(np.mean((a[:, 2:] - a[:, :-2]) ** 2) + np.mean((a[2:] - a[:-2]) ** 2))


def focus_curve(stack: np.ndarray, method: str = "plls", band: tuple[float, float] = (0.02, 0.5)) -> np.ndarray:
    """A focus measure for every slice of a ``[Z, Y, X]`` stack, shape ``[Z]``, finite."""
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"focus_curve expects a [Z, Y, X] stack, got shape {stack.shape}")
    if method == "plls":
        return np.array([plls(s, band) for s in stack])
    if method == "nvar":
        return np.array([normalized_variance(s) for s in stack])
    if method == "brenner":
        return np.array([brenner(s) for s in stack])
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def blank_slices(stack: np.ndarray) -> np.ndarray:
    """``[Z]`` bool: slices with no variation (constant, all zero or all NaN)."""
    s = np.asarray(stack, dtype=np.float64)
    with np.errstate(all="ignore"):
        out = np.array([np.isnan(z).all() or not np.nanstd(z) > 0 for z in s])
    return out


def slice_contrast(img: np.ndarray, sigma: float = 1.0) -> float:
    """Contrast of a slice with pixel noise suppressed: normalised variance after a Gaussian
    blur of ``sigma`` pixels. Decides which PLLS extremum is in focus (``extremum="auto"``)."""
    a = np.asarray(img, dtype=np.float64)
    if np.isnan(a).all():
        return 0.0
    a = np.where(np.isnan(a), np.nanmean(a), a)
    return normalized_variance(ndimage.gaussian_filter(a, sigma))


def half_depth_center(curve: np.ndarray, z: int, extremum: str) -> int:
    """The middle of the contiguous run of slices around ``z`` whose value lies beyond half the
    curve's depth (halfway between its minimum and maximum), on the side of ``extremum``; ``z``
    itself when that run reaches either end of the stack."""
    c = np.asarray(curve, dtype=np.float64)
    half = (c.min() + c.max()) / 2
    inside = c <= half if extremum == "min" else c >= half
    if not inside[z]:
        return int(z)
    lo, hi = z, z
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    while hi < len(c) - 1 and inside[hi + 1]:
        hi += 1
    if lo == 0 or hi == len(c) - 1:
        return int(z)  # the run is cut off by the end of the stack: its middle would be biased
    return int(np.floor((lo + hi) / 2 + 0.5))


@dataclass
class FocusResult:
    """Where a FOV is in focus according to one measure.

    Attributes:
        center: the focus slice index.
        z_lo, z_hi: the in-focus window ``[z_lo, z_hi)``.
        extremum: ``"min"`` or ``"max"``, the extremum of the curve that was taken as focus.
        curve: the measure per slice ``[Z]`` (smoothed as used).
        contrast_min, contrast_max: :func:`slice_contrast` at the curve's minimum and maximum
            (the evidence for ``extremum="auto"``).
    """

    center: int
    z_lo: int
    z_hi: int
    extremum: str
    curve: np.ndarray
    contrast_min: float
    contrast_max: float


def focus_window(center: int, n_z: int, window: int, fov_id: str = "?") -> tuple[int, int]:
    """The window ``[z_lo, z_hi)`` of ``window`` slices centred on ``center``, shifted into ``[0, n_z)``.

    Raises:
        ValueError: the stack has fewer slices than the window (names the FOV and both sizes).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1 slice, got {window}")
    if n_z < window:
        raise ValueError(
            f"FOV {fov_id}: the stack has {n_z} z-slices, fewer than the in-focus window of {window} "
            f"slices; lower `window` to at most {n_z} or drop this FOV"
        )
    lo = int(center) - window // 2
    lo = min(max(lo, 0), n_z - window)
    return lo, lo + window


def focus_center(
    stack: np.ndarray,
    method: str = "plls",
    extremum: str = "auto",
    band: tuple[float, float] = (0.02, 0.5),
    smooth_z: float = 1.0,
    window: int = 32,
    fov_id: str = "?",
    refine: bool = True,
) -> FocusResult:
    """The in-focus slice and window of one channel's ``[Z, Y, X]`` stack.

    Args:
        stack: one channel, ``[Z, Y, X]``, raw or normalised intensities.
        method: ``"plls"`` (thesis), ``"nvar"`` (normalised variance) or ``"brenner"``.
        extremum: which extremum of the curve marks focus: ``"min"``, ``"max"`` or ``"auto"``.
            ``"auto"`` (default) takes both candidates (the curve's minimum and maximum over the
            non-blank slices) and keeps the one whose slice has the larger noise-suppressed
            contrast (:func:`slice_contrast`): focus is where the structure is sharpest, whichever
            way the measure moves. The classic measures are maxima by construction, but ``"auto"``
            applies to them too.
        band: PLLS fit band in cycles per pixel.
        smooth_z: Gaussian smoothing of the curve along Z before the extremum search, in slices
            (0 = none); steadies the choice against one noisy slice.
        window: slices in the in-focus window (thesis: 32).
        fov_id: named in errors.
        refine: move the centre from the extremum to the middle of the curve's half-depth run
            around it (:func:`half_depth_center`); a flat-bottomed curve (a thick in-focus layer)
            then gives the layer's middle rather than whichever slice noise made extreme.
    """
    if extremum not in EXTREMA:
        raise ValueError(f"extremum must be one of {EXTREMA}, got {extremum!r}")
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise ValueError(f"FOV {fov_id}: expected a [Z, Y, X] stack, got shape {stack.shape}")
    n_z = stack.shape[0]
    focus_window(0, n_z, window, fov_id)  # fail early on a short stack
    blank = blank_slices(stack)
    if blank.all():
        raise ValueError(f"FOV {fov_id}: every slice of the focus channel is blank (constant or NaN)")
    curve = focus_curve(stack, method, band)
    if smooth_z > 0:
        curve = ndimage.gaussian_filter1d(curve, smooth_z, mode="nearest")
    valid = np.flatnonzero(~blank)
    z_min = int(valid[np.argmin(curve[valid])])
    z_max = int(valid[np.argmax(curve[valid])])
    c_min, c_max = slice_contrast(stack[z_min]), slice_contrast(stack[z_max])
    if extremum == "auto":
        chosen = "min" if c_min > c_max else "max"
    else:
        chosen = extremum
    center = z_min if chosen == "min" else z_max
    if refine:
        center = half_depth_center(curve, center, chosen)
    lo, hi = focus_window(center, n_z, window, fov_id)
    return FocusResult(center, lo, hi, chosen, curve, c_min, c_max)


def defocused_slice(n_z: int, center: int, true_range: tuple[int, int] | None, offset: int) -> tuple[int, int]:
    """A slice that is really out of focus, for a figure that contrasts it with the in-focus one:
    ``offset`` slices beyond the true in-focus range ``[lo, hi)`` (the simulator knows it), on the
    side with more room, clipped to the stack; without a true range, ``offset`` slices from
    ``center``. Returns ``(z, distance)``: the slice and its distance in slices from the nearest
    slice of the true range (from ``center`` without one)."""
    if true_range is None:
        z = center + offset if center + offset < n_z else center - offset
        z = int(np.clip(z, 0, n_z - 1))
        return z, abs(z - center)
    lo, hi = (int(v) for v in true_range)
    above, below = n_z - hi, lo  # slices outside the range on each side
    if max(above, below) <= 0:
        raise ValueError(f"the true in-focus range [{lo}, {hi}) fills the whole stack of {n_z} slices: "
                         "no slice is out of focus")
    z = min(hi - 1 + offset, n_z - 1) if above >= below else max(lo - offset, 0)
    return int(z), int(z - (hi - 1) if z >= hi else lo - z)

"""Classical denoisers that Noise2Void (:mod:`vstain.preprocess.denoise`) is compared with in stage 03, and the
score of any denoised stack against the simulator's clean truth (thesis 2.2.2).

Both denoisers get the noise level estimated from the stack by :func:`estimate_noise_sigma`:
BM3D (Dabov et al. 2007, the ``bm3d`` package), the method the thesis compared against, slice by
slice (or its volumetric extension BM4D, ``bm4d`` package, on request), and scikit-image's
non-local means, a much cheaper reference. Slice by slice, both run their slices in threads, as
many as the process's CPU share (:func:`slice_threads`): each slice is independent and both
libraries release the GIL, so the result is the same as one slice after another.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.restoration import denoise_nl_means

from vstain.threads import cpu_share, map_threads

BASELINES = ("bm3d", "nlm")  # the classical denoisers stage 03 runs beside Noise2Void


def slice_threads() -> int:
    """Threads for slice-by-slice denoising: the process's CPU share (:func:`vstain.threads.cpu_share`:
    ``OMP_NUM_THREADS`` where set, which the pipeline sets per notebook and ``make test`` to one)."""
    return cpu_share()


def _per_slice(denoise: Callable[[np.ndarray], np.ndarray], s: np.ndarray) -> np.ndarray:
    """``denoise`` on every z-slice of ``s``, in :func:`slice_threads` threads; in slice order."""
    # BM3D (a compiled library) and NLM (Cython) release the GIL
    return np.stack(map_threads(denoise, s, slice_threads())).astype(np.float32)


def estimate_noise_sigma(stack: np.ndarray) -> float:
    """Gaussian noise sigma of a ``[Z, Y, X]`` (or ``[Y, X]``) stack: Donoho's wavelet estimator,
    ``median(|d|) / 0.6745`` over the finest diagonal Haar detail ``d`` of every slice.

    (scikit-image's ``estimate_sigma`` does the same with a Daubechies wavelet through PyWavelets;
    the Haar detail needs no wavelet library and is what both baselines here are given.)
    """
    s = np.asarray(stack, dtype=np.float64)
    s = s.reshape(-1, *s.shape[-2:])
    ny, nx = (s.shape[1] // 2) * 2, (s.shape[2] // 2) * 2
    s = s[:, :ny, :nx]
    d = (s[:, 0::2, 0::2] - s[:, 0::2, 1::2] - s[:, 1::2, 0::2] + s[:, 1::2, 1::2]) / 2
    return float(np.median(np.abs(d)) / 0.6745)


BM3D_MODES = ("2d", "3d")


def bm3d_denoise(stack: np.ndarray, mode: str = "2d", sigma: float | None = None) -> np.ndarray:
    """BM3D (Dabov et al. 2007) on a ``[Z, Y, X]`` stack, in the stack's own units.

    The noise is treated as white Gaussian with one sigma for the whole stack, estimated by
    :func:`estimate_noise_sigma` unless given (the simulator's camera noise is Poisson plus read
    noise, so this sigma is an average level, as for non-local means).

    Args:
        stack: ``[Z, Y, X]``, raw intensities, no NaN; each slice at least 8 x 8 pixels (BM3D's
            block size).
        mode: ``"2d"``: ``bm3d.bm3d`` on each z-slice, the method the thesis names (default);
            ``"3d"``: ``bm4d.bm4d`` on the whole stack (BM4D, BM3D's volumetric extension; needs at
            least 8 slices). Pilot on one 16 x 96 x 96 quick-profile volume (membrane, 2 busy cores):
            BM3D 6.4 s, PSNR 27.3 -> 33.9 dB; BM4D 7.9 s, 35.6 dB. The default stays BM3D, the
            method whose comparison the thesis reports.
        sigma: noise standard deviation in the stack's units (``None``: estimated). A sigma of 0
            (a blank or noiseless stack) returns the stack unchanged.

    Each call runs single-threaded (``num_threads=1``): the packages' automatic threading was slower
    here (each call carries ~0.2-0.4 s of fixed cost, more with threads) and makes the output vary
    slightly from run to run. In ``"2d"`` the slices run side by side instead (:func:`slice_threads`),
    with the same output: six 128 x 128 slices took 6.0 s one after another, 3.1 s in two threads.
    """
    if mode not in BM3D_MODES:
        raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
    s = np.asarray(stack, dtype=np.float32)
    if s.ndim != 3:
        raise ValueError(f"BM3D expects a [Z, Y, X] stack, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("BM3D: the stack holds NaN/inf; pass only the FOVs that carry the channel")
    need = (8, 8, 8) if mode == "3d" else (1, 8, 8)
    if any(n < k for n, k in zip(s.shape, need)):
        raise ValueError(f"BM3D ({mode}) needs a stack of at least {need} (Z, Y, X), got {s.shape}")
    sigma = estimate_noise_sigma(s) if sigma is None else float(sigma)
    if not sigma > 0:
        return s.copy()
    if mode == "3d":
        import bm4d

        profile = bm4d.BM4DProfile()
        profile.num_threads = 1
        return np.asarray(bm4d.bm4d(s, sigma_psd=sigma, profile=profile), dtype=np.float32)
    import bm3d

    profile = bm3d.BM3DProfile()
    profile.num_threads = 1  # must stay 1 while slices run in threads: the library's thread pool is process-global
    return _per_slice(lambda z: bm3d.bm3d(z, sigma_psd=sigma, profile=profile), s)


def nlm_denoise(stack: np.ndarray, patch_size: int = 5, patch_distance: int = 6, h: float = 0.8,
                mode: str = "2d") -> np.ndarray:
    """scikit-image non-local means with the noise level estimated from the stack (the cheap baseline).

    Args:
        stack: ``[Z, Y, X]``, raw intensities.
        patch_size: side of the compared patches, pixels.
        patch_distance: search radius, pixels.
        h: filter strength in units of the estimated noise sigma (skimage suggests ~0.8 with
            ``fast_mode``).
        mode: ``"2d"`` (slice by slice, with the stack's sigma) or ``"3d"`` (3D patches).
    """
    if mode not in ("2d", "3d"):
        raise ValueError(f"mode must be '2d' or '3d', got {mode!r}")
    s = np.asarray(stack, dtype=np.float32)
    sigma = estimate_noise_sigma(s)
    kw = dict(patch_size=patch_size, patch_distance=patch_distance, h=h * sigma, sigma=sigma,
              fast_mode=True, channel_axis=None)
    if mode == "3d":
        return denoise_nl_means(s, **kw).astype(np.float32)
    return _per_slice(lambda z: denoise_nl_means(z, **kw), s)


def score(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of an estimate against the clean truth, both ``[Z, Y, X]``.

    Noisy counts, denoised output and the simulator's truth need not share units, so the estimate
    is first mapped onto the truth by the least-squares affine fit ``a * estimate + b``; both
    metrics then use the truth's range as ``data_range``. SSIM is 3D (7-voxel window, or the
    largest odd size that fits).
    """
    e = np.asarray(estimate, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if e.shape != t.shape:
        raise ValueError(f"estimate {e.shape} and truth {t.shape} differ in shape")
    A = np.stack([e.ravel(), np.ones(e.size)], axis=1)
    coef = np.linalg.lstsq(A, t.ravel(), rcond=None)[0]
    e = (A @ coef).reshape(t.shape)
    rng = float(t.max() - t.min()) or 1.0
    win = min(7, *[(s if s % 2 else s - 1) for s in t.shape])
    return {
        "psnr": float(peak_signal_noise_ratio(t, e, data_range=rng)),
        "ssim": float(structural_similarity(t, e, data_range=rng, win_size=win)),
    }

"""Flip test-time augmentation: a mean prediction and a per-voxel spread as a rough uncertainty.

Sits on top of whole-FOV prediction (:func:`vstain.inference.infer.predict_volume`): the brightfield
``[1, Z, Y, X]`` is predicted as is and flipped in Y, in X and in both; each prediction is flipped
back and the four are averaged. Flips in Y and X are the augmentations the generator was trained
with (never Z: brightfield contrast changes sign through focus, see
:class:`vstain.preprocess.processed.ProcessedCrops`), so the four inputs are equally plausible and their
disagreement is a cheap, lower-bound uncertainty, not a calibrated one.
"""
from __future__ import annotations

import numpy as np

from .infer import predict_volume

# Flipped axes of a C Z Y X array: identity, Y, X, Y and X.
FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))


def predict_tta(generator, x, predict_fn=predict_volume, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the predictions of the four Y/X flips of ``x``.

    Args:
        generator: passed to ``predict_fn`` (a :class:`vstain.models.Generator`).
        x: brightfield ``[1, Z, Y, X]`` (numpy or tensor), every axis >= 8.
        predict_fn: ``predict_fn(generator, x [1,Z,Y,X], **kwargs) -> [C,Z,Y,X]``; default
            :func:`vstain.inference.infer.predict_volume` (whole volume, tiled above its memory budget).
        **kwargs: passed to ``predict_fn`` (e.g. ``max_voxels``).

    Returns:
        ``(mean, std)``, float32 ``[C, Z, Y, X]`` each; ``std`` is the population standard
        deviation over the four flips (0 where the prediction is flip-equivariant).
    """
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"predict_tta expects a [1, Z, Y, X] brightfield volume, got shape {x.shape}")
    flips = (np.flip(np.asarray(predict_fn(generator, np.ascontiguousarray(np.flip(x, axes)) if axes else x,
                                           **kwargs), dtype=np.float32), axes) for axes in FLIPS)
    return mean_and_sd(flips, ddof=0)


def mean_and_sd(volumes, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (``ddof`` as numpy's; 0 where fewer than ``ddof + 1``) of the
    arrays an iterable yields, in one pass (Welford: a running mean and sum of squares, two arrays
    in memory however many are averaged). Both float32."""
    mean = m2 = None
    n = 0
    for n, y in enumerate(volumes, 1):
        y = np.asarray(y, dtype=np.float32)
        if mean is None:
            mean, m2 = y.copy(), np.zeros_like(y)
            continue
        delta = y - mean
        mean += delta / n
        m2 += delta * (y - mean)
    if mean is None:
        raise ValueError("mean_and_sd needs at least one array")
    sd = np.sqrt(m2 / (n - ddof)) if n > ddof else np.zeros_like(m2)
    return mean.astype(np.float32), sd.astype(np.float32)

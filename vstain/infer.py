"""Whole-FOV prediction (thesis 3.1.1: any input of at least 8 voxels per axis, no stitching).

:func:`predict_volume` runs the generator once over the whole volume when it fits a memory budget;
above the budget it falls back to overlapping tiles blended with Gaussian weights by MONAI's
``sliding_window_inference`` (called with MONAI's own argument names) and says so with a warning.
This module only decides which of the two to use.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from .models import MIN_SIZE, SIZE_MULTIPLE

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 * 2**30  # activation memory allowed for one forward pass (4 GiB)
DEFAULT_OVERLAP = 0.25  # fraction of a tile shared with its neighbours (MONAI's `overlap`)


def bytes_per_voxel(generator) -> int:
    """A generous estimate of float32 activation bytes per input voxel in an inference pass.

    At full resolution the decoder holds the skip (w channels), the upsampled features (w), their
    concatenation (2w) and the block's output (w) at once; lower levels add about 1/8 + 1/64 + ...
    of that. ``8 * w`` floats per voxel covers this with a margin (measured by
    ``benchmarks/bench_unet.py``).
    """
    return 4 * 8 * int(generator.cfg.base_width)


def default_max_voxels(generator, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """The largest input (in voxels) predicted in one pass under ``budget_bytes``."""
    return int(budget_bytes // bytes_per_voxel(generator))


def plan(shape_zyx, max_voxels: int) -> str:
    """``"whole"`` when a volume of ``shape_zyx`` (padded to multiples of 8) fits ``max_voxels``,
    else ``"tiled"``."""
    padded = [s + (-s % SIZE_MULTIPLE) for s in shape_zyx]
    return "whole" if int(np.prod(padded)) <= max_voxels else "tiled"


def default_roi(shape_zyx, max_voxels: int) -> tuple[int, int, int]:
    """A tile that keeps the whole Z range (capped by the budget) and the largest square Y-X
    side, a multiple of 8 and at least 8, such that the tile fits ``max_voxels``."""
    z = min(int(shape_zyx[0]), max(MIN_SIZE, max_voxels // (MIN_SIZE * MIN_SIZE)))
    side = int((max_voxels / max(z + (-z % SIZE_MULTIPLE), 1)) ** 0.5) // SIZE_MULTIPLE * SIZE_MULTIPLE
    side = max(MIN_SIZE, side)
    return (z, min(side, int(shape_zyx[1])), min(side, int(shape_zyx[2])))


def predict_volume(
    generator,
    x,
    max_voxels: int | None = None,
    roi_size=None,
    overlap: float = DEFAULT_OVERLAP,
    sw_batch_size: int = 1,
) -> np.ndarray:
    """Predict the six fluorescence channels of one FOV.

    Args:
        generator: a :class:`vstain.models.Generator` (its device is used; put in eval mode here).
        x: brightfield ``[1, Z, Y, X]`` (numpy or tensor), every axis >= 8.
        max_voxels: the largest (padded) input predicted in one pass; default from a 4 GiB
            activation budget for this generator's width (:func:`default_max_voxels`).
        roi_size: tile size ``(Z, Y, X)`` when tiling; default :func:`default_roi`.
        overlap: fraction of overlap between tiles, in [0, 1) (MONAI ``overlap``).
        sw_batch_size: tiles per forward pass (MONAI ``sw_batch_size``).

    Returns:
        float32 ``[6, Z, Y, X]`` numpy array.
    """
    xt = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if xt.dim() != 4:
        raise ValueError(f"predict_volume expects a [1, Z, Y, X] brightfield volume, got shape {tuple(xt.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    shape = tuple(xt.shape[1:])
    if max_voxels is None:
        max_voxels = default_max_voxels(generator)
    param = next(generator.parameters())
    xt = xt[None].to(param.device)  # [1, 1, Z, Y, X]
    was_training = generator.training
    generator.eval()
    try:
        with torch.inference_mode():
            if plan(shape, max_voxels) == "whole":
                log.info("predict_volume: whole volume %s in one pass", shape)
                out = generator(xt)
            else:
                roi = tuple(roi_size) if roi_size is not None else default_roi(shape, max_voxels)
                msg = (f"predict_volume: volume {shape} exceeds the budget of {max_voxels} voxels; "
                       f"tiling with roi_size={roi}, overlap={overlap}, gaussian blending")
                log.info(msg)
                warnings.warn(msg, stacklevel=2)
                out = sliding_window_inference(
                    xt, roi_size=roi, sw_batch_size=sw_batch_size, predictor=generator,
                    overlap=overlap, mode="gaussian",
                )
    finally:
        generator.train(was_training)
    return out[0].float().cpu().numpy()

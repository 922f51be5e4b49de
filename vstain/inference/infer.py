"""Whole-FOV prediction (thesis 3.1.1: any input of at least 8 voxels per axis, no stitching).

:func:`predict_volume` runs the generator once over the whole volume when it fits a memory budget;
above the budget it falls back to tiles and says so with a warning. Tiles are normalised in one of
two ways (``norm``):

- ``"volume"`` (default): the volume is predicted one convolution at a time over Y-X tiles through
  scratch files on disk, and every InstanceNorm layer normalises each tile with that layer's
  per-channel mean and variance over the *whole* (reflect-padded) volume
  (:func:`vstain.inference.layerwise.predict_layerwise`). The result equals the one-pass prediction to float32
  rounding everywhere, tile borders included, for about the work of one pass.
- ``"tile"``: each tile is normalised with its own statistics and tiles are blended with Gaussian
  weights by MONAI's ``sliding_window_inference`` (called with MONAI's own argument names). The
  tiles then disagree: seams at tile borders.

:func:`seam_figures` measures how far a tiled prediction departs from the one-pass prediction;
:func:`write_predictions` predicts every FOV of a split of the processed set into a model stage's
``predictions/`` folder.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vstain.channels import TARGETS
from vstain.models import MIN_SIZE, SIZE_MULTIPLE, check_size
from vstain.preprocess import processed
from vstain.volumes import write_volume

from .layerwise import predict_layerwise, tile_bounds

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 * 2**30  # activation memory allowed for one forward pass (4 GiB)
DEFAULT_OVERLAP = 0.25  # fraction of a tile shared with its neighbours (MONAI's `overlap`)
NORMS = ("volume", "tile")  # tile normalisation: whole-volume statistics, or each tile's own


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


def default_roi(shape_zyx, max_voxels: int, all_z: bool = False) -> tuple[int, int, int]:
    """A tile that keeps the whole Z range (capped by the budget; ``all_z``: never capped and padded
    to 8, as the layerwise prediction's tiles span every plane) and the largest square Y-X side, a
    multiple of 8 and at least 8, such that the tile fits ``max_voxels``."""
    z = int(shape_zyx[0])
    z = z + (-z % SIZE_MULTIPLE) if all_z else min(z, max(MIN_SIZE, max_voxels // (MIN_SIZE * MIN_SIZE)))
    side = int((max_voxels / max(z + (-z % SIZE_MULTIPLE), 1)) ** 0.5) // SIZE_MULTIPLE * SIZE_MULTIPLE
    side = max(MIN_SIZE, side)
    return (z, min(side, int(shape_zyx[1])), min(side, int(shape_zyx[2])))


# --------------------------------------------------------------------------------------------
# Whole-volume prediction with its tiled fallback
# --------------------------------------------------------------------------------------------
def predict_volume(
    generator,
    x,
    max_voxels: int | None = None,
    roi_size=None,
    overlap: float | None = None,
    sw_batch_size: int = 1,
    norm: str = "volume",
    workdir=None,
    progress: bool = False,
) -> np.ndarray:
    """Predict the six fluorescence channels of one FOV.

    Args:
        generator: a :class:`vstain.models.Generator` (its device is used; put in eval mode here).
        x: brightfield ``[1, Z, Y, X]`` (numpy or tensor), every axis >= 8.
        max_voxels: the largest (padded) input predicted in one pass; default from a 4 GiB
            activation budget for this generator's width (:func:`default_max_voxels`).
        roi_size: tile size ``(Z, Y, X)`` when tiling; default :func:`default_roi` (with
            ``norm="volume"`` its ``all_z`` tile: tiles span all of Z and only the Y and X sides are used).
        overlap: ``norm="tile"`` only: fraction of overlap between tiles, in [0, 1) (MONAI
            ``overlap``, default 0.25). Whole-volume statistics need no overlap.
        sw_batch_size: ``norm="tile"`` only: tiles per forward pass (MONAI ``sw_batch_size``).
        norm: how tiles are normalised, one of :data:`NORMS`: ``"volume"`` (default; whole-volume
            statistics, layer by layer through scratch files, :func:`vstain.inference.layerwise.predict_layerwise`)
            or ``"tile"`` (each tile's own, Gaussian blending).
        workdir: ``norm="volume"``: folder for the scratch files (default: the system's temporary
            folder); they are removed afterwards.
        progress: show a progress bar over the layers when tiling with ``norm="volume"``.

    Returns:
        float32 ``[6, Z, Y, X]`` numpy array.
    """
    xt = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if xt.dim() != 4:
        raise ValueError(f"predict_volume expects a [1, Z, Y, X] brightfield volume, got shape {tuple(xt.shape)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if overlap is not None and (norm != "tile" or not 0 <= overlap < 1):
        raise ValueError(f"overlap must be in [0, 1) and applies to norm='tile' only, got {overlap} with norm={norm!r}")
    shape = tuple(xt.shape[1:])
    check_size((1, 1, *shape), "brightfield volume")  # tiled or not, every axis at least 8
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
                roi = tuple(roi_size) if roi_size is not None else default_roi(shape, max_voxels, norm == "volume")
                msg = f"predict_volume: volume {shape} exceeds the budget of {max_voxels} voxels; "
                if norm == "volume":
                    out = predict_layerwise(generator, xt, roi[1:], workdir, progress)
                    msg += (f"predicting layer by layer in Y-X tiles of about {roi[1]}x{roi[2]} (all of Z) "
                            f"through scratch files, instance norm with whole-volume statistics")
                else:
                    from monai.inferers import sliding_window_inference  # importing MONAI takes seconds

                    out = sliding_window_inference(
                        xt, roi_size=roi, sw_batch_size=sw_batch_size, predictor=generator,
                        overlap=DEFAULT_OVERLAP if overlap is None else overlap, mode="gaussian",
                    )
                    msg += (f"tiling with roi_size={roi}, overlap={DEFAULT_OVERLAP if overlap is None else overlap}, "
                            f"instance norm per tile, gaussian blending")
                log.info(msg)
                warnings.warn(msg, stacklevel=2)
    finally:
        generator.train(was_training)
    return out[0].float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Seams: how far a tiled prediction departs from the one-pass prediction
# --------------------------------------------------------------------------------------------
def tile_borders(shape_zyx, roi_size, overlap: float = DEFAULT_OVERLAP, norm: str = "volume") -> list[np.ndarray]:
    """Per axis ``Z, Y, X``: the planes of a ``shape_zyx`` volume where a tile of
    :func:`predict_volume` begins or ends, or (``norm="volume"``, Y-X tiles spanning Z) where one
    tile meets the next; planes on the volume's own faces are left out."""
    if norm == "volume":
        padded = [s + (-s % SIZE_MULTIPLE) for s in shape_zyx]
        edges = [[]] + [[(b - 1, b) for b in tile_bounds(p, int(r))[1:-1]] for p, r in zip(padded[1:], roi_size[1:])]
        shift = [(p - s) // 2 for p, s in zip(padded, shape_zyx)]  # the low side of the reflect padding
    else:  # MONAI's tiles: starts every int(roi * (1 - overlap)) voxels, the last one flush with the end
        from monai.data.utils import dense_patch_slices

        edges, shift = [], [0, 0, 0]
        for size, r in zip(shape_zyx, roi_size):
            r = min(int(r), size)
            step = r if r == size else max(int(r * (1 - overlap)), 1)
            edges.append([(s.start, s.stop - 1) for (s,) in dense_patch_slices((size,), (r,), (step,))])
    return [np.unique([e - d for t in axis for e in t if 0 < e - d < n - 1]).astype(int)
            for axis, d, n in zip(edges, shift, shape_zyx)]


def seam_figures(whole: np.ndarray, tiled: np.ndarray, borders) -> dict[str, np.ndarray]:
    """Per channel: Pearson ``corr`` of a tiled and the one-pass prediction (``[C, Z, Y, X]``
    each), ``max_abs`` and ``mean_abs`` of their difference, the same relative to the channel's
    largest absolute value in the one-pass prediction (``max_rel``, ``mean_rel``), and
    ``border_ratio``: the mean absolute difference on the tile-border planes ``borders`` (per axis,
    :func:`tile_borders`) over that elsewhere (NaN without borders). Seamless tiles give a ratio near 1
    and corr near 1."""
    diff = np.abs(tiled.astype(np.float64) - whole)
    on = np.zeros(whole.shape[1:], bool)
    for axis, planes in enumerate(borders):
        on[(slice(None),) * axis + (np.asarray(planes, int),)] = True
    scale = np.abs(whole).reshape(len(whole), -1).max(1)
    max_abs, mean_abs = diff.reshape(len(whole), -1).max(1), diff.reshape(len(whole), -1).mean(1)
    return {
        "corr": np.array([np.corrcoef(w.ravel(), t.ravel())[0, 1] for w, t in zip(whole, tiled)]),
        "max_abs": max_abs, "mean_abs": mean_abs, "max_rel": max_abs / scale, "mean_rel": mean_abs / scale,
        "border_ratio": np.array([_ratio(d[on].mean(), d[~on].mean()) if on.any() else np.nan for d in diff]),
    }


def _ratio(a: float, b: float) -> float:
    """``a / b``, and 1 when both are 0 (identical predictions have no seams)."""
    return 1.0 if a == b == 0 else a / b if b else float("inf")


def measure_seams(generator, x, roi_size, overlap: float | None = None, norm: str = "volume") -> dict:
    """Predict ``x [1, Z, Y, X]`` in one pass and in tiles of ``roi_size`` with :func:`predict_volume`
    and compare them (:func:`seam_figures`); ``overlap``: ``norm="tile"`` only (default 0.25)."""
    whole = predict_volume(generator, x, max_voxels=np.iinfo(np.int64).max)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predict_volume: volume", category=UserWarning)
        tiled = predict_volume(generator, x, max_voxels=0, roi_size=roi_size, overlap=overlap, norm=norm)
    borders = tile_borders(np.shape(x)[1:], roi_size, DEFAULT_OVERLAP if overlap is None else overlap, norm)
    return seam_figures(whole, tiled, borders)


def write_predictions(generator, stage_in, out_dir, splits=("val", "test"), max_voxels=None,
                      roi_size=None, channel_names=TARGETS) -> pd.DataFrame:
    """Predict every FOV of ``splits`` of the processed set with :func:`predict_volume`
    and write ``out_dir/predictions/<fov_id>.tif`` (float32 ``[C, Z, Y, X]``, ``C`` = 6 or the
    ``channel_names`` a single-structure model predicts).

    Returns a table ``fov_id, split, structure, path`` (relative to ``out_dir``), ``mode``
    (``whole``/``tiled``) and ``seconds``.
    """
    out_dir = Path(out_dir)
    df = processed.read_manifest(stage_in)
    df = df[df["split"].isin(splits)]
    if max_voxels is None:
        max_voxels = default_max_voxels(generator)
    rows = []
    for _, r in df.iterrows():
        x, _, _ = processed.load_fov(r)
        t = time.perf_counter()
        pred = predict_volume(generator, x, max_voxels=max_voxels, roi_size=roi_size)
        rel = f"predictions/{r['fov_id']}.tif"
        write_volume(out_dir / rel, pred, list(channel_names))
        rows.append({"fov_id": r["fov_id"], "split": r["split"], "structure": r["structure"], "path": rel,
                     "mode": plan(x.shape[1:], max_voxels), "seconds": round(time.perf_counter() - t, 3)})
    return pd.DataFrame(rows)

"""Whole-FOV prediction (thesis 3.1.1: any input of at least 8 voxels per axis, no stitching).

:func:`predict_volume` runs the generator once over the whole volume when it fits a memory budget;
above the budget it falls back to overlapping tiles and says so with a warning. Tiles are
normalised in one of two ways (``norm``):

- ``"volume"`` (default): every InstanceNorm layer normalises each tile with that layer's
  per-channel mean and variance over the *whole* (reflect-padded) volume, as the one-pass
  prediction does (:func:`predict_tiled`). The statistics are gathered from the tiles themselves,
  layer by layer, each voxel counted once. Tiles sit on the generator's 8-voxel grid and each keeps
  only its core, so the result equals the one-pass prediction to float32 rounding wherever a core
  lies at least the receptive-field radius (:data:`RECEPTIVE_RADIUS`) inside its tile; with a
  smaller halo only the zero padding at tile edges differs. About six times the work of ``"tile"``.
- ``"tile"``: each tile is normalised with its own statistics and tiles are blended with Gaussian
  weights by MONAI's ``sliding_window_inference`` (called with MONAI's own argument names). The
  tiles then disagree: seams at tile borders.

:func:`seam_figures` measures how far a tiled prediction departs from the one-pass prediction.
"""
from __future__ import annotations

import functools
import itertools
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from .models import MIN_SIZE, SIZE_MULTIPLE, pad_to_multiple

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 * 2**30  # activation memory allowed for one forward pass (4 GiB)
DEFAULT_OVERLAP = 0.25  # fraction of a tile shared with its neighbours (MONAI's `overlap`)
NORMS = ("volume", "tile")  # tile normalisation: whole-volume statistics, or each tile's own
RECEPTIVE_RADIUS = 52  # voxels from an output voxel to the farthest input it depends on (measured, any alignment)


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


# --------------------------------------------------------------------------------------------
# Tiles normalised with whole-volume statistics
# --------------------------------------------------------------------------------------------
def exact_halo() -> int:
    """The halo (voxels, a multiple of 8) that makes tiled prediction exact: at least
    :data:`RECEPTIVE_RADIUS` between a tile's kept core and its edge."""
    return -(-RECEPTIVE_RADIUS // SIZE_MULTIPLE) * SIZE_MULTIPLE


def halo_overlap(tile: int, halo: int) -> float:
    """The ``overlap`` fraction of :func:`axis_tiles` that gives ``halo`` voxels on each side of a
    core in a tile of ``tile`` voxels, shrunk where the tile is too small to keep a core of 8."""
    room = (tile - SIZE_MULTIPLE) // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE  # the widest halo that keeps a core
    return 2 * min(halo, room) / tile


def axis_tiles(size: int, tile: int, overlap: float) -> list[tuple[int, int, int]]:
    """``(start, core_lo, core_hi)`` of the tiles along one axis of a padded volume.

    ``size`` and ``tile`` are multiples of 8. The cores partition ``[0, size)``, and each core lies
    a halo of ``overlap * tile / 2`` voxels (rounded up to 8) inside its tile, except on the
    volume's faces, so neighbouring tiles share at least ``overlap * tile`` voxels. Starts and core
    bounds are multiples of 8: every tile sees the 8-voxel grid of the one-pass prediction.
    """
    if tile >= size:
        return [(0, 0, size)]
    halo = -(-int(np.ceil(overlap * tile / 2)) // SIZE_MULTIPLE) * SIZE_MULTIPLE
    core = tile - 2 * halo  # the longest core of a tile inside the volume
    if core < SIZE_MULTIPLE:
        raise ValueError(f"overlap={overlap} leaves a tile of {tile} voxels no core: a halo of {halo} on each side")
    first, last = tile - halo, size - tile + halo  # end of the first tile's core, start of the last one's
    if last <= first:  # two tiles: meet in the middle
        bounds = [0, (first + last + SIZE_MULTIPLE) // (2 * SIZE_MULTIPLE) * SIZE_MULTIPLE, size]
    else:  # middle cores of at most `core` voxels spread evenly between the two
        n = -(-(last - first) // core)
        bounds = [0, *[first + j * (last - first) // n // SIZE_MULTIPLE * SIZE_MULTIPLE for j in range(n + 1)], size]
    starts = [0, *[lo - halo for lo in bounds[1:-2]], size - tile]
    return list(zip(starts, bounds, bounds[1:]))


class _StopPass(Exception):
    """Raised by a hook to end a tile's forward pass once the statistics it gathers are taken."""


class VolumeNorm:
    """Forward hooks that make every InstanceNorm layer of ``generator`` normalise with given
    per-channel statistics instead of the tile's own, and gather the statistics still missing.

    A layer with statistics normalises with them. The first layer reached without statistics adds
    its input over each tile's core to per-channel float64 sums and sums of squares and ends the
    forward pass (:class:`_StopPass`): the layers after it need its statistics first. Use as a
    context manager; the hooks are removed on exit.

    Args:
        generator: the network; its InstanceNorm3d layers are found by type.
        tile_shape: ``(Z, Y, X)`` of the tiles, multiples of 8; a layer whose input is ``2**l``
            times smaller sees the cores scaled down by ``2**l``.
    """

    def __init__(self, generator: nn.Module, tile_shape):
        self.layers = [m for m in generator.modules() if isinstance(m, nn.InstanceNorm3d)]
        self.tile_shape = tuple(tile_shape)
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)  # (mean, var) float64 [C]
        self.cores: list[tuple[tuple[int, int], ...]] = []  # per tile of the batch: (lo, hi) per axis
        self.sums: dict[int, list] = {}  # layer -> [sum, sum of squares, voxels] of this pass
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(functools.partial(self._hook, k)) for k, m in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, k: int, module, args, out):
        x = args[0]  # [N, C, z, y, x] the layer's input for a batch of tiles
        if self.stats[k] is None:
            scale = [t // s for t, s in zip(self.tile_shape, x.shape[2:])]
            acc = self.sums.setdefault(k, [0.0, 0.0, 0])
            for n, core in enumerate(self.cores):
                c = x[n, :, *[slice(lo // f, hi // f) for (lo, hi), f in zip(core, scale)]].double()
                acc[0] = acc[0] + c.sum((1, 2, 3))
                acc[1] = acc[1] + (c * c).sum((1, 2, 3))
                acc[2] += c[0].numel()
            raise _StopPass
        mean, var = self.stats[k]
        inv = torch.rsqrt(var + module.eps).to(x.dtype)[:, None, None, None]
        return (x - mean.to(x.dtype)[:, None, None, None]) * inv

    def finish_pass(self) -> None:
        """Turn the sums of a pass into the layer's statistics (biased variance, as InstanceNorm)."""
        for k, (s, sq, n) in self.sums.items():
            mean = s / n
            self.stats[k] = (mean, (sq / n - mean * mean).clamp_min(0))
        self.sums = {}


@dataclass
class Tiled:
    """A tiled prediction: ``prediction`` float32 ``[1, 6, Z, Y, X]`` (on the CPU), the per-layer
    ``(mean, var)`` float64 statistics it was normalised with, ``passes`` over the tiles, and the
    tile ``grid``: per axis of the padded volume, ``(start, core_lo, core_hi)`` of each tile."""

    prediction: Tensor
    stats: list
    passes: int
    grid: list


def predict_tiled(generator: nn.Module, x: Tensor, roi_size, overlap: float | None = None,
                  sw_batch_size: int = 1) -> Tiled:
    """Predict ``x [1, 1, Z, Y, X]`` tile by tile with whole-volume instance-norm statistics.

    The volume is reflect-padded to multiples of 8 as the one-pass prediction pads it and cut into
    tiles of ``roi_size`` rounded up to 8 (:func:`axis_tiles`). Layer k's statistics depend on
    layers 1..k-1 only, so pass k runs every tile up to layer k, normalising layers 1..k-1 with
    their volume statistics, and gathers layer k's over the tile cores (:class:`VolumeNorm`); a
    last full pass predicts and keeps each tile's core. The statistics are exact wherever each
    core lies :data:`RECEPTIVE_RADIUS` voxels inside its tile (and nearly so elsewhere); the
    cost is the sum of the partial passes, about 5 full ones for the U-Net, plus one.

    Args:
        generator: the network in eval mode, on the device of ``x``; call under inference mode.
        x: ``[1, 1, Z, Y, X]``.
        roi_size: tile ``(Z, Y, X)``.
        overlap: fraction of a tile shared with a neighbour, in [0, 1); None (default): the
            :func:`exact_halo` on every tiled axis, or as much of it as the tile leaves room for.
        sw_batch_size: tiles per forward pass.
    """
    xp, crop = pad_to_multiple(x, SIZE_MULTIPLE)  # [1, 1, Z', Y', X'] as the one-pass prediction sees it
    padded = xp.shape[2:]
    tile = tuple(min(-(-int(r) // SIZE_MULTIPLE) * SIZE_MULTIPLE, p) for r, p in zip(roi_size, padded))
    grid = [axis_tiles(p, t, halo_overlap(t, exact_halo()) if overlap is None else overlap)
            for p, t in zip(padded, tile)]
    tiles = list(itertools.product(*grid))
    out = None
    with VolumeNorm(generator, tile) as vn:
        passes = len(vn.layers) + 1
        for _ in range(passes):
            for i in range(0, len(tiles), sw_batch_size):
                batch = tiles[i:i + sw_batch_size]
                vn.cores = [tuple((lo - s, hi - s) for s, lo, hi in t) for t in batch]
                xb = torch.cat([xp[:, :, *[slice(s, s + n) for (s, _, _), n in zip(t, tile)]] for t in batch])
                try:
                    yb = generator(xb)  # [B, 6, *tile]
                except _StopPass:
                    continue
                if out is None:
                    out = torch.empty((1, yb.shape[1], *padded), dtype=torch.float32)
                for t, core, y in zip(batch, vn.cores, yb):
                    out[0, :, *[slice(lo, hi) for _, lo, hi in t]] = y[:, *[slice(a, b) for a, b in core]].float().cpu()
            vn.finish_pass()
    return Tiled(out[crop], vn.stats, passes, grid)


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
) -> np.ndarray:
    """Predict the six fluorescence channels of one FOV.

    Args:
        generator: a :class:`vstain.models.Generator` (its device is used; put in eval mode here).
        x: brightfield ``[1, Z, Y, X]`` (numpy or tensor), every axis >= 8.
        max_voxels: the largest (padded) input predicted in one pass; default from a 4 GiB
            activation budget for this generator's width (:func:`default_max_voxels`).
        roi_size: tile size ``(Z, Y, X)`` when tiling; default :func:`default_roi`.
        overlap: fraction of overlap between tiles, in [0, 1) (MONAI ``overlap``); None (default):
            with ``norm="volume"`` a halo of the receptive-field radius (:func:`exact_halo`), which
            makes the tiled prediction equal the one-pass one; with ``"tile"`` 0.25.
        sw_batch_size: tiles per forward pass (MONAI ``sw_batch_size``).
        norm: how tiles are normalised, one of :data:`NORMS`: ``"volume"`` (default; whole-volume
            statistics, :func:`predict_tiled`) or ``"tile"`` (each tile's own, Gaussian blending).

    Returns:
        float32 ``[6, Z, Y, X]`` numpy array.
    """
    xt = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if xt.dim() != 4:
        raise ValueError(f"predict_volume expects a [1, Z, Y, X] brightfield volume, got shape {tuple(xt.shape)}")
    if overlap is not None and not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
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
                shown = f"overlap={overlap}" if overlap is not None else (
                    f"halo={exact_halo()} (the receptive field)" if norm == "volume" else f"overlap={DEFAULT_OVERLAP}")
                msg = (f"predict_volume: volume {shape} exceeds the budget of {max_voxels} voxels; "
                       f"tiling with roi_size={roi}, {shown}, ")
                if norm == "volume":
                    tiled = predict_tiled(generator, xt, roi, overlap, sw_batch_size)
                    out = tiled.prediction
                    msg += (f"instance norm with whole-volume statistics ({tiled.passes} passes over "
                            f"{int(np.prod([len(a) for a in tiled.grid]))} tiles), tile cores kept")
                else:
                    out = sliding_window_inference(
                        xt, roi_size=roi, sw_batch_size=sw_batch_size, predictor=generator,
                        overlap=DEFAULT_OVERLAP if overlap is None else overlap, mode="gaussian",
                    )
                    msg += "instance norm per tile, gaussian blending"
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
    :func:`predict_volume` begins or ends, or (``norm="volume"``) where the prediction passes from
    one tile's core to the next; planes on the volume's own faces are left out."""
    if norm == "volume":
        padded = [s + (-s % SIZE_MULTIPLE) for s in shape_zyx]
        tile = [min(-(-int(r) // SIZE_MULTIPLE) * SIZE_MULTIPLE, p) for r, p in zip(roi_size, padded)]
        edges = [[(s, s + t - 1, lo - 1, lo) for s, lo, _ in axis_tiles(p, t, overlap)] for p, t in zip(padded, tile)]
        shift = [(p - s) // 2 for p, s in zip(padded, shape_zyx)]  # the low side of the reflect padding
    else:  # MONAI's tiles: starts every int(roi * (1 - overlap)) voxels, the last one flush with the end
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
    :func:`tile_borders`) over that elsewhere. Seamless tiles give a ratio near 1 and corr near 1."""
    diff = np.abs(tiled.astype(np.float64) - whole)
    on = np.zeros(whole.shape[1:], bool)
    for axis, planes in enumerate(borders):
        on[(slice(None),) * axis + (np.asarray(planes, int),)] = True
    scale = np.abs(whole).reshape(len(whole), -1).max(1)
    max_abs, mean_abs = diff.reshape(len(whole), -1).max(1), diff.reshape(len(whole), -1).mean(1)
    return {
        "corr": np.array([np.corrcoef(w.ravel(), t.ravel())[0, 1] for w, t in zip(whole, tiled)]),
        "max_abs": max_abs, "mean_abs": mean_abs, "max_rel": max_abs / scale, "mean_rel": mean_abs / scale,
        "border_ratio": np.array([_ratio(d[on].mean(), d[~on].mean()) for d in diff]),
    }


def _ratio(a: float, b: float) -> float:
    """``a / b``, and 1 when both are 0 (identical predictions have no seams)."""
    return 1.0 if a == b == 0 else a / b if b else float("inf")


def measure_seams(generator, x, roi_size, overlap: float = DEFAULT_OVERLAP, norm: str = "volume") -> dict:
    """Predict ``x [1, Z, Y, X]`` in one pass and in tiles of ``roi_size`` with :func:`predict_volume`
    and compare them (:func:`seam_figures`)."""
    whole = predict_volume(generator, x, max_voxels=np.iinfo(np.int64).max)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="predict_volume: volume", category=UserWarning)
        tiled = predict_volume(generator, x, max_voxels=0, roi_size=roi_size, overlap=overlap, norm=norm)
    return seam_figures(whole, tiled, tile_borders(np.shape(x)[1:], roi_size, overlap, norm))

"""Small field helpers of the cell model: soft masks, uniform draws, textures and point splats.

All lengths are in µm; a field is a float32 ``[Z, Y, X]`` array on the FOV's voxel grid.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import optics

Range = tuple[float, float]


def step(x: np.ndarray, width: float) -> np.ndarray:
    """A soft Heaviside step (0 -> 1 across ``width`` µm): partial-volume edges, no aliasing."""
    return (0.5 * (1 + np.tanh(x / width))).astype(np.float32)


def shell(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian ridge of width ``sigma`` µm at ``x == 0``."""
    return np.exp(-0.5 * (x / sigma) ** 2).astype(np.float32)


def sheet(x: np.ndarray, sigma: float, pixel: float) -> np.ndarray:
    """A thin layer at ``x == 0`` (width ``sigma`` µm) sampled on voxels of ``pixel`` µm: a Gaussian
    widened to ``sqrt(sigma^2 + pixel^2 / 4)`` and lowered so that its integral across the layer,
    the dye per area, is the same at any voxel size (a point sample of a layer thinner than a
    voxel would miss it between voxel centres)."""
    wide = float(np.sqrt(sigma**2 + pixel**2 / 4))
    return (sigma / wide) * shell(x, wide)


def draw(rng: np.random.Generator, r: Range, size: int | None = None) -> float | np.ndarray:
    """A uniform draw from the range ``r``: one value, or ``size`` of them."""
    return rng.uniform(r[0], r[1], size)


def texture(shape: tuple[int, int, int], pixel_size: tuple[float, float, float], sigma_um: float,
            rng: np.random.Generator) -> np.ndarray:
    """A smooth random field (zero mean, unit std) with correlation length ``sigma_um``."""
    return optics.smooth_noise(shape, tuple(sigma_um / p for p in pixel_size), rng)


def smooth_field_um(extent_zyx: np.ndarray, corr_um: float, rng: np.random.Generator,
                    grid_um: float = 0.5) -> tuple[np.ndarray, float]:
    """A smooth random field (unit std) on a fixed grid of ``grid_um`` µm covering ``extent_zyx``.

    The draws depend only on the physical extent, not on the voxel size, so the same seed builds
    the same field at any voxel size; :func:`sample_um` reads it at voxel centres."""
    n = tuple(int(np.ceil(e / grid_um)) + 3 for e in extent_zyx)
    field = ndimage.gaussian_filter(rng.standard_normal(n).astype(np.float32), corr_um / grid_um, mode="wrap")
    return field / (field.std() + 1e-9), grid_um


def sample_um(field: np.ndarray, grid_um: float, coords_um: tuple[np.ndarray, ...]) -> np.ndarray:
    """Trilinear samples of a :func:`smooth_field_um` field at µm coordinates (broadcast together)."""
    pts = np.broadcast_arrays(*coords_um)
    idx = [p.astype(np.float32) / grid_um + 1.0 for p in pts]
    return ndimage.map_coordinates(field, idx, order=1, mode="nearest").astype(np.float32)


def splat(points_px: np.ndarray, shape: tuple[int, int, int], weights: np.ndarray | None = None) -> np.ndarray:
    """Points ``[n, 3]`` (continuous voxel indices) accumulated into a volume, trilinearly."""
    vol = np.zeros(int(np.prod(shape)), np.float32)
    if len(points_px) == 0:
        return vol.reshape(shape)
    base = np.floor(points_px).astype(np.int64)
    frac = (points_px - base).astype(np.float32)
    wt = np.ones(len(points_px), np.float32) if weights is None else weights.astype(np.float32)
    for corner in np.ndindex(2, 2, 2):
        idx = base + np.array(corner)
        w = np.prod(np.where(np.array(corner), frac, 1 - frac), axis=1) * wt
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        flat = np.ravel_multi_index(idx[ok].T, shape)
        vol += np.bincount(flat, weights=w[ok], minlength=vol.size).astype(np.float32)
    return vol.reshape(shape)


def occupancy(centres_um: np.ndarray, volumes_um3: np.ndarray, sigma_um: float,
              shape: tuple[int, int, int], pixel_size: tuple[float, float, float]) -> np.ndarray:
    """The volume fraction ``[Z, Y, X]`` (0-1) occupied by small bodies of the given volumes.

    Each body's volume is splatted at its centre (µm) and spread by a Gaussian of width
    ``sigma_um``, the body's second moment (``r / sqrt(5)`` for a sphere of radius ``r``, ``r / 2``
    across a tube), so a body smaller than a voxel keeps its volume as a partial-volume fraction,
    at any voxel size."""
    px = np.array(pixel_size, np.float32)
    vol = splat(centres_um / px - 0.5, shape, volumes_um3 / float(np.prod(px)))
    return np.clip(ndimage.gaussian_filter(vol, sigma_um / px), 0, 1)

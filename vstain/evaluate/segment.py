"""Classical 3D instance segmentation of nuclei and cells from fluorescence channels.

Virtual stains are judged by what they are for: the nuclei and cells one can segment from them.
One documented pipeline (scikit-image) segments the DNA and membrane channels of any source (the
simulator's clean truth, the measured targets, a model's predictions) so that the sources differ
only in their images:

* **Nuclei** (:func:`segment_nuclei`): Gaussian smoothing, an Otsu threshold, holes filled (the
  nucleoli are DNA-poor), the Euclidean distance to the background in µm, one seed per local
  maximum of that distance (at most one within ``seed_distance_um``), a seeded watershed of the
  inverted distance inside the foreground, and objects below ``min_volume_um3`` dropped.
* **Cells** (:func:`segment_cells`): a seeded watershed of the smoothed membrane signal from the
  nuclei inside the cell layer (:func:`cell_layer`), so each cell is the region around one nucleus
  bounded by membrane and keeps its nucleus' id.

Every step is invariant to a positive affine change of intensity (smoothing is linear, Otsu's
threshold and the watershed's flooding order move with the intensities), so a channel gives the
same labels raw in ADU or z-scored per FOV. Lengths are in µm and converted with the voxel size
``(z, y, x)``, so the pipeline works at the simulator's and the real data's sampling.
Layout: a channel is ``Z Y X``; labels are int32 ``Z Y X``, 0 = background, 1..N instances.
This module imports nothing of the project; :mod:`vstain.evaluate.downstream` scores its labels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_multiotsu
from skimage.morphology import remove_small_holes
from skimage.segmentation import relabel_sequential, watershed

from vstain.data.simconfig import SimConfig

VOXEL_SIZE_ZYX: tuple[float, float, float] = SimConfig.pixel_size  # µm, the simulator's default sampling


def _voxel(voxel_size_zyx: Sequence[float]) -> np.ndarray:
    """The voxel size as a float array, checked: three positive µm values ``(z, y, x)``."""
    vox = np.asarray(voxel_size_zyx, np.float64)
    if vox.shape != (3,) or not (np.isfinite(vox).all() and (vox > 0).all()):
        raise ValueError(f"voxel_size_zyx must be three positive µm values (z, y, x), got {voxel_size_zyx}")
    return vox


def _channel(x: np.ndarray, name: str) -> np.ndarray:
    """A ``Z Y X`` channel as float32, checked: 3D, finite and not constant."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must be one channel Z Y X, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values (an unlabelled channel cannot be segmented)")
    if np.ptp(x) == 0:
        raise ValueError(f"{name} is constant: nothing to segment")
    return x.astype(np.float32)


def _smooth(x: np.ndarray, sigma_um: float, vox: np.ndarray) -> np.ndarray:
    """Gaussian smoothing with a standard deviation of ``sigma_um`` µm on every axis."""
    return ndimage.gaussian_filter(x, sigma_um / vox) if sigma_um > 0 else x


def _box(half_width_um: float, vox: np.ndarray) -> np.ndarray:
    """A boolean box footprint reaching ``half_width_um`` µm from its centre along each axis (at
    least one voxel); a box, not a ball, so scipy's maximum filter runs axis by axis."""
    half = np.maximum(np.round(half_width_um / vox), 1).astype(int)
    return np.ones(tuple(2 * half + 1), bool)


def _drop_small(labels: np.ndarray, min_voxels: float) -> np.ndarray:
    """Labels with the objects of fewer than ``min_voxels`` voxels removed, renumbered 1..N."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_voxels
    small[0] = False
    labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def segment_nuclei(dna: np.ndarray, voxel_size_zyx: Sequence[float] = VOXEL_SIZE_ZYX, smooth_um: float = 0.3,
                   seed_distance_um: float = 5.0, min_volume_um3: float = 5.0, hole_um: float = 6.0) -> np.ndarray:
    """Nuclei of a DNA channel: a half-maximum foreground split by a distance-transform watershed.
    The lower of two three-class Otsu thresholds (background, nuclei, the brightest chromatin)
    parts background from nuclei, so a mitotic cell's condensed chromosomes, several times brighter
    than interphase nuclei, do not raise it; the foreground is then above half-way between the
    background's median and the nuclei's, the half-maximum edge of a blurred nucleus. Nucleoli hold
    little DNA: their intermediate values would pull an Otsu threshold down into the gaps between
    nuclei, and they are holes in the nuclei, open in 3D where a nucleolus touches the nucleus' top
    or bottom, so holes up to ``hole_um`` wide are filled slice by slice before the 3D fill.

    Args:
        dna: the DNA channel ``Z Y X`` (any positive affine scale: ADU or z-scored).
        voxel_size_zyx: voxel size in µm, default the simulator's (0.6, 0.3, 0.3).
        smooth_um: standard deviation of the Gaussian smoothing in µm (default 0.3: suppresses
            camera noise and chromatin texture, keeps the ~1 µm gaps between nuclei).
        seed_distance_um: two maxima of the distance transform closer than this (µm) along every
            axis seed one nucleus (default 5, about half a hiPSC nucleus' width): larger merges touching
            nuclei, smaller splits elongated ones.
        min_volume_um3: objects smaller than this are dropped (default 5 µm³; a hiPSC nucleus
            holds a few hundred µm³, a nucleus cut by the FOV border can be small).
        hole_um: diameter (µm) of the largest hole filled in a slice (default 6: a large nucleolus;
            the cytoplasm between nuclei is wider and connected).

    Returns:
        int32 labels ``Z Y X``: 0 = background, nuclei 1..N.
    """
    vox = _voxel(voxel_size_zyx)
    x = _smooth(_channel(dna, "dna"), smooth_um, vox)
    lo = threshold_multiotsu(x, classes=3)[0]
    fg = x > 0.5 * (np.median(x[x <= lo]) + np.median(x[x > lo]))
    hole = max(int(np.pi * (hole_um / 2) ** 2 / (vox[1] * vox[2])), 1)  # voxels of a slice
    fg = ndimage.binary_fill_holes(np.stack([remove_small_holes(s, max_size=hole) for s in fg]))
    # distance to the background in µm, lightly smoothed so a flat ridge gives one maximum
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(fg, sampling=vox), 1.0) * fg
    components, n = ndimage.label(fg)
    peaks = peak_local_max(dist, footprint=_box(seed_distance_um, vox), labels=components,
                           exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # a component without a maximum (too thin for the smoothing) still gets its deepest voxel
    seeded = np.unique(components[tuple(peaks.T)]) if len(peaks) else np.array([], int)
    for c in np.setdiff1d(np.arange(1, n + 1), seeded):
        markers[np.unravel_index(np.argmax(np.where(components == c, dist + 1e-6, 0)), fg.shape)] = markers.max() + 1
    labels = watershed(-dist, markers, mask=fg)
    return _drop_small(labels, min_volume_um3 / np.prod(vox))


def cell_layer(membrane: np.ndarray, voxel_size_zyx: Sequence[float] = VOXEL_SIZE_ZYX,
               smooth_um: float = 0.3) -> np.ndarray:
    """The cell layer of a membrane channel: in every ``(y, x)`` column, the slices from the lowest
    to the highest membrane voxel (basal to apical membrane, widened by the blur). A membrane voxel
    is above the lower of two three-class Otsu thresholds of the smoothed channel (background,
    faint basal and apical sheets, bright lateral membranes: the sheets are dimmer than the
    lateral membranes because the PSF is longer in z). Gaps in the colony (lateral membrane only
    at their rim) and the medium stay outside; holes in a predicted lateral membrane do not open
    a cell.

    Args:
        membrane: the membrane channel ``Z Y X`` (any positive affine scale).
        voxel_size_zyx: voxel size in µm.
        smooth_um: Gaussian smoothing in µm before the threshold (default 0.3).

    Returns:
        bool ``Z Y X``.
    """
    vox = _voxel(voxel_size_zyx)
    x = _smooth(_channel(membrane, "membrane"), smooth_um, vox)
    on = x > threshold_multiotsu(x, classes=3)[0]
    nz = on.shape[0]
    lo = np.where(on.any(0), on.argmax(0), nz)
    hi = nz - 1 - on[::-1].argmax(0)
    z = np.arange(nz)[:, None, None]
    return (z >= lo) & (z <= hi)


def segment_cells(membrane: np.ndarray, nuclei_labels: np.ndarray, foreground: np.ndarray | None = None,
                  voxel_size_zyx: Sequence[float] = VOXEL_SIZE_ZYX, smooth_um: float = 0.3,
                  margin_um: float = 1.0) -> np.ndarray:
    """Cells: a watershed of the membrane signal seeded by the nuclei and by the medium.

    Flooding starts in each nucleus and rises through the dim cytoplasm; it also starts in the
    medium (every voxel more than ``margin_um`` from the foreground). Two cells meet on the bright
    lateral membrane between them, a cell and the medium on the basal or apical membrane, each at
    the membrane's centre rather than the edge of its blur. Each cell keeps the id of its nucleus;
    a cell whose nucleus was not found is absorbed by its neighbours.

    Args:
        membrane: the membrane channel ``Z Y X`` (any positive affine scale).
        nuclei_labels: int labels ``Z Y X`` of the nuclei (from :func:`segment_nuclei` or true).
        foreground: bool ``Z Y X``, a generous region where cells may be; default the
            :func:`cell_layer` of ``membrane``. Cells never reach more than ``margin_um`` beyond it.
        voxel_size_zyx: voxel size in µm.
        smooth_um: Gaussian smoothing of the membrane in µm (default 0.3).
        margin_um: distance from the foreground in µm beyond which a voxel seeds the medium
            (default 1.0, a little more than the axial blur of a membrane sheet).

    Returns:
        int32 labels ``Z Y X``: 0 = background; cell k contains nucleus k.
    """
    vox = _voxel(voxel_size_zyx)
    x = _smooth(_channel(membrane, "membrane"), smooth_um, vox)
    nuclei = np.asarray(nuclei_labels)
    if nuclei.shape != x.shape:
        raise ValueError(f"nuclei_labels has shape {nuclei.shape}, the membrane channel {x.shape}")
    if foreground is None:
        foreground = cell_layer(membrane, vox, smooth_um)
    elif np.shape(foreground) != x.shape:
        raise ValueError(f"foreground has shape {np.shape(foreground)}, the membrane channel {x.shape}")
    region = np.asarray(foreground, bool) | (nuclei > 0)
    medium = ndimage.distance_transform_edt(~region, sampling=vox) > margin_um
    markers = nuclei.astype(np.int32)
    bg = int(markers.max()) + 1
    markers[medium] = bg
    labels = watershed(x, markers)
    labels[labels == bg] = 0
    return labels.astype(np.int32)

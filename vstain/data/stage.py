"""Stage ``01_data``: load FOVs in the Allen layout (the real dataset through :mod:`vstain.data.allen`, or
the simulator's local registry) and write them for the next stages.

Output: ``fovs.csv`` and, per FOV, ``fovs/<id>.tif`` ``[7, Z, Y, X]`` (brightfield + six targets,
NaN where not carried) and, on simulated data, ``truth/<id>.tif`` (the clean ``[6, Z, Y, X]``) and
``labels/<id>.tif`` (the true instances, uint16 ``[2, Z, Y, X]``: cells, nuclei).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from vstain.channels import (ALLEN_PACKAGE, ALLEN_REGISTRY, DEFAULT_GENE_MAP, DEFAULT_STRUCTURES, LABEL_CHANNELS,

    TARGETS, VOLUME_CHANNELS)
from vstain.volumes import read_labels, read_volume, resolve_paths, write_labels, write_volume

from .allen import FOV, check_structures, load_fovs
from .registry import write_registry
from .simulate import SimConfig

SOURCES = ("synthetic", "allen")
FOVS_CSV = "fovs.csv"
VOXEL_COLUMNS = ("pixel_size_z", "pixel_size_y", "pixel_size_x")
FILE_COLUMNS = ("path", "truth_path", "labels_path")  # relative to the stage; "" where a FOV has no such file


def center_crop_yx(fov: FOV, crop_yx: Sequence[int]) -> FOV:
    """The central ``(Y, X)`` voxels of a FOV (all slices, all channels, the truth and labels too)."""
    ny, nx = fov.bf.shape[-2:]
    cy, cx = (int(c) for c in crop_yx)
    if not (0 < cy <= ny and 0 < cx <= nx):
        raise ValueError(f"crop_yx {tuple(crop_yx)} does not fit FOV {fov.fov_id} of {ny} x {nx} (Y, X) voxels")
    sl = (Ellipsis, slice((ny - cy) // 2, (ny - cy) // 2 + cy), slice((nx - cx) // 2, (nx - cx) // 2 + cx))
    return replace(fov, bf=fov.bf[sl], target=fov.target[sl], truth=None if fov.truth is None else fov.truth[sl],
                   labels=None if fov.labels is None else fov.labels[sl])


def run_data_stage(out_dir: str | os.PathLike, source: str = "synthetic", registry: str | None = None,
                   package: str = ALLEN_PACKAGE, n_per_structure: int = 3, shape: Sequence[int] | None = None,
                   pixel_size: Sequence[float] | None = None, seed: int = 0,
                   structures: Sequence[str] = DEFAULT_STRUCTURES, gene_map: dict[str, str] = DEFAULT_GENE_MAP,
                   crop_yx: Sequence[int] | None = None, timeout: float = 5.0) -> pd.DataFrame:
    """Stage ``01_data``: load FOVs in the Allen layout and write them for the next stages.

    Args:
        out_dir: the stage folder (``rundir.stage_dir(run_dir, "01_data")``).
        source: ``"synthetic"``: simulate ``n_per_structure`` FOVs per structure into a local
            registry ``out_dir/registry`` (shape, pixel size, seed) and load them through the same
            loader; ``"allen"``: the real dataset (needs network).
        registry: the registry to read for ``"allen"`` (default ``s3://allencell``; a local
            registry works too); must be None for ``"synthetic"``.
        package, n_per_structure, structures, gene_map, seed, timeout: see :func:`load_fovs`.
        crop_yx: keep only the central ``(Y, X)`` voxels of every FOV (None = the whole FOV); a real
            FOV of about 70 x 624 x 924 voxels is 1.1 GB as a float32 ``[7, Z, Y, X]`` volume.
        shape: simulated FOV shape ``(Z, Y, X)`` (synthetic only; None = ``SimConfig``'s).
        pixel_size: simulated voxel size ``(z, y, x)`` µm (synthetic only; None = ``SimConfig``'s,
            coarser than the real 0.29/0.108 µm so a small FOV holds a colony, not one cell).

    Returns:
        The table written to ``fovs.csv``: ``fov_id, gene, structure, path, truth_path,
        labels_path, focus_z_lo, focus_z_hi, pixel_size_z, pixel_size_y, pixel_size_x, fov_path, cells``
        (paths relative to ``out_dir``).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    check_structures(structures, gene_map, n_per_structure)
    out = Path(out_dir)
    for sub in ("fovs", "truth", "labels"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if source == "synthetic":
        if registry is not None:
            raise ValueError("registry must be None for source 'synthetic' (the simulator writes its own)")
        targets = [gene_map[g] for g in structures]
        if len(set(targets)) < len(targets):
            raise ValueError(f"structures {list(structures)}: the simulator makes one cell line per tagged structure, "
                             f"but these genes share one ({dict(zip(structures, targets))})")
        shutil.rmtree(out / "registry", ignore_errors=True)
        geometry = {k: tuple(v) for k, v in (("shape", shape), ("pixel_size", pixel_size)) if v is not None}
        registry = write_registry(out / "registry", n_per_structure, SimConfig(**geometry), seed, progress=True,
                                  structures=targets, gene_map={g: gene_map[g] for g in structures})
    elif registry is None:
        registry = ALLEN_REGISTRY
    rows = []
    for f in load_fovs(registry, package, n_per_structure, structures, gene_map, seed, out / "cache", timeout):
        if crop_yx is not None:
            f = center_crop_yx(f, crop_yx)
        rel = f"fovs/{f.fov_id}.tif"
        write_volume(out / rel, np.concatenate([f.bf, f.target]), list(VOLUME_CHANNELS))
        trel = lrel = ""
        if f.truth is not None:
            trel = f"truth/{f.fov_id}.tif"
            write_volume(out / trel, f.truth, list(TARGETS))
        if f.labels is not None:
            lrel = f"labels/{f.fov_id}.tif"
            write_labels(out / lrel, f.labels, LABEL_CHANNELS)
        lo, hi = f.focus_z if f.focus_z else (None, None)
        rows.append({"fov_id": f.fov_id, "gene": f.gene, "structure": f.structure, "path": rel, "truth_path": trel,
                     "labels_path": lrel,
                     "focus_z_lo": lo, "focus_z_hi": hi, "pixel_size_z": f.pixel_size[0],
                     "pixel_size_y": f.pixel_size[1], "pixel_size_x": f.pixel_size[2],
                     "fov_path": f.fov_path, "cells": f.cells})
    df = pd.DataFrame(rows).astype({"focus_z_lo": "Int64", "focus_z_hi": "Int64"})
    df.to_csv(out / FOVS_CSV, index=False)
    return df


def read_fovs(stage: str | os.PathLike) -> pd.DataFrame:
    """The ``01_data`` table with :data:`FILE_COLUMNS` made absolute ("" where a FOV has no clean
    truth or no true labels, as on real data) and the true focus range as ``Int64`` (NA where
    unknown). Stages 02 and 03 read the FOVs through this table."""
    stage = Path(stage)
    f = stage / FOVS_CSV
    if not f.exists():
        raise FileNotFoundError(f"no {FOVS_CSV} at {stage}: run notebooks/01_data.ipynb first")
    df = resolve_paths(pd.read_csv(f, dtype={"fov_id": str, "truth_path": str, "labels_path": str}), stage,
                       FILE_COLUMNS)
    for c in ("focus_z_lo", "focus_z_hi"):
        df[c] = df[c].astype("Int64") if c in df else pd.Series(pd.NA, index=df.index, dtype="Int64")
    return df


def read_stage_fov(row) -> FOV:
    """One written FOV of :func:`read_fovs` (a row with absolute paths) as a :class:`FOV`."""
    vol = read_volume(row["path"])
    truth = read_volume(row["truth_path"]) if row["truth_path"] else None
    labels = read_labels(row["labels_path"]) if row.get("labels_path", "") else None
    focus = None
    if not (pd.isna(row["focus_z_lo"]) or pd.isna(row["focus_z_hi"])):
        focus = (int(row["focus_z_lo"]), int(row["focus_z_hi"]))
    pixel_size = (float(row["pixel_size_z"]), float(row["pixel_size_y"]), float(row["pixel_size_x"]))
    return FOV(str(row["fov_id"]), row["gene"], row["structure"], vol[:1], vol[1:], pixel_size, truth, focus,
               row.get("fov_path", ""), int(row.get("cells", 1)), labels)


def stage_summary(fovs: pd.DataFrame, voxels_per_fov: int = 4000, seed: int = 0):
    """What notebook 01_data plots, reading each written FOV once: a random sample of voxel values
    ``{channel: {structure: values}}`` (brightfield, then TARGETS; only FOVs that carry the
    channel) and the bool ``[n_fovs, 6]`` matrix of carried target channels.

    Args:
        fovs: :func:`read_fovs` (absolute paths).
        voxels_per_fov: voxels sampled per FOV and channel.
    """
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list]] = {c: {} for c in VOLUME_CHANNELS}
    carried = np.zeros((len(fovs), len(TARGETS)), bool)
    for i, (_, row) in enumerate(fovs.iterrows()):
        fov = read_stage_fov(row)
        bf, target = fov.bf, fov.target
        vol = np.concatenate([bf, target]).reshape(1 + len(TARGETS), -1)
        pick = rng.integers(0, vol.shape[1], size=min(voxels_per_fov, vol.shape[1]))
        for c, name in enumerate(samples):
            if not np.isnan(vol[c]).all():
                samples[name].setdefault(row["gene"], []).append(vol[c, pick])
        carried[i] = ~np.isnan(target).all(axis=(1, 2, 3))
    return {c: {s: np.concatenate(v) for s, v in per.items()} for c, per in samples.items()}, carried


def voxel_size(stage01: str | os.PathLike) -> tuple[float, float, float]:
    """The voxel size ``(z, y, x)`` in µm of a run's FOVs, from ``<stage01>/fovs.csv``.

    Args:
        stage01: the run's ``01_data`` folder (e.g. ``rundir.require(run_dir, "01_data")``).

    Raises:
        FileNotFoundError: no ``fovs.csv`` there. ValueError: the pixel-size columns are missing or
        the FOVs differ in voxel size (a figure draws them at one aspect, a model was trained at one).
    """
    f = Path(stage01) / FOVS_CSV
    if not f.exists():
        raise FileNotFoundError(f"no fovs.csv in {stage01}: run notebooks/01_data.ipynb first")
    table = pd.read_csv(f)
    missing = [c for c in VOXEL_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"{f}: no column(s) {missing}; the voxel size needs {list(VOXEL_COLUMNS)}")
    sizes = table[list(VOXEL_COLUMNS)].drop_duplicates()
    if len(sizes) != 1:
        raise ValueError(f"{f}: the FOVs have {len(sizes)} different voxel sizes {sizes.to_numpy().tolist()}; "
                         "a figure or a model needs one")
    return tuple(float(v) for v in sizes.iloc[0])


def brightfield_contrast(bf: np.ndarray) -> np.ndarray:
    """The relative contrast of each brightfield slice: the standard deviation of ``I / mean(I) - 1``
    over the slice (``bf``: ``[1, Z, Y, X]`` or ``[Z, Y, X]``), so slices of different brightness compare."""
    v = bf.reshape(bf.shape[-3:]).astype(np.float64)
    return (v / v.mean(axis=(1, 2), keepdims=True) - 1).std(axis=(1, 2))


def contrast_through_focus(contrast: np.ndarray, focus_z: tuple[int, int] | None, pixel_z_um: float) -> str:
    """Where a FOV's brightfield contrast (:func:`brightfield_contrast`) is weakest, and its mean inside
    and outside the true in-focus range, in a sentence: a weak phase object's contrast falls in
    focus, cells that also absorb or scatter keep contrast there."""
    low = int(np.argmin(contrast))
    text = f"In this FOV the relative contrast is weakest at z = {low * pixel_z_um:.1f} µm ({contrast[low]:.3f})"
    if focus_z is None:
        return text + "; real data give no true in-focus range to compare with."
    inside = np.zeros(len(contrast), bool)
    inside[focus_z[0]:focus_z[1]] = True
    text += f", {'inside' if inside[low] else 'outside'} the true in-focus range"
    if inside.all() or not inside.any():
        return text + "; the stack has no slice on the other side of that range to compare with."
    c_in, c_out = contrast[inside].mean(), contrast[~inside].mean()
    trend = ("lower in focus on average, as for a weak phase object" if c_in < c_out else
             "higher in focus on average: the contrast does not vanish in focus in this simulation")
    return (text + f". Its mean is {c_in:.3f} over the slices in that range and {c_out:.3f} over the others (the "
            f"empty margins above and below the cells included): {trend}.")

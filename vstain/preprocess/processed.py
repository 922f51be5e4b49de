"""The processed training set: per-FOV volumes, a manifest with the split, and random 3D crops.

A processed FOV is one float32 OME-TIFF of shape ``[7, Z, Y, X]``: channel 0 the focus-cropped
brightfield (z-scored per FOV), channels 1-6 the targets in :data:`vstain.channels.TARGETS` order
(denoised, z-scored per channel and FOV, NaN where the FOV carries no label). On simulated data a
second file ``<fov_id>_truth.tif`` holds the clean six-channel truth ``[6, Z, Y, X]``, normalised
the same way, and a third ``<fov_id>_labels.tif`` the true instances, uint16 ``[2, Z, Y, X]``
(cells, nuclei; cropped to the same focus window, never normalised). ``manifest.csv`` lists
``fov_id, gene, structure, split, path, truth_path, labels_path`` (empty where a FOV has no such file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import tifffile
import torch
from torch.utils.data import Dataset

from vstain.channels import LABEL_CHANNELS, TARGETS, VOLUME_CHANNELS
from vstain.volumes import read_labels, read_volume, resolve_paths, write_labels, write_volume

SPLITS = ("train", "val", "test")
SAMPLINGS = ("uniform", "balanced")
MANIFEST_CSV = "manifest.csv"
MANIFEST_COLUMNS = ("fov_id", "gene", "structure", "path", "truth_path", "labels_path")  # plus split


def zscore(a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Zero mean, unit standard deviation over the whole array; NaN arrays stay NaN."""
    a = a.astype(np.float32)
    if np.isnan(a).all():
        return a
    return (a - np.nanmean(a)) / (np.nanstd(a) + eps)


def split_fovs(df: pd.DataFrame, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """Assign each FOV to train/val/test, stratified by ``structure``, seeded.

    Every structure with at least three FOVs appears in every split (one each at least); the rest
    follow ``fractions``.
    """
    rng = np.random.default_rng(seed)
    split = pd.Series(index=df.index, dtype=object)
    for _, group in df.groupby("structure", sort=True):
        idx = rng.permutation(group.index.to_numpy())
        n = len(idx)
        if n < 3:
            raise ValueError(
                f"structure '{group['structure'].iloc[0]}' has {n} FOVs: at least 3 are needed "
                "to put one in each of train/val/test (raise n_per_structure)"
            )
        n_val = max(1, int(round(fractions[1] * n)))
        n_test = max(1, int(round(fractions[2] * n)))
        n_train = n - n_val - n_test
        if n_train < 1:
            n_train, n_val = 1, n - 1 - n_test
        split[idx[:n_train]] = "train"
        split[idx[n_train:n_train + n_val]] = "val"
        split[idx[n_train + n_val:]] = "test"
    return split


def open_volume(path: str | Path, channels: int | None = None) -> np.ndarray:
    """A ``[C, Z, Y, X]`` volume file, memory-mapped when the file allows it (uncompressed, as
    :func:`vstain.volumes.write_volume` writes), else read whole; ``channels``: the ``C`` expected
    (``None``: any). Slicing a memory-mapped volume reads only the slice from disk."""
    try:
        vol = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed or tiled: read it whole
        vol = read_volume(path)
    if vol.ndim != 4 or (channels is not None and vol.shape[0] != channels):
        want = f"[{channels}, Z, Y, X]" if channels is not None else "[C, Z, Y, X]"
        raise ValueError(f"{path}: expected a {want} volume, got {vol.shape}")
    return vol


def check_channels(channels) -> tuple[str, ...]:
    """``channels`` as a tuple of distinct :data:`vstain.channels.TARGETS` names (empty: all six)."""
    channels = tuple(channels or ())
    bad = [c for c in channels if c not in TARGETS]
    if bad or len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct names of {TARGETS}, got {list(channels)}")
    return channels


def labelled_targets(path: str | Path) -> set[str]:
    """The target channels a processed FOV carries a label for (its first voxel is not NaN: the
    processed set writes a channel whole or all NaN). Reads one voxel per channel."""
    vol = open_volume(path, 1 + len(TARGETS))
    return {name for c, name in enumerate(TARGETS, 1) if np.isfinite(vol[c, 0, 0, 0])}


def read_manifest(stage: str | Path) -> pd.DataFrame:
    """The processed set's manifest, with ``path``/``truth_path``/``labels_path`` made absolute
    ("" where a FOV has no clean truth or no true labels)."""
    stage = Path(stage)
    f = stage / MANIFEST_CSV
    if not f.exists():
        raise FileNotFoundError(f"no processed-set manifest at {f}: run notebooks/03_denoising.ipynb first")
    df = pd.read_csv(f, dtype={"fov_id": str, "truth_path": str, "labels_path": str})
    return resolve_paths(df, stage, ("path", "truth_path", "labels_path"))


def one_per_structure(manifest: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
    """The first FOV of each tagged structure, in the manifest's order (at most ``n`` of them), so a
    gallery shows every structure's own label at least once."""
    return manifest.groupby("structure", sort=False).head(1).head(n)


def load_fov(row) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One processed FOV: brightfield ``[1,Z,Y,X]``, target ``[6,Z,Y,X]`` (NaN = no label),
    and the clean truth ``[6,Z,Y,X]`` where the simulator provided it, else ``None``."""
    vol = read_volume(row["path"])
    if vol.shape[0] != 1 + len(TARGETS):
        raise ValueError(f"{row['path']}: expected {1 + len(TARGETS)} channels, got {vol.shape[0]}")
    truth = None
    tp = row.get("truth_path", "") if hasattr(row, "get") else ""
    if isinstance(tp, str) and tp:
        truth = read_volume(tp)
    return vol[:1], vol[1:], truth


def load_labels(row) -> np.ndarray | None:
    """The true instances of one processed FOV, uint16 ``[2, Z, Y, X]`` (:data:`LABEL_CHANNELS`:
    cells, nuclei), or ``None`` where the FOV has none (real data)."""
    lp = row.get("labels_path", "") if hasattr(row, "get") else ""
    return read_labels(lp) if isinstance(lp, str) and lp else None


class ProcessedCrops(Dataset):
    """Random 3D crops with random flips from one split of the processed set.

    Args:
        stage: the ``03_denoising`` stage folder (holds ``manifest.csv``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        crop: crop size ``(Z, Y, X)``; each must fit every FOV of the split.
        samples: crops per epoch (the dataset's length).
        flips: random flips along Y and X when True. Never along Z: brightfield phase contrast
            changes sign through focus, so a Z-flipped stack would pair the opposite contrast
            with the same target.
        seed: base seed; crop ``i`` of epoch ``e`` is drawn from ``(seed, e, i)``, so a resumed run
            sees the same crops as an uninterrupted one.
        sampling: ``"uniform"`` (default: every FOV equally often) or ``"balanced"`` (a tagged
            structure first, each equally often, then one of its FOVs: on a set with unequal FOV
            counts per structure, each tagged structure is labelled in the same share of crops).
        channels: the target channels returned, as :data:`vstain.channels.TARGETS` names, in that
            order (default: all six). Only FOVs that carry a label for every one of them are used.

    Returns ``(x [1,z,y,x], y [C,z,y,x])`` float32 tensors (``C`` = 6 by default); ``y`` holds NaN
    for missing labels.
    """

    def __init__(self, stage, split="train", crop=(16, 64, 64), samples=64, flips=True, seed=0,
                 sampling: str = "uniform", channels: tuple[str, ...] = ()):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.channels = check_channels(channels)
        df = read_manifest(stage)
        df = df[df["split"] == split]
        if channels:
            df = df[[all(c in labelled_targets(p) for c in self.channels) for p in df["path"]]]
        if df.empty:
            only = f" with labels for {list(self.channels)}" if channels else ""
            raise ValueError(f"the processed set at {stage} has no FOV{only} in split '{split}'")
        # each crop maps its FOV's file and lets it go: a split larger than RAM (the full profile) is
        # read crop by crop, and the pages a crop touched leave the process with it
        self.paths, self.ids = df["path"].tolist(), df["fov_id"].tolist()
        self.crop = tuple(int(c) for c in crop)
        self.shapes = []
        for fid, path in zip(self.ids, self.paths):
            shape = open_volume(path, 1 + len(TARGETS)).shape[1:]
            if any(c > s for c, s in zip(self.crop, shape)):
                raise ValueError(f"crop {self.crop} does not fit FOV {fid} of shape {shape} (Z, Y, X)")
            self.shapes.append(shape)
        self.samples, self.flips, self.seed, self.epoch = int(samples), flips, int(seed), 0
        self.sampling = sampling
        # FOV indices per tagged structure, for balanced sampling
        self.groups = [np.flatnonzero(df["structure"].to_numpy() == s) for s in sorted(set(df["structure"]))]
        self.index = [1 + TARGETS.index(c) for c in self.channels] if self.channels else slice(1, None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        if self.sampling == "balanced":
            k = rng.choice(self.groups[rng.integers(len(self.groups))])
        else:
            k = rng.integers(len(self.paths))
        start = [rng.integers(0, s - c + 1) for c, s in zip(self.crop, self.shapes[k])]
        sl = tuple(slice(s, s + c) for s, c in zip(start, self.crop))
        c = open_volume(self.paths[k])[(slice(None), *sl)]
        if self.flips:
            for ax in (2, 3):
                if rng.random() < 0.5:
                    c = np.flip(c, axis=ax)
        c = torch.from_numpy(np.array(c, dtype=np.float32))
        return c[:1], c[self.index]


def write_processed_fov(stage: str | Path, record: dict) -> dict:
    """Normalise and write one processed FOV as soon as it is made (z-score per channel and FOV).

    Args:
        stage: the processed set's folder.
        record: ``fov_id, gene, structure, bf [Z,Y,X], target [6,Z,Y,X]`` (NaN = no label) and
            optionally ``truth [6,Z,Y,X]`` and ``labels`` (uint16 ``[2,Z,Y,X]``, written as they are).

    Returns:
        its manifest row (:data:`MANIFEST_COLUMNS`; paths relative to ``stage``) for
        :func:`write_manifest`.
    """
    stage = Path(stage)
    fid = str(record["fov_id"])
    vol = np.concatenate([zscore(record["bf"])[None], *(zscore(c)[None] for c in record["target"])])
    rel = f"processed/{fid}.tif"
    write_volume(stage / rel, vol, list(VOLUME_CHANNELS))
    del vol
    trel = ""
    if record.get("truth") is not None:
        trel = f"processed/{fid}_truth.tif"
        write_volume(stage / trel, np.stack([zscore(c) for c in record["truth"]]), list(TARGETS))
    lrel = ""
    if record.get("labels") is not None:
        lrel = f"processed/{fid}_labels.tif"
        write_labels(stage / lrel, record["labels"], LABEL_CHANNELS)
    return {"fov_id": fid, "gene": record["gene"], "structure": record["structure"], "path": rel, "truth_path": trel,
            "labels_path": lrel}


def write_manifest(stage: str | Path, rows: list[dict], seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> pd.DataFrame:
    """Split the written FOVs by FOV, stratified by structure (:func:`split_fovs`), write
    ``manifest.csv`` and return it. ``rows`` are :func:`write_processed_fov`'s."""
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    if df.empty:
        raise ValueError(f"no processed FOV to list in the manifest of {stage}")
    df.insert(3, "split", split_fovs(df, fractions, seed))
    df.to_csv(Path(stage) / MANIFEST_CSV, index=False)
    return df


def write_processed(stage: str | Path, records: Iterable[dict], seed: int = 0,
                    fractions=(0.7, 0.15, 0.15)) -> pd.DataFrame:
    """Write a processed set: every record (:func:`write_processed_fov`) as it comes, then the
    manifest (:func:`write_manifest`). ``records`` may be a generator, so that one FOV at a time is
    in memory. Returns the manifest."""
    return write_manifest(stage, [write_processed_fov(stage, r) for r in records], seed, fractions)

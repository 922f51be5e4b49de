"""The patches that the classifier learns from and scores (thesis 4.1): where they sit, which
channels are scored, and how a patch is standardised.

Every patch is a ``patch``-sized box on a regular grid of one channel of one FOV.
**Background rule**: a channel's foreground is the set of voxels above the Otsu threshold of that
channel's whole FOV volume (of the *reference*: the real target, or the clean truth); a patch is
kept only if it holds foreground and its foreground fraction is at least ``min_foreground_ratio``
times the fraction over the whole FOV channel. Relative to the FOV, the rule suits dense channels
(membrane: a third of the voxels) and sparse ones (nucleoli: under 1 %) alike. It is applied to
the reference, never to a prediction, so every model is scored at the same places.

Which generated channels are scored. ``reference="target"`` (Table 4.1): the labelled channels of
each FOV, the only ones where a measured patch exists to place the patch and to compare against; each
generated patch's true class is the channel it was generated for. ``reference="truth"`` (simulated
data only): all six generated channels of every FOV, placed by the clean truth, the truth patch
serving as the measured patch of the distance.

Each patch is standardised (zero mean, unit standard deviation) before the network when
``patch_norm`` is on, so the classifier judges shape and texture rather than a FOV's brightness.
The rule reads its settings from a :class:`PatchRule` (the classifier's config is one), so training
(:mod:`vstain.evaluate.classifier`) and scoring (:mod:`vstain.evaluate.perceptual`) cut the same patches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from skimage.filters import threshold_otsu

from vstain.channels import TARGETS
from vstain.preprocess.processed import load_fov, read_manifest, read_volume

REAL = "Measured"  # the model name of the measured targets' own patches in score tables


class PatchRule(Protocol):
    """The settings the patch rule reads (:class:`vstain.evaluate.classifier.ClassifierConfig` has them)."""

    patch: tuple[int, int, int]
    train_step: tuple[int, int, int]
    eval_step: tuple[int, int, int]
    min_foreground_ratio: float
    pool_per_class: int
    classes: tuple[str, ...]
    seed: int


def grid_starts(shape, patch, step) -> list[tuple[int, int, int]]:
    """Corners of a regular grid of ``patch`` boxes inside ``shape`` (Z, Y, X)."""
    if any(p > s for p, s in zip(patch, shape)):
        raise ValueError(f"patch {tuple(patch)} does not fit a volume of shape {tuple(shape)} (Z, Y, X)")
    axes = [range(0, s - p + 1, st) for s, p, st in zip(shape, patch, step)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def foreground(ref: np.ndarray) -> np.ndarray:
    """Voxels of ``ref`` ``[Z,Y,X]`` above its Otsu threshold (none for a constant volume)."""
    return ref > threshold_otsu(ref) if np.ptp(ref) > 0 else np.zeros(ref.shape, bool)


def foreground_starts(ref: np.ndarray, patch, step, ratio: float) -> list[tuple[int, int, int]]:
    """Grid corners whose patch of ``ref`` ``[Z,Y,X]`` passes the background rule (module docstring)."""
    fg = foreground(ref)
    least = ratio * fg.mean()
    keep = []
    for z, y, x in grid_starts(ref.shape, patch, step):
        f = fg[z:z + patch[0], y:y + patch[1], x:x + patch[2]].mean()
        if f > 0 and f >= least:
            keep.append((z, y, x))
    return keep


def cut(vol: np.ndarray, starts, patch) -> np.ndarray:
    """Patches ``[N, pz, py, px]`` of a ``[Z,Y,X]`` volume at ``starts``."""
    pz, py, px = patch
    out = np.empty((len(starts), pz, py, px), np.float32)
    for i, (z, y, x) in enumerate(starts):
        out[i] = vol[z:z + pz, y:y + py, x:x + px]
    return out


def normalise(p: torch.Tensor, on: bool = True) -> torch.Tensor:
    """Standardise each patch of ``[N,1,Z,Y,X]`` (when ``on``)."""
    if not on:
        return p
    dims = tuple(range(1, p.ndim))
    return (p - p.mean(dims, keepdim=True)) / (p.std(dims, keepdim=True) + 1e-6)


def _fovs(stage_in, split):
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")
    return df


def _reference(row, target, truth, reference):
    """The reference volume and the channels to score, for one FOV."""
    if reference == "target":
        return target, [c for c in range(target.shape[0]) if np.isfinite(target[c]).all()]
    if reference == "truth":
        if truth is None:
            raise ValueError(f"FOV {row['fov_id']} has no clean truth: reference='truth' needs simulated data")
        return truth, list(range(truth.shape[0]))
    raise ValueError(f"reference must be 'target' or 'truth', got {reference!r}")


def training_pool(stage_in, cfg: PatchRule, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Measured training patches ``[N,pz,py,px]`` and their classes ``[N]``: every labelled channel of
    every FOV of ``split`` gives foreground patches of its class, at most ``pool_per_class`` per
    class, spread evenly over the FOVs that carry it."""
    df = _fovs(stage_in, split)
    rng = np.random.default_rng((cfg.seed, 1))
    # pass 1: the foreground patches of every labelled channel (one FOV in memory at a time)
    starts: dict[tuple[int, int], list] = {}
    for i, (_, row) in enumerate(df.iterrows()):
        _, target, _ = load_fov(row)
        for c in _reference(row, target, None, "target")[1]:
            s = foreground_starts(target[c], cfg.patch, cfg.train_step, cfg.min_foreground_ratio)
            if s:
                starts[i, c] = s
    n_fovs = np.bincount([c for _, c in starts], minlength=len(cfg.classes))
    for c in np.flatnonzero(n_fovs == 0):
        raise ValueError(f"no training patch of class '{cfg.classes[c]}' in split '{split}' passes the "
                         f"background rule (min_foreground_ratio={cfg.min_foreground_ratio}): lower it or add FOVs")
    # pass 2: cut an even share of each class's pool from every FOV that carries it
    xs, ys = [], []
    for i, (_, row) in enumerate(df.iterrows()):
        chans = [c for (j, c) in starts if j == i]
        if not chans:
            continue
        _, target, _ = load_fov(row)
        for c in chans:
            s = starts[i, c]
            pick = rng.permutation(len(s))[:max(1, cfg.pool_per_class // n_fovs[c])]
            xs.append(cut(target[c], [s[k] for k in pick], cfg.patch))
            ys.append(np.full(len(pick), c))
    return np.concatenate(xs), np.concatenate(ys)


def fov_scoring_patches(stage_in, split: str, cfg: PatchRule, pred_dirs: dict[str, str | Path] | None = None,
                        reference: str = "target"):
    """FOV by FOV (one FOV's volumes in memory at a time), the measured (reference) patches of one
    split and, for every model, the generated patches at the same places. Yields ``(meta,
    patches)`` per FOV with a kept patch: ``meta`` a table ``fov_id, channel, class, z, y, x`` and
    ``patches`` a dict ``{REAL: [n,pz,py,px], model: [n,pz,py,px], ...}``."""
    pred_dirs = pred_dirs or {}
    for _, row in _fovs(stage_in, split).iterrows():
        _, target, truth = load_fov(row)
        ref, chans = _reference(row, target, truth, reference)
        preds = {m: read_volume(Path(d) / f"{row['fov_id']}.tif") for m, d in pred_dirs.items()}
        for m, p in preds.items():
            if p.shape != ref.shape:
                raise ValueError(f"{m} prediction of FOV {row['fov_id']} has shape {p.shape}, expected {ref.shape}")
        metas, out = [], {REAL: [], **{m: [] for m in pred_dirs}}
        for c in chans:
            starts = foreground_starts(ref[c], cfg.patch, cfg.eval_step, cfg.min_foreground_ratio)
            if not starts:
                continue
            metas.append(pd.DataFrame({"fov_id": row["fov_id"], "channel": TARGETS[c], "class": c,
                                       "z": [s[0] for s in starts], "y": [s[1] for s in starts],
                                       "x": [s[2] for s in starts]}))
            out[REAL].append(cut(ref[c], starts, cfg.patch))
            for m, p in preds.items():
                out[m].append(cut(p[c], starts, cfg.patch))
        del target, truth, ref, preds
        if metas:
            yield pd.concat(metas, ignore_index=True), {k: np.concatenate(v) for k, v in out.items()}


def no_patch_error(split: str, cfg: PatchRule) -> ValueError:
    return ValueError(f"no patch of split '{split}' passes the background rule "
                      f"(min_foreground_ratio={cfg.min_foreground_ratio})")


def scoring_patches(stage_in, split: str, cfg: PatchRule, pred_dirs: dict[str, str | Path] | None = None,
                    reference: str = "target"):
    """:func:`fov_scoring_patches` of every FOV of the split, concatenated: ``(meta, patches)``
    with ``patches`` ``{REAL: [N,pz,py,px], model: [N,pz,py,px], ...}`` (the patches of the whole
    split in memory; the scores go FOV by FOV instead)."""
    parts = list(fov_scoring_patches(stage_in, split, cfg, pred_dirs, reference))
    if not parts:
        raise no_patch_error(split, cfg)
    return (pd.concat([m for m, _ in parts], ignore_index=True),
            {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]})

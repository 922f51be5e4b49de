"""What the predictions are good for: segmented instances scored against the true ones, whether
predicted signal sits in the right compartment, and the noise ceiling of the measured targets.

* :func:`match_instances` compares a predicted label image with the true instances (on simulated
  data the simulator's, :mod:`vstain.data.simulate`): IoU of matched pairs, F1 at IoU 0.5 and averaged
  over IoU 0.5:0.05:0.9, count and volume errors. :func:`instance_table` runs it for every source
  of one FOV (``"truth"``, ``"target"``, model names) into a long table.
* :func:`plausibility` asks, for channels a FOV never measured, what fraction of a channel's
  signal lies in the compartment where the structure belongs (nucleoli inside nuclei, the
  envelope on the nuclear surface, ...); the same function on the clean truth gives the reference.
* :func:`noise_ceiling`: per channel, the Pearson correlation of the measured (denoised) target
  with the clean truth, the best PCC a perfect predictor could score against that target
  (pytorch_fnet's ``c_max``).

Layout: volumes ``C Z Y X`` in :data:`CHANNELS` order, labels ``Z Y X`` (0 = background). This
module imports nothing of the project; labels come from :mod:`vstain.evaluate.segment` or the
simulator.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.segmentation import find_boundaries

# The channel order of the volumes (the project's TARGETS).
CHANNELS: tuple[str, ...] = ("dna", "membrane", "mito", "envelope", "actomyosin", "nucleoli")
IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.91, 0.05), 2))  # 0.5, 0.55, ..., 0.9
# Where each channel's signal belongs, in the compartments of :func:`compartments`.
COMPARTMENT = {"dna": "nucleus", "membrane": "cell_boundary", "mito": "outside_nucleus",
               "envelope": "nuclear_boundary", "actomyosin": "outside_nucleus", "nucleoli": "nucleus"}


def _labels(x: np.ndarray, name: str) -> np.ndarray:
    """An integer, non-negative label image as int64."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer) or (x.size and x.min() < 0):
        raise ValueError(f"{name} must be a non-negative integer label image, got dtype {x.dtype}")
    return x.astype(np.int64)


def iou_matrix(pred_labels: np.ndarray, true_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true with every predicted instance, from the contingency table of label pairs.

    Args:
        pred_labels: int labels ``Z Y X`` (or any shape), 0 = background.
        true_labels: int labels of the same shape.

    Returns:
        ``(iou, true_sizes, pred_sizes)``: float ``[n_true, n_pred]`` over the instances present
        (in increasing id order) and their voxel counts.
    """
    pred, true = _labels(pred_labels, "pred_labels"), _labels(true_labels, "true_labels")
    if pred.shape != true.shape:
        raise ValueError(f"pred_labels has shape {pred.shape}, true_labels {true.shape}")
    t_ids, t_idx, t_sizes = np.unique(true, return_inverse=True, return_counts=True)
    p_ids, p_idx, p_sizes = np.unique(pred, return_inverse=True, return_counts=True)
    pair = t_idx.ravel() * len(p_ids) + p_idx.ravel()
    table = np.bincount(pair, minlength=len(t_ids) * len(p_ids)).reshape(len(t_ids), len(p_ids))
    # drop the background row and column
    t_keep, p_keep = t_ids > 0, p_ids > 0
    inter = table[np.ix_(t_keep, p_keep)]
    t_sizes, p_sizes = t_sizes[t_keep], p_sizes[p_keep]
    union = t_sizes[:, None] + p_sizes[None, :] - inter
    return inter / np.maximum(union, 1), t_sizes, p_sizes


def drop_edge(labels: np.ndarray) -> np.ndarray:
    """``labels Z Y X`` without the instances that touch the lateral (Y, X) border of the FOV."""
    labels = np.array(labels)
    rim = np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()])
    labels[np.isin(labels, rim[rim > 0])] = 0
    return labels


def match_instances(pred_labels: np.ndarray, true_labels: np.ndarray,
                    thresholds: Sequence[float] = IOU_THRESHOLDS, exclude_edge: bool = False) -> dict[str, float]:
    """Instance scores of a predicted against the true label image.

    A true and a predicted instance match when their IoU exceeds 0.5; above 0.5 each instance has
    at most one partner, so the matching is unique without an assignment step.

    Args:
        pred_labels: int labels ``Z Y X``, 0 = background.
        true_labels: int labels of the same shape.
        thresholds: IoU thresholds (each >= 0.5) over which ``f1_mean`` averages; default
            0.5, 0.55, ..., 0.9.
        exclude_edge: drop the instances that touch the FOV's lateral border from both images
            first (:func:`drop_edge`), as the Allen hiPSC single-cell dataset excludes edge cells:
            a cell cut by the border may have no nucleus in the FOV to seed it. Default False.

    Returns:
        dict: ``n_true``, ``n_pred``; ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` at
        IoU > 0.5; ``f1_mean`` (mean F1 over ``thresholds``); ``mean_iou`` (mean over the true
        instances of the IoU with their match, 0 when unmatched); ``count_error`` (n_pred - n_true)
        and ``count_error_rel`` (over n_true); ``volume_error`` (mean of |V_pred - V_true| / V_true
        over matched pairs) and ``volume_bias`` (the same, signed). Undefined ratios are NaN; F1
        of two empty images is 1.
    """
    if min(thresholds) < 0.5:
        raise ValueError(f"IoU thresholds must be >= 0.5 for a unique matching, got {min(thresholds)}")
    if exclude_edge:
        pred_labels, true_labels = drop_edge(pred_labels), drop_edge(true_labels)
    iou, t_sizes, p_sizes = iou_matrix(pred_labels, true_labels)
    n_true, n_pred = iou.shape

    def f1_at(t: float) -> float:
        tp = int((iou > t).sum())
        return 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0

    ti, pi = np.nonzero(iou > 0.5)
    tp = len(ti)
    rel_vol = (p_sizes[pi] - t_sizes[ti]) / t_sizes[ti]
    best = np.zeros(n_true)
    best[ti] = iou[ti, pi]
    nan = float("nan")
    return {"n_true": n_true, "n_pred": n_pred, "tp": tp, "fp": n_pred - tp, "fn": n_true - tp,
            "precision": tp / n_pred if n_pred else nan, "recall": tp / n_true if n_true else nan,
            "f1": f1_at(0.5), "f1_mean": float(np.mean([f1_at(t) for t in thresholds])),
            "mean_iou": float(best.mean()) if n_true else nan,
            "count_error": n_pred - n_true, "count_error_rel": (n_pred - n_true) / n_true if n_true else nan,
            "volume_error": float(np.abs(rel_vol).mean()) if tp else nan,
            "volume_bias": float(rel_vol.mean()) if tp else nan}


def instance_table(fov_id: str | int, true: Mapping[str, np.ndarray],
                   sources: Mapping[str, Mapping[str, np.ndarray]], exclude_edge: bool = False) -> pd.DataFrame:
    """The long table of :func:`match_instances` for one FOV and every source.

    Args:
        fov_id: the FOV's id.
        true: true labels per object kind, e.g. ``{"nuclei": ..., "cells": ...}``.
        sources: per source (``"truth"``, ``"target"``, a model name) the segmented labels per
            object kind; an object kind missing from ``true`` is an error.
        exclude_edge: passed to :func:`match_instances`.

    Returns:
        DataFrame with columns ``fov_id, source, object, metric, value``.
    """
    rows = []
    for source, objects in sources.items():
        for obj, labels in objects.items():
            if obj not in true:
                raise ValueError(f"source {source!r} has {obj!r} labels but no true {obj!r} were given "
                                 f"(true has {sorted(true)})")
            for metric, value in match_instances(labels, true[obj], exclude_edge=exclude_edge).items():
                rows.append({"fov_id": fov_id, "source": source, "object": obj, "metric": metric,
                             "value": float(value)})
    return pd.DataFrame(rows, columns=["fov_id", "source", "object", "metric", "value"])


def _near_boundary(labels: np.ndarray, width_um: float, vox: np.ndarray) -> np.ndarray:
    """Voxels within ``width_um`` µm of a boundary voxel (a voxel whose face neighbour carries
    another label, background included), on both sides of the boundary."""
    edge = find_boundaries(labels, mode="inner")
    if not edge.any():
        return edge
    return ndimage.distance_transform_edt(~edge, sampling=vox) <= width_um


def compartments(nuclei_labels: np.ndarray, cell_labels: np.ndarray, voxel_size_zyx: Sequence[float],
                 shell_um: float = 0.5) -> dict[str, np.ndarray]:
    """The bool ``Z Y X`` compartments of :data:`COMPARTMENT`: ``nucleus``, ``outside_nucleus``,
    ``nuclear_boundary`` (within ``shell_um`` µm of a nuclear surface, both sides) and
    ``cell_boundary`` (within ``shell_um`` of a cell's surface: lateral, apical and basal)."""
    vox = np.asarray(voxel_size_zyx, np.float64)
    nuclei = _labels(nuclei_labels, "nuclei_labels")
    cells = _labels(cell_labels, "cell_labels")
    if nuclei.shape != cells.shape or nuclei.ndim != 3:
        raise ValueError(f"nuclei_labels {nuclei.shape} and cell_labels {cells.shape} must be one Z Y X shape")
    if vox.shape != (3,) or not (vox > 0).all():
        raise ValueError(f"voxel_size_zyx must be three positive µm values (z, y, x), got {voxel_size_zyx}")
    inside = nuclei > 0
    return {"nucleus": inside, "outside_nucleus": ~inside,
            "nuclear_boundary": _near_boundary(inside, shell_um, vox),
            "cell_boundary": _near_boundary(cells, shell_um, vox)}


def plausibility(pred6: np.ndarray, nuclei_labels: np.ndarray, cell_labels: np.ndarray,
                 voxel_size_zyx: Sequence[float] = (0.6, 0.3, 0.3), shell_um: float = 0.5,
                 channels: Sequence[str] = CHANNELS) -> dict[str, float]:
    """Per channel, the fraction of its signal that lies in the compartment where it belongs.

    A channel's signal is its positive part after subtracting its median, ``max(x - median, 0)``:
    the median is the level of the background and diffuse cytoplasm that fills most of a FOV, so
    the fraction does not depend on the channel's offset or scale (raw, z-scored, predicted). The
    compartments (:func:`compartments`) come from the instance labels, true or segmented.

    Args:
        pred6: channels ``C Z Y X`` in ``channels`` order (a prediction or the clean truth).
        nuclei_labels: int labels ``Z Y X`` of the nuclei.
        cell_labels: int labels ``Z Y X`` of the cells.
        voxel_size_zyx: voxel size in µm.
        shell_um: half width in µm of the nuclear and cell boundary shells (default 0.5: the
            envelope and membranes are thinner than the PSF, which spreads them over ~±0.5 µm).
        channels: the channel names (keys of :data:`COMPARTMENT`).

    Returns:
        ``{channel: fraction in [0, 1]}``; NaN for a channel that is all NaN (not labelled) or has
        no signal above its median.
    """
    x = np.asarray(pred6, np.float64)
    if x.ndim != 4 or x.shape[0] != len(channels):
        raise ValueError(f"pred6 must be C Z Y X with C = {len(channels)} channels {tuple(channels)}, got {x.shape}")
    unknown = [c for c in channels if c not in COMPARTMENT]
    if unknown:
        raise ValueError(f"no compartment is defined for channel(s) {unknown}; known: {sorted(COMPARTMENT)}")
    if x.shape[1:] != np.shape(nuclei_labels):
        raise ValueError(f"pred6 has Z Y X {x.shape[1:]}, nuclei_labels {np.shape(nuclei_labels)}")
    comp = compartments(nuclei_labels, cell_labels, voxel_size_zyx, shell_um)
    out = {}
    for name, ch in zip(channels, x):
        if np.isnan(ch).all():
            out[name] = float("nan")
            continue
        w = np.clip(ch - np.nanmedian(ch), 0, None)
        w[np.isnan(w)] = 0
        total = w.sum()
        out[name] = float(w[comp[COMPARTMENT[name]]].sum() / total) if total > 0 else float("nan")
    return out


def noise_ceiling(measured: np.ndarray, clean: np.ndarray, channels: Sequence[str] = CHANNELS) -> dict[str, float]:
    """Per channel, the Pearson correlation of the measured (denoised) target with the clean truth.

    Against a noisy target even a perfect prediction (the clean truth) scores less than 1; this is
    that bound (pytorch_fnet's ``c_max``). Channels that are all NaN in ``measured`` (not labelled
    in the FOV) are skipped.

    Args:
        measured: ``C Z Y X`` in ``channels`` order, NaN where a channel is not labelled.
        clean: ``C Z Y X`` the clean truth.
        channels: the channel names.

    Returns:
        ``{channel: PCC}`` for the labelled channels.
    """
    m, c = np.asarray(measured, np.float64), np.asarray(clean, np.float64)
    if m.shape != c.shape or m.ndim != 4 or m.shape[0] != len(channels):
        raise ValueError(f"measured {m.shape} and clean {c.shape} must both be C Z Y X with C = {len(channels)}")
    out = {}
    for name, a, b in zip(channels, m, c):
        if np.isnan(a).all():
            continue
        if np.isnan(a).any() or np.isnan(b).any():
            raise ValueError(f"channel {name!r} is partly NaN: a labelled channel must be finite")
        out[name] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    return out

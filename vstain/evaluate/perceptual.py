"""What the classifier says of generated patches: the F1clf of each model (thesis 4.1) and a deep
perceptual distance between each generated patch and the measured patch at the same place (thesis
4.3; LPIPS-style, Zhang et al. 2018, with uniform layer weights), from one pass of the network of
:mod:`vstain.evaluate.classifier` over the patches of :mod:`vstain.evaluate.patches`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vstain.channels import TARGETS

from .classifier import ClassifierConfig, autocast, confusion, f1_scores, features
from .patches import REAL, fov_scoring_patches, no_patch_error, normalise


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.norm(dim=1, keepdim=True) + 1e-10)


def lpips(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance ``[N]`` between two lists of :func:`features`: at each layer the
    activations are unit-normalised along channels at every voxel, the squared Euclidean distance
    is averaged over voxels, and the layers are averaged with equal weights (LPIPS learns these
    weights; here they are uniform). 0 for identical inputs, at most 4."""
    d = sum(((_unit(a) - _unit(b)) ** 2).sum(1).mean((1, 2, 3)) for a, b in zip(feats_a, feats_b))
    return d / len(feats_a)


@torch.no_grad()
def classify_and_compare(model, real: np.ndarray, fakes: dict[str, np.ndarray], cfg: ClassifierConfig,
                         device: str = "cpu", precision: str = "32-true", batch_size: int = 64):
    """One pass over aligned patch sets ``[N,pz,py,px]``: the class the classifier gives each real and
    each generated patch, and each generated patch's :func:`lpips` distance to its measured patch.

    Returns ``(classes, distances)``: dicts ``{REAL: [N], model: [N]}`` and ``{model: [N]}``."""
    model.eval().to(device)
    cls = {k: [] for k in (REAL, *fakes)}
    dist = {k: [] for k in fakes}
    for i in range(0, len(real), batch_size):
        sets = {REAL: real, **fakes}
        feats = {}
        for k, arr in sets.items():
            x = normalise(torch.from_numpy(arr[i:i + batch_size])[:, None].to(device), cfg.patch_norm)
            with autocast(device, precision):
                f = features(model, x)
                logits = model.fc(model.avgpool(f[-1]).flatten(1))
            feats[k] = [t.float() for t in f]
            cls[k].append(logits.float().argmax(1).cpu())
        for k in fakes:
            dist[k].append(lpips(feats[REAL], feats[k]).cpu())
    return ({k: torch.cat(v).numpy() for k, v in cls.items()}, {k: torch.cat(v).numpy() for k, v in dist.items()})


def perceptual_distance(model, real: np.ndarray, fake: np.ndarray, cfg: ClassifierConfig, device: str = "cpu",
                        batch_size: int = 64) -> np.ndarray:
    """The :func:`lpips` distance ``[N]`` of each patch of ``fake`` to the patch of ``real`` at the
    same index (both ``[N,pz,py,px]``)."""
    return classify_and_compare(model, real, {"fake": fake}, cfg, device, batch_size=batch_size)[1]["fake"]


def score_models(model, cfg: ClassifierConfig, stage_in, pred_dirs: dict[str, str | Path], split: str = "test",
                 reference: str = "target", device: str = "cpu", precision: str = "32-true") -> pd.DataFrame:
    """Classify measured patches and each model's generated patches at the same places, and measure the
    perceptual distance of each generated patch to its real one.

    Returns one row per patch and model (``REAL`` for the measured patches): ``model, fov_id, channel,
    class, z, y, x, predicted, perceptual`` (``perceptual`` is 0 for measured patches), measured patches
    first, then each model's. Scored FOV by FOV: one FOV's volumes and patches in memory at a time."""
    frames = {m: [] for m in (REAL, *pred_dirs)}
    for meta, p in fov_scoring_patches(stage_in, split, cfg, pred_dirs, reference):
        classes, dist = classify_and_compare(model, p[REAL], {m: p[m] for m in pred_dirs}, cfg, device, precision)
        for m in p:
            f = meta.copy()
            f.insert(0, "model", m)
            f["predicted"] = classes[m]
            f["perceptual"] = 0.0 if m == REAL else dist[m]
            frames[m].append(f)
    if not frames[REAL]:
        raise no_patch_error(split, cfg)
    return pd.concat([f for m in frames for f in frames[m]], ignore_index=True)


def summarise_scores(scores: pd.DataFrame, classes=TARGETS) -> pd.DataFrame:
    """Per ``(channel, model)``: ``f1clf`` (per-class F1 over that model's patches),
    ``perceptual_mean`` and ``perceptual_std`` (over patches) and ``n_patches``."""
    rows = []
    for m, g in scores.groupby("model", sort=False):
        f1 = f1_scores(confusion(g["class"], g["predicted"], len(classes)))
        for c, name in enumerate(classes):
            gc = g[g["class"] == c]
            if gc.empty:
                continue
            rows.append({"channel": name, "model": m, "f1clf": float(f1[c]),
                         "perceptual_mean": float(gc["perceptual"].mean()),
                         "perceptual_std": float(gc["perceptual"].std(ddof=0)), "n_patches": int(len(gc))})
    return pd.DataFrame(rows).set_index(["channel", "model"])


def confusion_by_model(scores: pd.DataFrame, classes=TARGETS) -> dict[str, np.ndarray]:
    """Confusion matrices (counts, row = true channel) per model of a :func:`score_models` table."""
    return {m: confusion(g["class"], g["predicted"], len(classes)) for m, g in scores.groupby("model", sort=False)}

"""What test-time augmentation buys: the accuracy of the flip-averaged prediction against the plain
one, and whether the flips' spread (:func:`vstain.inference.tta.predict_tta`) tells where the prediction is
wrong. Per FOV of a split and per channel, against the clean truth where it exists (simulated data)
or the measured target on its labelled channels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sstats

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.inference.infer import predict_volume
from vstain.inference.tta import predict_tta
from vstain.preprocess.processed import load_fov, read_manifest

from .metrics import pcc
from .stats import channel_verdict, compare, n_fovs

MAX_VOXELS_SPEARMAN = 200_000  # voxels sampled per channel for the rank correlation (seeded)


def tta_table(generator, stage_in, split: str = "test", max_voxels: int | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per FOV and channel: ``pcc_plain``, ``pcc_tta`` (against the reference) and
    ``spearman``, the rank correlation between the flips' standard deviation and the absolute error
    of the flip-averaged prediction (1: the spread orders voxels exactly by their error), plus
    ``reference`` (``truth`` or ``target``)."""
    rng = np.random.default_rng(seed)
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    rows = []
    for _, r in df.iterrows():
        x, target, truth = load_fov(r)
        ref, kind = (truth, "truth") if truth is not None else (target, "target")
        plain = predict_volume(generator, x, max_voxels=max_voxels)
        mean, std = predict_tta(generator, x, max_voxels=max_voxels)
        for c, name in enumerate(TARGETS):
            if np.isnan(ref[c]).all():
                continue
            err, sd = np.abs(mean[c] - ref[c]).ravel(), std[c].ravel()
            pick = rng.choice(err.size, size=min(err.size, MAX_VOXELS_SPEARMAN), replace=False)
            rho = sstats.spearmanr(sd[pick], err[pick]).statistic
            rows.append({"fov_id": r["fov_id"], "channel": name, "reference": kind,
                         "pcc_plain": pcc(plain[c], ref[c]), "pcc_tta": pcc(mean[c], ref[c]),
                         "spearman": float(rho)})
    return pd.DataFrame(rows)


def tta_gain(table: pd.DataFrame, n_resamples: int = 9999, seed: int = 0) -> pd.DataFrame:
    """Per channel, the paired PCC difference (TTA minus plain) over FOVs with its interval and
    verdict (:func:`vstain.evaluate.stats.compare`), beside the median Spearman correlation."""
    long = pd.concat([table.assign(model=m, value=table[f"pcc_{m}"]) for m in ("plain", "tta")])
    comp = compare(long.assign(metric="pcc"), "plain", "tta", higher_is_better=True, n_resamples=n_resamples, seed=seed)
    rho = table.groupby("channel")["spearman"].median()
    comp = comp.assign(spearman_median=comp["channel"].map(rho))
    return comp.iloc[np.argsort([TARGETS.index(c) for c in comp["channel"]], kind="stable")].reset_index(drop=True)


def tta_verdict(gain: pd.DataFrame) -> str:
    """Sentences from :func:`tta_gain`: per channel whether averaging the flips raised the PCC
    (paired interval over FOVs), and how well the spread ranks the errors."""
    parts = []
    for _, r in gain.iterrows():
        said = channel_verdict(r).replace("tta better", "TTA raises the PCC").replace("plain better", "TTA lowers the PCC")
        parts.append(f"{TARGET_LABELS[r['channel']]}: {said} (PCC {r['diff']:+.4f}; Spearman ρ of spread and "
                     f"error {r['spearman_median']:.2f})")
    return f"Flip averaging against a single pass ({n_fovs(gain['n'])}): " + "; ".join(parts) + "."

"""The classifier's own seed spread: the ``06_classifier`` recipe trained again with another seed, and
every model's F1clf and KID under both classifiers.

A realism verdict that rests on F1clf is only as firm as the classifier behind it. Two classifiers
that differ only in their seed (initial weights, the order of their patches, their augmentation)
score the same predictions differently; the difference, with an interval over resampled FOVs, is
the part of an F1clf gap that belongs to the classifier rather than to the models.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from vstain.channels import TARGETS
from vstain.evaluate import kid as kidlib
from vstain.evaluate.classifier import load_classifier, run_classifier_stage
from vstain.evaluate.comparison import f1_bootstrap, fov_confusions
from vstain.evaluate.perceptual import score_models
from vstain.evaluate.stats import decided


def second_classifier(stage_in, clf_dir, out_dir, seed: int, device: str = "cpu", precision: str = "32-true",
                      progress: bool = True):
    """Train the classifier of ``clf_dir`` again with ``seed`` into ``out_dir`` (skipped when a
    classifier of that config is already there) and return ``(model, cfg)``."""
    _, cfg = load_classifier(clf_dir, device)
    if int(seed) == int(cfg.seed):
        raise ValueError(f"seed {seed} is the seed of the classifier in {clf_dir}: a second seed must differ")
    cfg2 = replace(cfg, seed=int(seed))
    out = Path(out_dir)
    if (out / "classifier.pt").exists():
        model, have = load_classifier(out, device)
        if have == cfg2:
            return model, have
    run_classifier_stage(stage_in, out, cfg2, device, precision, progress)
    return load_classifier(out, device)


def classifier_spread(stage_in, pred_dirs: dict[str, Path], classifiers: dict[str, tuple], split: str = "test",
                      n_resamples: int = 999, confidence: float = 0.95, seed: int = 0, device: str = "cpu",
                      precision: str = "32-true") -> pd.DataFrame:
    """Each model's F1clf (per channel and macro over channels, ``"all"``) under two classifiers
    (``classifiers``: name -> ``(model, cfg)``, the first the reference), the difference second
    minus first with its interval over the same resampled FOVs, and the KID over all channels under
    each. Scored as Table 4.1: patches on the measured targets' foreground.

    Returns one row per ``(model, channel)``: ``f1_<name>`` for both, ``diff, low, high, n,
    decided``; and rows with ``channel == "KID"`` holding each classifier's KID in the same columns
    (no paired difference: the two feature spaces differ)."""
    (name_a, (clf_a, cfg_a)), (name_b, (clf_b, cfg_b)) = list(classifiers.items())
    models = list(pred_dirs)
    pairs = ((name_a, (clf_a, cfg_a)), (name_b, (clf_b, cfg_b)))
    scores = {n: score_models(c, g, stage_in, pred_dirs, split=split, reference="target", device=device,
                              precision=precision) for n, (c, g) in pairs}
    fovs = list(dict.fromkeys(scores[name_a]["fov_id"]))
    rows = []
    for model in models:
        conf = {n: fov_confusions(s, model, fovs) for n, s in scores.items()}
        own = set(scores[name_a].loc[scores[name_a]["model"] == model, "channel"])
        channels = [c for c in TARGETS if c in own]
        for channel in [*channels, "all"]:
            c = None if channel == "all" else TARGETS.index(channel)
            d, lo, hi, est = f1_bootstrap([conf[name_a], conf[name_b]], c, n_resamples, confidence, seed)
            rows.append({"model": model, "channel": channel, f"f1_{name_a}": est[0], f"f1_{name_b}": est[1],
                         "diff": d, "low": lo, "high": hi, "n": len(fovs),
                         "decided": decided({"ci_low": lo, "ci_high": hi, "n": len(fovs)}, confidence)})
    for n, (c, g) in pairs:
        meta, vectors = kidlib.patch_embeddings(c, g, stage_in, {m: Path(d) for m, d in pred_dirs.items()}, split,
                                                "target", device, precision)
        kt = kidlib.kid_table(meta, vectors, models, n_resamples=n_resamples, confidence=confidence, seed=seed)
        for _, r in kt[kt["channel"] == kidlib.ALL].iterrows():
            rows.append({"model": r["model"], "channel": "KID", f"f1_{n}": r["kid"], "low": r["low"],
                         "high": r["high"], "n": r["n"], "classifier": n})
    return pd.DataFrame(rows)


def spread_sentence(table: pd.DataFrame, names: tuple[str, str]) -> str:
    """The largest change of F1clf a second classifier seed makes, and on which model and channel;
    how many of the (model, channel) cells it changes detectably."""
    f1 = table[table["channel"] != "KID"].dropna(subset=["diff"])
    if f1.empty:
        return "No F1clf was scored under both classifiers."
    reach = f1.assign(reach=f1[["low", "high"]].abs().max(axis=1)).sort_values("reach", ascending=False).iloc[0]
    moved = int(f1["decided"].sum())
    return (f"The classifier trained with {names[1]} instead of {names[0]} changes F1clf by up to "
            f"{reach['reach']:.3f} (the reach of the largest interval: {reach['model']}, {reach['channel']}: "
            f"{reach['diff']:+.3f} [{reach['low']:+.3f}, {reach['high']:+.3f}], n = {int(reach['n'])} FOVs); "
            f"{moved} of {len(f1)} model-channel cells move detectably. An F1clf difference between two models "
            "smaller than this reach may belong to the classifier, not to the models.")

"""An ablation of the U-Net baseline's design choices at matched compute: which one holds back the
nucleoli and the mitochondria?

Data flow: the processed set (``03_denoising``) -> one U-Net per variant, each trained with
:func:`vstain.training.unet.run_unet_stage` into ``<out_dir>/<variant>/`` (:func:`run_ablation`) -> whole-FOV
predictions of the test split -> PCC and SSIM against the clean simulated truth per variant, channel
and FOV (:func:`score_variants`) -> paired differences to the baseline (:func:`compare_to_baseline`,
through :func:`vstain.evaluate.stats.compare`) -> a paragraph that names what matters
(:func:`findings_paragraph`).

Every variant changes one factor of the baseline, the book's U-Net (masked L1, InstanceNorm, Adam
2e-4, one joint six-channel model, crops drawn from every training FOV equally often):

- ``mse``, ``l1+mse``: the masked MSE, or the masked L1 and MSE summed, instead of the masked L1;
- ``batchnorm``: BatchNorm3d in the generator instead of InstanceNorm3d;
- ``lr1e-3``: Adam at 1e-3 instead of 2e-4;
- ``balanced``: each crop picks a tagged structure first, each equally often, then one of its FOVs.
  On a set with as many training FOVs of every structure (the simulated one) this draws from the
  same distribution as uniform crops, in another order: a yardstick of the crop order's noise;
- ``per-structure``: one single-output model per channel (Ounkomol et al. 2018), each trained only
  on the FOVs that carry a label for it.

Matched compute: every variant takes the same number of optimiser steps of the same batch of the
same crop size, so each sees the same number of voxels and costs about the same FLOPs (the
convolutions dominate; a single-output head is a negligible saving). ``per-structure`` splits the
steps between its six models, so its total equals one joint model's.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.evaluate import metrics, stats
from vstain.modelfiles import is_finished
from vstain.training.configs import UNetConfig
from vstain.training.unet import run_unet_stage
from vstain.volumes import read_volume, write_volume

BASELINE = "baseline"
PER_STRUCTURE = "per-structure"
BOOK_UNET = "book-unet"
# Each variant as the UNetConfig fields it changes (per-structure: see variant_configs).
VARIANTS: dict[str, dict] = {
    BASELINE: {},
    "mse": {"loss": "mse"},
    "l1+mse": {"loss": "l1+mse"},
    "batchnorm": {"norm": "batch"},
    "lr1e-3": {"lr": 1e-3},
    "balanced": {"sampling": "balanced"},
    PER_STRUCTURE: {},
}
FACTORS: dict[str, str] = {
    "mse": "the masked MSE loss instead of L1",
    "l1+mse": "masked L1 + MSE instead of L1",
    "batchnorm": "BatchNorm instead of InstanceNorm",
    "lr1e-3": "Adam at 1e-3 instead of 2e-4",
    "balanced": "structure-balanced crops",
    PER_STRUCTURE: "one model per structure",
    BOOK_UNET: "the book's U-Net (stage 04_unet, its own number of steps)",
}
SCORED = ("pcc", "ssim")
PREDICTIONS = "predictions"


def check_variants(variants) -> list[str]:
    """``variants`` as a list of known names, ``baseline`` included (the reference of every comparison)."""
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if BASELINE not in variants:
        raise ValueError(f"variants must include {BASELINE!r}, the reference of every comparison; got {variants}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants are listed twice: {variants}")
    return variants


def split_steps(total: int, parts: int) -> list[int]:
    """``total`` steps split into ``parts`` near-equal counts that sum to ``total`` (the first ones
    take the remainder)."""
    if total < parts:
        raise ValueError(f"{total} steps cannot be split over {parts} models: give at least {parts} steps")
    return [total // parts + (i < total % parts) for i in range(parts)]


def variant_configs(name: str, base: UNetConfig) -> dict[str, UNetConfig]:
    """The training configs of one variant, by model folder (``""``: the variant's own folder; for
    ``per-structure`` one folder per channel, steps split by :func:`split_steps`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    if name != PER_STRUCTURE:
        return {"": replace(base, **VARIANTS[name])}
    steps = split_steps(base.max_steps, len(TARGETS))
    return {c: replace(base, channels=(c,), max_steps=s, val_every=min(base.val_every, s),
                       ckpt_every=min(base.ckpt_every, s)) for c, s in zip(TARGETS, steps)}


def combine_predictions(variant_dir: str | Path, channels=TARGETS) -> list[Path]:
    """Stack the single-channel predictions of ``variant_dir/<channel>/predictions/<fov_id>.tif``
    into six-channel ones in ``variant_dir/predictions/`` (``[6, Z, Y, X]``, :data:`TARGETS`
    order), so every variant is scored alike. Returns the files written."""
    variant_dir = Path(variant_dir)
    fovs = sorted(p.stem for p in (variant_dir / channels[0] / PREDICTIONS).glob("*.tif"))
    written = []
    for f in fovs:
        parts = [variant_dir / c / PREDICTIONS / f"{f}.tif" for c in channels]
        missing = [str(p) for p in parts if not p.exists()]
        if missing:
            raise FileNotFoundError(f"per-structure prediction(s) missing for FOV {f}: {missing}")
        out = variant_dir / PREDICTIONS / f"{f}.tif"
        write_volume(out, np.concatenate([read_volume(p) for p in parts]), list(channels))
        written.append(out)
    return written


def run_ablation(stage_in: str | Path, out_dir: str | Path, base: UNetConfig, variants=tuple(VARIANTS),
                 progress: bool = False) -> pd.DataFrame:
    """Train every variant (resuming an interrupted one, skipping a finished one) and predict the
    test FOVs whole.

    Args:
        stage_in: the ``03_denoising`` stage folder.
        out_dir: the ablation's stage folder; variant ``v`` trains into ``out_dir/v/``.
        base: the baseline's config; ``base.max_steps`` is every variant's step budget (matched
            compute, see the module docstring).
        variants: names of :data:`VARIANTS`, ``baseline`` among them.
        progress: show Lightning's progress bars.

    Returns one row per variant: ``variant``, ``factor``, ``models``, ``steps`` (all its models
    together), ``crops`` (steps x batch), ``train_seconds`` (this call's), ``status`` (``trained``,
    ``resumed`` or ``finished before``) and ``final_val_l1`` (mean over its models).
    """
    rows = []
    for name in check_variants(variants):
        status, seconds, val = [], 0.0, []
        configs = variant_configs(name, base)
        for sub, cfg in configs.items():
            d = Path(out_dir) / name / sub
            if is_finished(d, cfg, stage_in):
                status.append("finished before")
            else:
                r = run_unet_stage(stage_in, d, cfg, splits=("test",), progress=progress)
                status.append("resumed" if r.start_step else "trained")
                seconds += r.train_seconds
            losses = pd.read_csv(d / "losses.csv")["val_l1"].dropna()
            val.append(losses.iloc[-1] if len(losses) else np.nan)
        if name == PER_STRUCTURE:
            combine_predictions(Path(out_dir) / name)
        steps = sum(c.max_steps for c in configs.values())
        rows.append({"variant": name, "factor": FACTORS.get(name, "the book's U-Net settings"), "models": len(configs),
                     "steps": steps, "crops": steps * base.batch_size, "train_seconds": round(seconds, 1),
                     "status": ", ".join(sorted(set(status))), "final_val_l1": float(np.nanmean(val))})
    return pd.DataFrame(rows)


def score_variants(stage_in: str | Path, out_dir: str | Path, variants=tuple(VARIANTS), book_unet=None,
                   split: str = "test", reference: str = "truth") -> pd.DataFrame:
    """PCC and SSIM of every variant's predictions on every FOV of ``split``, all six channels
    against the clean truth (:func:`vstain.evaluate.metrics.evaluate_predictions`).

    Args:
        stage_in, out_dir: as :func:`run_ablation` (predictions in ``out_dir/<variant>/predictions``).
        variants: the variants to score.
        book_unet: a finished ``04_unet`` stage folder, scored as ``book-unet``, or None.
        split: the split scored (default ``"test"``).
        reference: ``"truth"`` (default: simulated data) or ``"target"`` (labelled channels only).

    Returns the long table ``variant, channel, fov_id, pcc, ssim`` (one row per variant, channel
    and FOV).
    """
    dirs = {v: Path(out_dir) / v / PREDICTIONS for v in variants}
    if book_unet is not None:
        dirs[BOOK_UNET] = Path(book_unet) / PREDICTIONS
    long = metrics.evaluate_predictions(stage_in, dirs, split=split, reference=reference)
    wide = long[long["metric"].isin(SCORED)].pivot(index=["model", "channel", "fov_id"], columns="metric", values="value")
    wide = wide.reset_index().rename(columns={"model": "variant"})
    rank = {**{v: i for i, v in enumerate(dirs)}, **{c: i for i, c in enumerate(TARGETS)}}
    wide = wide.sort_values(["variant", "channel"], key=lambda s: s.map(rank), kind="stable")
    return wide[["variant", "channel", "fov_id", *SCORED]].reset_index(drop=True)


def compare_to_baseline(scores: pd.DataFrame, baseline: str = BASELINE, n_resamples: int = stats.N_RESAMPLES,
                        confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired comparison of every variant with ``baseline`` per channel and metric, over FOVs
    (:func:`vstain.evaluate.stats.compare`: mean difference ``variant - baseline``, bootstrap
    interval, Wilcoxon p, ``better``), with a ``variant`` column and a ``verdict`` sentence
    (:func:`vstain.evaluate.stats.channel_verdict`)."""
    long = scores.melt(id_vars=["variant", "channel", "fov_id"], value_vars=list(SCORED), var_name="metric")
    long = long.rename(columns={"variant": "model"})
    others = [v for v in dict.fromkeys(scores["variant"]) if v != baseline]
    if baseline not in set(scores["variant"]) or not others:
        raise ValueError(f"the scores need {baseline!r} and at least one other variant; they have {sorted(set(scores['variant']))}")
    table = pd.concat([stats.compare(long, baseline, v, higher_is_better=True, n_resamples=n_resamples,
                                     confidence=confidence, seed=seed) for v in others], ignore_index=True)
    table.insert(0, "variant", table["model_b"])
    rank = {**{v: i for i, v in enumerate(others)}, **{c: i for i, c in enumerate(TARGETS)},
            **{m: i for i, m in enumerate(SCORED)}}
    table = table.sort_values(["variant", "channel", "metric"], key=lambda s: s.map(rank), ignore_index=True)
    table["verdict"] = [stats.channel_verdict(r, confidence=confidence) for _, r in table.iterrows()]
    return table


def findings_paragraph(comparisons: pd.DataFrame, channels=("nucleoli", "mito"), metric: str = "pcc",
                       confidence: float = 0.95) -> str:
    """A paragraph, from :func:`compare_to_baseline`'s table, that names for each of ``channels``
    the matched-compute factors whose interval for ``metric`` excludes 0 (with enough FOVs to call
    it, :func:`vstain.evaluate.stats.decided`), with the difference and interval; otherwise it says
    "no detectable difference with n FOVs" (or that n FOVs cannot decide). The book's U-Net, which
    differs in steps, is left out: it is no single factor."""
    label = metrics.COLUMN_LABELS.get(metric, metric)
    sentences = []
    for ch in channels:
        cells = comparisons[(comparisons["channel"] == ch) & (comparisons["metric"] == metric)
                            & (comparisons["variant"] != BOOK_UNET)]
        if cells.empty:
            raise ValueError(f"the comparison table has no {metric!r} rows for channel {ch!r}")
        name, n = TARGET_LABELS[ch], int(cells["n"].min())
        if n < stats.min_pairs(confidence):
            sentences.append(f"{name}: {label} {stats.channel_verdict(cells.iloc[0], n=n, confidence=confidence)}.")
            continue
        hits = [r for _, r in cells.iterrows() if stats.decided(r, confidence)]
        if not hits:
            sentences.append(f"{name}: no single factor changes {label} against the clean truth; "
                             f"no detectable difference with {stats.n_fovs(n)}.")
            continue
        parts = [f"{FACTORS[r['variant']]} ({'raises' if r['diff'] > 0 else 'lowers'} it by "
                 f"{stats.format_ci(r['diff'], r['ci_low'], r['ci_high'], int(r['n']))})" for r in hits]
        rest = len(cells) - len(hits)
        tail = (f"; the other {rest} variant{'s show' if rest > 1 else ' shows'} no detectable difference with "
                f"{stats.n_fovs(n)}" if rest else "")
        sentences.append(f"{name}: {label} against the clean truth moves beyond its {confidence:.0%} interval with "
                         f"{'; '.join(parts)}{tail}.")
    return " ".join(sentences)

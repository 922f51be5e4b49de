"""The seed-to-seed spread as the yardstick of Table 4.1's model differences.

Two trainings of the U-Net that differ only in the seed (stages ``04_unet`` and ``04c_unet_seed``)
are two draws of the same method. Their paired difference over the test FOVs shows how far a
change of seed alone moves each cell (channel x column) of Table 4.1; a difference between two
models whose interval excludes 0 but whose size is within that spread is no finding
(:func:`vstain.evaluate.stats.is_finding`).

Data flow: ``07_results``' per-FOV pixel metrics and patch scores, plus the second seed's, scored
the same way (:func:`with_model`) -> per-FOV values (:func:`vstain.evaluate.comparison.fov_values`)
-> the seed difference and the model differences side by side, each model cell marked a finding or
not (:func:`seed_comparison`) -> the displayed table (:func:`seed_display`) and the sentences
(:func:`seed_verdict`). The figure is :func:`vstain.plots.stats.seed_forest_plot`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS

from .comparison import COLUMNS, channel_sentences, pairwise
from .metrics import COLUMN_LABELS, evaluate_predictions
from .patches import REAL
from .perceptual import score_models
from .stats import against_seed, decided, format_ci, n_fovs

PATCH_KEY = ["fov_id", "channel", "z", "y", "x"]  # where a classifier patch sits


def with_model(pixel_long: pd.DataFrame, scores: pd.DataFrame, stage_in, name: str, pred_dir, clf, clf_cfg,
               split: str = "test", device: str = "cpu", precision: str = "32-true") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``07_results``' tables with one more model scored exactly as Table 4.1 scores its models.

    Args:
        pixel_long: ``pixel_metrics.csv`` of ``07_results`` (against the measured targets).
        scores: ``patch_scores.csv`` of ``07_results`` (measured patches under ``REAL``).
        stage_in: the ``03_denoising`` stage folder.
        name: the new model's name; must not be in the tables yet.
        pred_dir: folder of its ``<fov_id>.tif`` predictions ``[6, Z, Y, X]``.
        clf, clf_cfg: the ``06_classifier`` network and its config.
        split, device, precision: as :func:`vstain.evaluate.perceptual.score_models`.

    Raises ValueError when ``name`` is taken or when the new model's patches are not at the places
    of the tables' measured patches (another classifier, split or processed set)."""
    taken = set(pixel_long["model"]) | set(scores["model"])
    if name in taken:
        raise ValueError(f"model name {name!r} is already in the 07_results tables ({sorted(taken)}): pick another")
    new_pixel = evaluate_predictions(stage_in, {name: pred_dir}, split=split, reference="target")
    new_scores = score_models(clf, clf_cfg, stage_in, {name: pred_dir}, split=split, reference="target",
                              device=device, precision=precision)
    old_real = scores.loc[scores["model"] == REAL, PATCH_KEY].astype(str).reset_index(drop=True)
    new_real = new_scores.loc[new_scores["model"] == REAL, PATCH_KEY].astype(str).reset_index(drop=True)
    if not old_real.equals(new_real):
        raise ValueError(f"the patches of {name!r} ({len(new_real)}) are not those of the 07_results tables "
                         f"({len(old_real)}): score every model with the same classifier, split and processed set")
    return (pd.concat([pixel_long, new_pixel[pixel_long.columns]], ignore_index=True),
            pd.concat([scores, new_scores[new_scores["model"] == name][scores.columns]], ignore_index=True))


def seed_comparison(values: pd.DataFrame, scores: pd.DataFrame | None, reference: str, seed_model: str,
                    models: list[str], n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The seed difference ``seed_model - reference`` and each model difference ``model - reference``
    in every channel and column, as :func:`vstain.evaluate.comparison.pairwise` computes them.

    Args:
        values: per-FOV values (:func:`vstain.evaluate.comparison.fov_values`) of all the models.
        scores: patch scores for F1clf (``None``: no F1clf).
        reference: the model trained twice (e.g. ``"U-Net"``); ``seed_model`` its second seed.
        models: the models compared with ``reference`` (Table 4.1's others).
        n_resamples, confidence, seed: as :func:`vstain.evaluate.stats.paired_difference`.

    Returns one row per (pair, channel, column): ``kind`` (``"seed"`` or ``"model"``), the columns
    of :func:`vstain.evaluate.stats.compare`, ``seed_reach`` (the largest difference the seed
    interval allows in that cell) and, for model rows, ``finding``
    (:func:`vstain.evaluate.stats.is_finding`)."""
    present = set(values["model"])
    for m in (reference, seed_model, *models):
        if m not in present:
            raise ValueError(f"model {m!r} is not in the per-FOV values (they hold {sorted(present)})")
    if seed_model in models or reference in models:
        raise ValueError(f"models {models} must not include the reference {reference!r} or its seed {seed_model!r}")
    by = ["channel", "metric"]
    seed_rows = pairwise(values, scores, [reference, seed_model], n_resamples, confidence, seed)
    seed_rows = against_seed(seed_rows, seed_rows, by, confidence).drop(columns="finding").assign(kind="seed")
    frames = [seed_rows]
    for m in models:
        rows = pairwise(values, scores, [reference, m], n_resamples, confidence, seed)
        frames.append(against_seed(rows, seed_rows, by, confidence).assign(kind="model"))
    out = pd.concat(frames, ignore_index=True)
    cells = {(c, k): i for i, (c, k) in enumerate((c, k) for c in TARGETS for k in COLUMNS)}
    pairs = {m: i for i, m in enumerate((seed_model, *models))}
    out["_o"] = [pairs[b] * len(cells) + cells.get(t, len(cells)) for b, t in zip(out["model_b"], zip(out["channel"], out["metric"]))]
    return out.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def _status(row, confidence: float) -> str:
    if not decided(row, confidence):
        return "no winner"
    return "finding" if row["finding"] else "within seed spread"


def seed_display(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """:func:`seed_comparison` as strings, one row per (Channel, Column): the seed difference and each
    model difference as ``"mean [low, high] (n = ...)"`` with its Wilcoxon p, and per model whether
    the cell is a finding, within the seed spread or calls no winner."""
    seed_rows = table[table["kind"] == "seed"]
    if seed_rows.empty:
        raise ValueError("the table has no seed rows: pass seed_comparison()'s table")
    ref, seed_model = seed_rows["model_a"].iloc[0], seed_rows["model_b"].iloc[0]
    cols: dict[str, list] = {}
    index = []
    for _, s in seed_rows.iterrows():
        index.append((TARGET_LABELS[s["channel"]], COLUMN_LABELS[s["metric"]]))
        cols.setdefault(f"{seed_model} − {ref}", []).append(format_ci(s["diff"], s["ci_low"], s["ci_high"], int(s["n"])))
        cols.setdefault("seed p", []).append(f"{s['p']:.2g}" if np.isfinite(s["p"]) else "–")
        for m in table.loc[table["kind"] == "model", "model_b"].unique():
            r = table[(table["kind"] == "model") & (table["model_b"] == m) & (table["channel"] == s["channel"])
                      & (table["metric"] == s["metric"])]
            shown = (format_ci(*r[["diff", "ci_low", "ci_high"]].iloc[0], int(r["n"].iloc[0])), _status(r.iloc[0], confidence)) \
                if len(r) else ("–", "–")
            cols.setdefault(f"{m} − {ref}", []).append(shown[0])
            cols.setdefault(f"{m}: verdict", []).append(shown[1])
    return pd.DataFrame(cols, index=pd.MultiIndex.from_tuples(index, names=["Channel", "Column"]))


def seed_verdict(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """The seed spread in words: in how many cells two seeds of one model already differ by an
    interval that excludes 0, and for each model pair how many of its winners survive the seed
    yardstick, with the per-channel sentences of :func:`vstain.evaluate.comparison.channel_sentences`."""
    seed_rows, model_rows = table[table["kind"] == "seed"], table[table["kind"] == "model"]
    if seed_rows.empty or model_rows.empty:
        raise ValueError("seed_verdict needs seed_comparison()'s table with seed and model rows")
    ref, seed_model = seed_rows["model_a"].iloc[0], seed_rows["model_b"].iloc[0]
    k = sum(decided(r, confidence) for _, r in seed_rows.iterrows())
    reach = seed_rows.groupby("metric")["seed_reach"].median()
    reach_text = ", ".join(f"{COLUMN_LABELS[m]} {reach[m]:.3g}" for m in COLUMNS if m in reach and np.isfinite(reach[m]))
    lines = [f"The paired intervals call a winner between the two seeds of the {ref} ({seed_model} against {ref}, "
             f"{n_fovs(seed_rows['n'])}) in **{k} of {len(seed_rows)}** cells (channel × column)"
             + (": an interval that excludes 0 alone does not show that two methods differ."
                if k else "; a change of seed alone did not produce a winner here.")
             + (f" The seed spread (largest difference its interval allows; median over channels) is {reach_text}."
                if reach_text else ""), ""]
    for m in model_rows["model_b"].unique():
        rows = model_rows[model_rows["model_b"] == m]
        won = [r for _, r in rows.iterrows() if decided(r, confidence)]
        kept = [r for r in won if r["finding"]]
        within = [f"{TARGET_LABELS[r['channel']]} {COLUMN_LABELS[r['metric']]}" for r in won if not r["finding"]]
        lines.append(f"**{m} against {ref}**: {len(won)} of {len(rows)} cells call a winner, **{len(kept)}** of them "
                     f"beyond the seed spread (findings)"
                     + (f"; within it, so not findings: {', '.join(within)}".rstrip(".") + "." if within else "."))
        lines += [f"- {s}" for s in channel_sentences(rows, ref, m)]
        lines.append("")
    return "\n".join(lines).rstrip()


def read_results(results_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``pixel_metrics.csv`` and ``patch_scores.csv`` of a finished ``07_results`` stage, with FOV ids as
    strings (as the processed set's manifest has them)."""
    d = Path(results_dir)
    missing = [f for f in ("pixel_metrics.csv", "patch_scores.csv") if not (d / f).exists()]
    if missing:
        raise FileNotFoundError(f"{d} lacks {missing}: run notebooks/07_results.ipynb first")
    pixel = pd.read_csv(d / "pixel_metrics.csv", dtype={"fov_id": str})
    scores = pd.read_csv(d / "patch_scores.csv", dtype={"fov_id": str})
    return pixel, scores

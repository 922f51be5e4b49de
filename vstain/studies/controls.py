"""The realism measures on their controls: the clean truth, blurred and shifted
(:mod:`vstain.evaluate.controls`), scored with every measure of the perception-distortion plane
(:func:`vstain.studies.sweep.sweep_values`) and with KID, each paired against the undegraded truth.

Data flow: ``03_denoising`` (the clean truth) -> :func:`vstain.evaluate.controls.write_controls`
(one model folder per control) -> :func:`control_summary` (the sweep's summary table plus KID rows,
one row per measure and control) -> :func:`vstain.evaluate.controls.control_findings` (what each
measure can judge) and :func:`control_display` (the table the book shows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vstain.evaluate import kid as kidlib
from vstain.evaluate.controls import TRUTH, control_findings, control_names, controls_sentence, write_controls
from vstain.evaluate.stats import format_ci, min_pairs

from .sweep import sweep_summary, sweep_values


@dataclass
class ControlsResult:
    """What :func:`run_controls` returns: ``summary`` (one row per measure, reference and control),
    ``findings`` (one row per measure: what it judges) and ``sentence`` (the findings in words)."""

    summary: pd.DataFrame
    findings: pd.DataFrame
    sentence: str


def kid_rows(table: pd.DataFrame) -> pd.DataFrame:
    """KID over all channels from :func:`vstain.evaluate.kid.kid_table` (control: the truth) in the
    layout of :func:`vstain.studies.sweep.sweep_summary`."""
    t = table[table["channel"] == kidlib.ALL]
    return pd.DataFrame({
        "metric": "kid", "reference": "truth", "model": t["model"], "estimate": t["kid"], "ci_low": t["low"],
        "ci_high": t["high"], "n": t["n"], "diff": t["diff"], "diff_low": t["diff_low"], "diff_high": t["diff_high"],
        "p": float("nan"), "higher_is_better": False, "label": "KID", "role": "perception",
        "decided": t["decided"] & (t["n"] >= min_pairs()),  # as every other measure: enough FOVs to decide
    })


def control_summary(stage_in, dirs: dict[str, Path], clf, clf_cfg, split: str = "test", n_resamples: int = 999,
                    confidence: float = 0.95, seed: int = 0, device: str = "cpu",
                    precision: str = "32-true") -> pd.DataFrame:
    """Every measure of every control (``dirs``: name -> folder, the truth first) with its interval
    and its paired difference from the truth; the classifier's patches sit on the truth's
    foreground in all six channels."""
    models = list(dirs)
    values, scores = sweep_values(stage_in, dirs, clf, clf_cfg, split=split, perception_reference="truth",
                                  device=device, precision=precision)
    summary = sweep_summary(values, scores, models, n_resamples, confidence, seed)
    meta, vectors = kidlib.patch_embeddings(clf, clf_cfg, stage_in, {m: Path(d) / "predictions" for m, d in dirs.items()},
                                            split, "truth", device, precision)
    kt = kidlib.kid_table(meta, vectors, models, control=models[0], n_resamples=n_resamples, confidence=confidence,
                          seed=seed)
    return pd.concat([summary, kid_rows(kt)], ignore_index=True)


def run_controls(stage_in, out_dir, clf, clf_cfg, split: str = "test", n_resamples: int = 999,
                 confidence: float = 0.95, seed: int = 0, device: str = "cpu", precision: str = "32-true"
                 ) -> ControlsResult:
    """Write the controls into ``out_dir`` (resumable), score them, and read what each measure
    judges. Needs the simulator's clean truth."""
    dirs = write_controls(stage_in, out_dir, split)
    summary = control_summary(stage_in, dirs, clf, clf_cfg, split, n_resamples, confidence, seed, device, precision)
    findings = control_findings(summary)
    return ControlsResult(summary, findings, controls_sentence(findings))


def control_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Measures by controls: each control's value with its interval, and a star where it differs
    from the truth's (a paired interval that excludes 0 on enough FOVs)."""
    def cell(r):
        text = format_ci(r["estimate"], r["ci_low"], r["ci_high"], int(r["n"]))
        return text + (" *" if r["model"] != TRUTH and bool(r["decided"]) else "")

    t = summary.assign(measure=summary["label"] + " vs " + summary["reference"], text=summary.apply(cell, axis=1))
    order = [m for m in control_names() if m in set(t["model"])]
    return t.pivot_table(index="measure", columns="model", values="text", aggfunc="first", sort=False)[order]

"""The adversarial weight sweep: a perception-distortion curve (Blau & Michaeli, CVPR 2018) of the
WGAN-GP fine-tuned from the U-Net baseline.

Data flow: the ``04_unet`` checkpoint and one :class:`vstain.training.configs.WGANConfig` -> one short
fine-tune of equal length per adversarial weight ``lambda_adv``, each in its own folder (weight 0:
the masked-L1-only control, same batches, same number of generator steps) with its test-split
predictions (:func:`run_sweep`, which skips finished folders, so an interrupted sweep resumes) ->
per-FOV distortion (PCC and SSIM against the clean truth and the measured targets) and perception
(the ``06`` classifier's F1clf and perceptual distance, the coherent sharpness) in one long table
(:func:`sweep_values`) -> each weight's value with a bootstrap interval over FOVs and its paired
difference from the control (:func:`sweep_summary`) -> the sentences (:func:`sweep_verdict`). The
figure is :func:`vstain.plots.sweep.perception_distortion`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from vstain.evaluate.comparison import f1_bootstrap, fov_confusions
from vstain.evaluate.metrics import evaluate_predictions
from vstain.evaluate.patches import REAL
from vstain.evaluate.perceptual import score_models
from vstain.evaluate.sharpness import sharpness_table
from vstain.evaluate.stats import decided, format_ci, min_pairs, n_fovs, paired_difference
from vstain.modelfiles import LOSSES_CSV, init_checkpoint, is_finished, read_model_json
from vstain.training.configs import WGANConfig

# (metric, higher is better, label) of every column of the sweep
MEASURES = {"pcc": (True, "PCC"), "ssim": (True, "SSIM"), "f1clf": (True, "F1clf"),
            "perceptual": (False, "perceptual distance"), "transfer": (True, "coherent sharpness")}
DISTORTION = ("pcc", "ssim")
PERCEPTION = ("f1clf", "perceptual", "transfer")


def weight_label(weight: float) -> str:
    """The model name of a weight in the sweep's tables: ``"λ = 0.05"``."""
    return f"λ = {weight:g}"


def weight_dir(out_dir, weight: float) -> Path:
    """The folder of one weight's fine-tune: ``<out_dir>/lambda_0.05``."""
    return Path(out_dir) / f"lambda_{weight:g}"


def check_weights(weights) -> list[float]:
    """The weights sorted; at least two, distinct, >= 0 and including 0 (the L1-only control)."""
    w = sorted(float(x) for x in weights)
    if len(w) < 2 or len(set(w)) != len(w) or w[0] < 0 or w[0] != 0:
        raise ValueError(f"weights must be >= 2 distinct values >= 0 including 0 (the L1-only control), got {list(weights)}")
    return w


def run_sweep(stage_in, out_dir, base: WGANConfig, weights, max_voxels=None, progress: bool = False) -> pd.DataFrame:
    """Fine-tune the generator once per adversarial weight, from the same U-Net and with the same
    seed, crops and length, and predict the test split; a folder that
    :func:`vstain.modelfiles.is_finished` calls finished (the same configuration, processed set and
    U-Net, every step taken, the predictions written) is reused.

    Args:
        stage_in: the ``03_denoising`` stage folder.
        out_dir: the sweep's stage folder; weight ``w`` goes to :func:`weight_dir`.
        base: every setting but ``lambda_adv``; ``init_from`` must name the U-Net (a fine-tune).
        weights: the ``lambda_adv`` values (see :func:`check_weights`).
        max_voxels: whole-volume inference budget (``None``: derived from 4 GiB).
        progress: show Lightning's progress bar.

    Returns one row per weight: ``weight, model, folder, status`` (``"trained"`` or ``"reused"``),
    ``iterations, train_seconds, median_grad_ratio`` (adversarial over L1 gradient at the generator
    output), ``final_l1`` (mean of the last quarter of generator steps) and ``stopped``."""
    from vstain.training.wgan import run_wgan_stage  # Lightning's import takes seconds; scoring needs none of it

    if not base.init_from:
        raise ValueError("base.init_from is empty: the sweep fine-tunes from the U-Net, give its 04_unet stage folder")
    rows = []
    for w in check_weights(weights):
        cfg = replace(base, lambda_adv=w)
        d = weight_dir(out_dir, w)
        status = "reused"
        if not is_finished(d, cfg, stage_in, init_checkpoint(cfg.init_from)):
            run_wgan_stage(stage_in, d, cfg, splits=("test",), max_voxels=max_voxels, progress=progress)
            status = "trained"
        rows.append({"weight": w, "model": weight_label(w), "folder": str(d), "status": status, **fine_tune_record(d)})
    return pd.DataFrame(rows)


def fine_tune_record(folder) -> dict:
    """What one weight's folder says of its fine-tune (its ``model.json`` and ``losses.csv``):
    ``iterations, train_seconds, stopped``, the ``median_grad_ratio`` (adversarial over L1 gradient
    at the generator output) and the ``final_l1`` (mean of the last quarter of generator steps)."""
    meta = read_model_json(folder) or {}
    losses = pd.read_csv(Path(folder) / LOSSES_CSV)
    gen = losses[losses["kind"] == "generator"]
    tail = gen.tail(max(1, len(gen) // 4))
    return {"iterations": meta.get("iterations"), "train_seconds": meta.get("train_seconds"),
            "median_grad_ratio": float(gen["grad_ratio"].median()) if len(gen) else float("nan"),
            "final_l1": float(tail["l1"].mean()) if len(gen) else float("nan"), "stopped": meta.get("stopped", "")}


def sweep_values(stage_in, stage_dirs: dict[str, str | Path], clf, clf_cfg, split: str = "test",
                 perception_reference: str = "target", sharpness_cutoff: float = 0.125, device: str = "cpu",
                 precision: str = "32-true") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every model's per-FOV scores of the sweep's measures, and the classifier's patch scores.

    Args:
        stage_in: the ``03_denoising`` stage folder.
        stage_dirs: model name -> folder holding ``predictions/<fov_id>.tif``.
        clf, clf_cfg: the ``06_classifier`` network and its config.
        split: the scored split.
        perception_reference: where the classifier's patches sit and what the perceptual distance
            compares with: ``"target"`` (the measured targets, as Table 4.1) or ``"truth"``.
        sharpness_cutoff: band split of :func:`vstain.evaluate.sharpness.sharpness`, cycles per voxel.
        device, precision: the classifier's.

    Returns ``(values, scores)``: ``values`` one row per ``model, fov_id, channel, metric,
    reference, value`` (PCC and SSIM against every reference the data have, the perceptual
    distance averaged over a FOV's patches of the channel, the coherent transfer against the truth,
    else the targets); ``scores`` :func:`vstain.evaluate.perceptual.score_models`'s patch table."""
    pred_dirs = {m: Path(d) / "predictions" for m, d in stage_dirs.items()}
    sharp = sharpness_table(stage_in, stage_dirs, split=split, cutoff=sharpness_cutoff, include_target=False)
    refs = ["truth", "target"] if (sharp["reference"] == "truth").all() else ["target"]
    cols = ["model", "fov_id", "channel", "metric", "reference", "value"]
    frames = []
    for ref in refs:
        long = evaluate_predictions(stage_in, pred_dirs, split=split, reference=ref)
        frames.append(long[long["metric"].isin(DISTORTION)].assign(reference=ref)[cols])
    scores = score_models(clf, clf_cfg, stage_in, pred_dirs, split=split, reference=perception_reference,
                          device=device, precision=precision)
    per = scores[scores["model"] != REAL].groupby(["model", "fov_id", "channel"], sort=False)["perceptual"].mean()
    frames.append(per.reset_index().rename(columns={"perceptual": "value"})
                  .assign(metric="perceptual", reference=perception_reference)[cols])
    frames.append(sharp.rename(columns={"transfer": "value"}).assign(metric="transfer")[cols])
    values = pd.concat(frames, ignore_index=True)
    values["fov_id"] = values["fov_id"].astype(str)
    return values, scores


def fov_means(values: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per (metric, reference) and FOV, each model's mean over the channels that *every* model has
    a finite value for, so all models are averaged over the same cells. Columns: ``metric,
    reference, fov_id`` and one per model."""
    wide = values[values["model"].isin(models)].pivot_table(
        index=["metric", "reference", "fov_id", "channel"], columns="model", values="value", aggfunc="first")
    missing = [m for m in models if m not in wide.columns]
    if missing:
        raise ValueError(f"model(s) {missing} have no values (the table has {sorted(set(values['model']))})")
    wide = wide[models].dropna()
    return wide.groupby(level=["metric", "reference", "fov_id"], sort=False).mean().reset_index()


def sweep_summary(values: pd.DataFrame, scores: pd.DataFrame, models: list[str], n_resamples: int = 9999,
                  confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each model's value of every measure with its bootstrap interval over FOVs, and its paired
    difference from the first model (the control).

    Args:
        values, scores: :func:`sweep_values`' tables.
        models: the sweep's models, the control (weight 0) first, then by rising weight.
        n_resamples, confidence, seed: as :func:`vstain.evaluate.stats.paired_difference`.

    Returns one row per ``(metric, reference, model)``: ``estimate, ci_low, ci_high, n`` (the mean
    over FOVs of the per-FOV channel means; F1clf: the macro F1 of the model's patches, its interval
    resampling whole FOVs as :func:`vstain.evaluate.comparison.f1_bootstrap`), ``diff, diff_low,
    diff_high, p`` (paired, ``model - control``; NaN p for F1clf), ``higher_is_better`` and
    ``decided`` (:func:`vstain.evaluate.stats.decided`: the difference from the control calls one),
    ``label`` (the measure's name) and ``role`` (``"distortion"`` or ``"perception"``), so a figure
    can be drawn from the saved table alone."""
    if len(models) < 2:
        raise ValueError(f"the sweep needs the control and at least one weight, got models {models}")
    means = fov_means(values, models)
    control = models[0]
    rows = []
    for (metric, ref), g in means.groupby(["metric", "reference"], sort=False):
        for m in models:
            own = paired_difference(np.zeros(len(g)), g[m], n_resamples, confidence, seed)
            diff = paired_difference(g[control], g[m], n_resamples, confidence, seed)
            rows.append(_row(metric, ref, m, own.diff, own.ci_low, own.ci_high, own.n,
                             diff.diff, diff.ci_low, diff.ci_high, diff.p, confidence))
    ref = values.loc[values["metric"] == "perceptual", "reference"]
    fovs = list(dict.fromkeys(scores["fov_id"].astype(str)))
    s = scores.assign(fov_id=scores["fov_id"].astype(str))
    per_fov = {m: fov_confusions(s, m, fovs) for m in models}
    for m in models:
        est, lo, hi, _ = f1_bootstrap([per_fov[m]], None, n_resamples, confidence, seed)
        d, dlo, dhi, _ = f1_bootstrap([per_fov[control], per_fov[m]], None, n_resamples, confidence, seed)
        rows.append(_row("f1clf", ref.iloc[0] if len(ref) else "target", m, est, lo, hi, len(fovs), d, dlo, dhi,
                         float("nan"), confidence))
    out = pd.DataFrame(rows)
    order = [(m, r) for r in ("truth", "target") for m in DISTORTION] + [(m, r) for m in PERCEPTION for r in ("target", "truth")]
    key = [order.index((m, r)) * len(models) + models.index(k) for m, r, k in zip(out["metric"], out["reference"], out["model"])]
    return out.assign(_o=key).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def _row(metric, ref, model, est, lo, hi, n, d, dlo, dhi, p, confidence) -> dict:
    return {"metric": metric, "reference": ref, "model": model, "estimate": est, "ci_low": lo, "ci_high": hi,
            "n": n, "diff": d, "diff_low": dlo, "diff_high": dhi, "p": p, "higher_is_better": MEASURES[metric][0],
            "label": MEASURES[metric][1], "role": "distortion" if metric in DISTORTION else "perception",
            "decided": decided({"ci_low": dlo, "ci_high": dhi, "n": n}, confidence)}


def _change(r) -> str:
    """``"-0.031 [-0.05, -0.01] (n = 6)"`` and whether it is better, worse or undecided."""
    text = format_ci(r["diff"], r["diff_low"], r["diff_high"], int(r["n"]))
    if not r["decided"]:
        return f"{text}, undecided"
    return f"{text}, {'better' if (r['diff'] > 0) == r['higher_is_better'] else 'worse'}"


SMALL_CHANGE = 0.01  # a change below 1% of the control's value is called small in the verdict


def sweep_verdict(summary: pd.DataFrame, models: list[str]) -> str:
    """Whether raising the adversarial weight trades pixel fidelity for realism here: per weight its
    paired change from the control in every measure, then the answer for the largest weight.

    Fidelity is PCC and SSIM against the clean truth where there is one (else the measured
    targets); realism is F1clf, the perceptual distance and the coherent sharpness. The answer
    "trades pixel fidelity for realism" needs a decided loss in a fidelity measure *and* a decided
    gain in a realism measure; otherwise it says what was seen (a cost or a gain on one side, both
    costs, or the reverse of the trade), or neither, with n (or that fewer FOVs than
    :func:`vstain.evaluate.stats.min_pairs` cannot decide)."""
    if summary.empty or len(models) < 2:
        raise ValueError("sweep_verdict needs sweep_summary()'s table and the control plus at least one weight")
    fid_ref = "truth" if (summary["reference"] == "truth").any() else "target"
    lines = [f"Each weight against the L1-only control ({models[0]}), paired over the test FOVs "
             f"({n_fovs(summary['n'])}), with 95% intervals:", ""]
    verdicts = {}
    for m in models[1:]:
        rows = summary[summary["model"] == m]
        parts, moved = [], {"fid_worse": [], "fid_better": [], "real_worse": [], "real_better": []}
        for _, r in rows.iterrows():
            name = MEASURES[r["metric"]][1] + (f" vs {r['reference']}" if r["metric"] in DISTORTION else "")
            parts.append(f"{name} {_change(r)}")
            if not r["decided"]:
                continue
            better = (r["diff"] > 0) == r["higher_is_better"]
            if r["metric"] in DISTORTION and r["reference"] == fid_ref:
                moved["fid_better" if better else "fid_worse"].append(name)
            if r["metric"] in PERCEPTION:
                moved["real_better" if better else "real_worse"].append(name)
        lines.append(f"- **{m}**: " + "; ".join(parts) + ".")
        verdicts[m] = {k: ", ".join(v) for k, v in moved.items()}
    top = models[-1]
    answer = _answer(verdicts[top]) if summary["n"].max() >= min_pairs() else (
        f"**cannot be decided** with {n_fovs(summary['n'])} (a paired interval decides from {min_pairs()} on)")
    answer = answer or f"**changes neither pixel fidelity nor realism detectably** with {n_fovs(summary['n'])}"
    lines += ["", f"Raising the adversarial weight to the largest value of the sweep ({top}) {answer}, against the "
                  f"L1-only fine-tune of the same length. {_size(summary[summary['model'] == top])}"]
    return "\n".join(lines)


def _answer(v: dict[str, str]) -> str:
    """The largest weight's answer from its decided moves (names joined by commas; "" when none):
    the trade the thesis reads, its reverse, a cost or a gain on one side only, or "" (no move)."""
    also = f", but worse {v['real_worse']}" if v["real_worse"] and v["real_better"] else ""
    if v["fid_worse"] and v["real_better"]:
        return f"**trades pixel fidelity for realism**: lower {v['fid_worse']} and better {v['real_better']}{also}"
    if v["real_better"]:
        return f"**gains realism without a detectable loss of pixel fidelity** (better {v['real_better']}{also})"
    if v["fid_worse"] and v["real_worse"]:
        return f"**costs both pixel fidelity and realism** (lower {v['fid_worse']}; worse {v['real_worse']})"
    if v["fid_worse"]:
        return f"**costs pixel fidelity without a detectable gain in realism** (lower {v['fid_worse']})"
    if v["real_worse"] and v["fid_better"]:
        return (f"**moves against the trade the thesis reads**: worse {v['real_worse']} and higher "
                f"{v['fid_better']}")
    if v["real_worse"]:
        return f"**loses realism without a detectable change in pixel fidelity** (worse {v['real_worse']})"
    if v["fid_better"]:
        return f"**gains pixel fidelity without a detectable change in realism** (higher {v['fid_better']})"
    return ""


def _size(rows: pd.DataFrame) -> str:
    """How large the largest paired change of one weight is, relative to the control's value: a
    decided change can still be too small to matter (a fine-tune too short to move the U-Net)."""
    control = (rows["estimate"] - rows["diff"]).abs().clip(lower=1e-12)
    rel = rows["diff"].abs() / control
    r = rows.loc[rel.idxmax()]
    name = MEASURES[r["metric"]][1] + (f" vs {r['reference']}" if r["metric"] in DISTORTION else "")
    size = f"the largest change is {name} {r['diff']:+.2g}, {rel.max():.1%} of the control's value"
    if rel.max() < SMALL_CHANGE:
        return (f"Every change is small, though: {size}. The fine-tunes barely moved the U-Net, so the sweep shows "
                "a direction, not a trade-off of practical size; set it against the difference two seeds of the "
                "U-Net make (07b_seed_spread).")
    return f"For scale: {size}."


def sweep_table(summary: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """:func:`sweep_summary` as strings, one row per model (weight order) and one column per measure:
    ``"0.71 [0.69, 0.73] (n = 24)"``."""
    cols = {}
    for (metric, ref), g in summary.groupby(["metric", "reference"], sort=False):
        name = MEASURES[metric][1] + (f" vs {ref}" if metric in DISTORTION else "")
        at = g.set_index("model")
        cols[name] = [format_ci(*at.loc[m, ["estimate", "ci_low", "ci_high"]], int(at.loc[m, "n"])) if m in at.index
                      else "–" for m in models]
    return pd.DataFrame(cols, index=pd.Index(models, name="weight"))

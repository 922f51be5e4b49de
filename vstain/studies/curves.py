"""Test-set learning curves of the book's models: every kept snapshot predicts the test FOVs and is
scored as the finished model is (PCC and SSIM against the clean truth, F1clf and KID in the
classifier's feature space), and each claim's gap is decided to close, hold or widen over the second
half of training (:mod:`vstain.evaluate.curves`).

Data flow: ``04_unet``/``05_wgan``/... ``snapshots/`` -> :func:`snapshot_predictions` (one folder of
predictions per snapshot, resumable) -> :func:`score_snapshots` (per-FOV pixel values, per-FOV
confusion counts, patch features) -> :func:`curve_table` (the long table ``model, step, wall_s,
metric, channel, mean, low, high, n``) and :func:`pair_trends` and :func:`trend_verdict` (the verdicts with
their budget).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from vstain.channels import TARGETS
from vstain.evaluate import kid as kidlib
from vstain.evaluate.classifier import apply_batches, confusion, features
from vstain.evaluate.comparison import f1_bootstrap, f1_of
from vstain.evaluate.curves import (CURVE_COLUMNS, curve_row, half_way, model_trend, per_fov_rows,
                                    resampled_trend, trend_sentence)
from vstain.evaluate.metrics import evaluate_predictions
from vstain.evaluate.patches import REAL, fov_scoring_patches
from vstain.evaluate.stats import decided, fov_resamples, min_pairs, paired_difference, percentile_interval
from vstain.inference.infer import default_max_voxels, plan, write_predictions
from vstain.modelfiles import (MODEL_JSON, PREDICTIONS, load_generator_state, load_snapshot, read_model_json,
    read_snapshots, snapshot_path)
from vstain.models import Generator, GeneratorConfig
from vstain.preprocess.processed import open_volume, read_manifest
from vstain.volumes import made_from, mark_source, sha256

PIXEL = ("pcc", "ssim")  # per-FOV measures against the clean truth
SNAPSHOT_PREDICTIONS = "snapshot_predictions.csv"
SOURCE_SHA = "snapshot.sha256"  # in each step folder: the hash of the snapshot file its predictions came from


def step_dir(out_dir, model: str, step: int) -> Path:
    """Where the snapshot of ``model`` at ``step`` writes its predictions (``predictions/``)."""
    slug = "".join(c if c.isalnum() else "_" for c in model.lower())
    return Path(out_dir) / slug / f"step_{int(step):06d}"


def _every_fov(preds: Path, fov_ids) -> bool:
    """Whether the folder ``preds`` holds a prediction of every FOV of ``fov_ids`` and of no other."""
    return preds.is_dir() and {p.stem for p in preds.glob("*.tif")} == set(fov_ids)


def predicted_elsewhere(reuse_from, stage_in, fov_ids) -> dict[str, Path]:
    """Snapshot SHA-256 -> a ``predictions`` folder under ``reuse_from`` (the output folders of other
    learning curves) that holds every FOV of ``fov_ids`` predicted from that snapshot file (its
    ``snapshot.sha256``). A folder counts only when the stage that wrote it (its parent, with a
    ``manifest.json``) recorded the current ``stage_in`` among its inputs: predictions of an older
    processed set are never copied."""
    source = Path(stage_in) / "manifest.json"
    if not source.exists():
        return {}
    current = sha256(source)
    found = {}
    for root in map(Path, reuse_from):
        try:
            inputs = json.loads((root.parent / "manifest.json").read_text()).get("inputs", {})
        except (OSError, ValueError):
            continue
        if current not in inputs.values():
            continue
        for marker in sorted(root.glob(f"*/step_*/{SOURCE_SHA}")):
            if _every_fov(marker.parent / PREDICTIONS, fov_ids):
                found.setdefault(marker.read_text().strip(), marker.parent / PREDICTIONS)
    return found


def snapshot_predictions(stage_in, stages: dict[str, Path], out_dir, split: str = "test", max_voxels=None,
                         progress: bool = True, reuse_from=()) -> pd.DataFrame:
    """Predict the FOVs of ``split`` from every snapshot of every model (``stages``: name -> stage
    folder with ``snapshots.csv``); a snapshot whose predictions are complete and were made from the
    same snapshot file (its SHA-256 in ``snapshot.sha256``) is skipped, so an interrupted run
    resumes and a retrained stage is predicted again. A snapshot that another learning curve already
    predicted from the same file on the same processed set (``reuse_from``: its output folders,
    :func:`predicted_elsewhere`) is copied from there. Returns one row per snapshot: ``model, step,
    wall_s`` (training time up to it), ``dir`` and ``seconds`` (the inference time of its FOVs; a
    resumed snapshot keeps the time recorded when it was predicted; NaN when nothing was predicted:
    a copied snapshot, or the final one, whose predictions are the stage's own, see :func:`reuse_final`)."""
    out_dir = Path(out_dir)
    done = pd.read_csv(out_dir / SNAPSHOT_PREDICTIONS) if (out_dir / SNAPSHOT_PREDICTIONS).exists() else None
    fovs = read_manifest(stage_in)
    fov_ids = fovs.loc[fovs["split"] == split, "fov_id"].astype(str)
    # copies only at the default inference budget, the one every learning curve of the book uses
    elsewhere = predicted_elsewhere(reuse_from, stage_in, fov_ids) if max_voxels is None else {}
    rows = []
    metas = {m: read_model_json(d) for m, d in stages.items()}
    for m, meta in metas.items():
        if meta is None:
            raise FileNotFoundError(f"{Path(stages[m]) / MODEL_JSON}: missing or unreadable (train it first)")
    starts = {m: started_from(meta) for m, meta in metas.items()}
    jobs = [(m, r) for m, d in stages.items() for _, r in read_snapshots(d).iterrows()]
    for model, snap in tqdm(jobs, desc="snapshots", disable=not progress):
        folder, step = step_dir(out_dir, model, snap["step"]), int(snap["step"])
        meta = metas[model]
        preds = folder / PREDICTIONS
        seconds = float("nan")
        sha, marker = sha256(snapshot_path(stages[model], step)), folder / SOURCE_SHA
        if not (_every_fov(preds, fov_ids) and made_from(marker, sha)):
            shutil.rmtree(preds, ignore_errors=True)  # another snapshot's (a retrained stage) or cut short
            if sha in elsewhere:
                shutil.copytree(elsewhere[sha], preds)  # another curve predicted this very snapshot
            else:
                gen = load_snapshot(stages[model], step, Generator(GeneratorConfig(**meta["generator"])))
                if not reuse_final(stage_in, stages[model], meta, gen, folder, split, max_voxels):
                    t = time.perf_counter()
                    write_predictions(gen, stage_in, folder, splits=(split,), max_voxels=max_voxels)
                    seconds = time.perf_counter() - t
            mark_source(marker, sha)
        elif done is not None:
            prev = done[(done["model"] == model) & (done["step"] == step)]
            seconds = float(prev["seconds"].iloc[0]) if len(prev) else seconds
        start_step, start_wall = starts[model]
        rows.append({"model": model, "step": step, "wall_s": float(snap["wall_s"]), "start_step": start_step,
                     "start_wall_s": start_wall, "dir": str(folder), "seconds": round(seconds, 2)})
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / SNAPSHOT_PREDICTIONS, index=False)
    return table


def reuse_final(stage_in, stage, meta: dict, gen: Generator, folder, split: str, max_voxels=None) -> bool:
    """Copy the stage's own predictions of ``split`` into ``folder/predictions`` when the snapshot
    ``gen`` is the stage's final generator (the same weights) and both predict every FOV in one
    whole-volume pass (the same computation); returns whether it did. The last snapshot of a
    finished stage is its final generator, so its test FOVs need not be predicted again."""
    if meta.get("prediction_modes") != ["whole"]:
        return False
    fovs = read_manifest(stage_in)
    fovs = fovs[fovs["split"] == split]
    source = Path(stage) / PREDICTIONS
    budget = max_voxels or default_max_voxels(gen)
    files = [source / f"{f}.tif" for f in fovs["fov_id"]]
    if not all(f.exists() for f in files) or any(plan(open_volume(f).shape[1:], budget) != "whole" for f in files):
        return False
    final = load_generator_state(stage)[0]
    own = gen.state_dict()
    if final.keys() != own.keys() or not all(torch.equal(final[k], own[k]) for k in own):
        return False
    (Path(folder) / PREDICTIONS).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, Path(folder) / PREDICTIONS / f.name)
    return True


def started_from(meta: dict) -> tuple[int, float]:
    """The steps and training seconds a model inherited: those of the finished stage its generator
    started from (``init_from``, a fine-tune), else ``(0, 0.0)``. The seconds are read from the
    clock of that stage's snapshots when it kept one at its last step, so that the fine-tune's
    curve continues the curve of the model it started from; otherwise from its ``model.json``."""
    source = Path(meta.get("config", {}).get("init_from") or "")
    init = read_model_json(source) if str(source) else None
    if init is None:
        return 0, 0.0
    step = int(init.get("global_step", 0))
    kept = read_snapshots(source, check=False)
    at_step = kept[kept["step"] == step]
    wall = float(at_step["wall_s"].iloc[0]) if len(at_step) else float(init.get("train_seconds", 0.0))
    return step, wall


@dataclass
class SnapshotScores:
    """The scores of every snapshot: ``pixel`` (per FOV: ``model, step, fov_id, channel, metric,
    value``), ``confusions`` (``(model, step) -> [F, 6, 6]`` counts over ``fovs``), ``features``
    (``(model, step) -> [N, D]`` and ``REAL``, rows in ``meta``'s order) and ``meta`` (one row per
    patch: ``fov_id, channel, class, z, y, x``)."""

    pixel: pd.DataFrame
    confusions: dict
    features: dict
    meta: pd.DataFrame
    fovs: list[str]
    blocks: dict = field(default_factory=dict)  # (model, step) -> its kernel block sums with the truth's patches


def _logits_and_features(model, x):
    f = model.avgpool(features(model, x)[-1]).flatten(1)
    return torch.cat([model.fc(f), f], 1)


def score_snapshots(stage_in, snapshots: pd.DataFrame, clf, clf_cfg, split: str = "test", device: str = "cpu",
                    precision: str = "32-true") -> SnapshotScores:
    """PCC and SSIM against the clean truth per FOV and channel, and the classifier's answer and
    feature vector for every truth-placed patch, of every snapshot in ``snapshots``
    (:func:`snapshot_predictions`'s table). One pass of the classifier gives both."""
    keys = [(r["model"], int(r["step"])) for _, r in snapshots.iterrows()]
    dirs = {f"{m}@{s}": Path(d) / "predictions" for (m, s), d in zip(keys, snapshots["dir"])}
    long = evaluate_predictions(stage_in, dirs, split=split, reference="truth")
    long = long[long["metric"].isin(PIXEL)]
    model_step = long["model"].str.rsplit("@", n=1, expand=True)
    pixel = long.assign(model=model_step[0], step=model_step[1].astype(int))[
        ["model", "step", "fov_id", "channel", "metric", "value"]]
    metas, feats = [], {REAL: [], **{k: [] for k in keys}}
    answers = {k: [] for k in keys}
    n_classes = len(TARGETS)
    for meta, p in fov_scoring_patches(stage_in, split, clf_cfg, dirs, "truth"):
        metas.append(meta)
        out = apply_batches(clf, p[REAL], clf_cfg, _logits_and_features, device, precision)
        feats[REAL].append(out[:, n_classes:])
        for k, name in zip(keys, dirs):
            out = apply_batches(clf, p[name], clf_cfg, _logits_and_features, device, precision)
            answers[k].append(out[:, :n_classes].argmax(1))
            feats[k].append(out[:, n_classes:])
    meta = pd.concat(metas, ignore_index=True)
    meta["fov_id"] = meta["fov_id"].astype(str)
    fovs = list(dict.fromkeys(meta["fov_id"]))
    fov_index = meta["fov_id"].map({f: i for i, f in enumerate(fovs)}).to_numpy()
    confusions = {}
    for k in keys:
        predicted = np.concatenate(answers[k])
        c = np.zeros((len(fovs), n_classes, n_classes), np.int64)
        for i in range(len(fovs)):
            sel = fov_index == i
            c[i] = confusion(meta.loc[sel, "class"], predicted[sel])
        confusions[k] = c
    return SnapshotScores(pixel.assign(fov_id=pixel["fov_id"].astype(str)), confusions,
                          {k: np.concatenate(v) for k, v in feats.items()}, meta, fovs)


def curve_table(scores: SnapshotScores, snapshots: pd.DataFrame, n_resamples: int = 999, confidence: float = 0.95,
                seed: int = 0) -> pd.DataFrame:
    """The long table of the curves (:data:`vstain.evaluate.curves.CURVE_COLUMNS`): PCC and SSIM per
    channel and over all channels, F1clf (macro, all channels) and KID (all channels' patches), each
    with a 95% interval over resampled FOVs. ``step`` and ``wall_s`` count from random weights: a
    fine-tune adds the steps and seconds of the model it started from (``start_step``,
    ``start_wall_s`` of ``snapshots``, when present)."""
    start = {(r["model"], int(r["step"])): (int(r.get("start_step", 0)), float(r.get("start_wall_s", 0.0)))
             for _, r in snapshots.iterrows()}
    walls = {k: float(r["wall_s"]) + start[k][1] for k, (_, r) in zip(start, snapshots.iterrows())}
    rows = per_fov_rows(scores.pixel, walls, confidence=confidence, seed=seed)
    for (model, step), conf in scores.confusions.items():
        est, lo, hi, _ = f1_bootstrap([conf], None, n_resamples, confidence, seed)
        rows.append(curve_row(model, step, walls[(model, step)], "f1clf", "all", est, lo, hi, len(scores.fovs)))
        k = kid_on(scores, (model, step), np.arange(len(scores.fovs)))
        lo, hi = _kid_interval(scores, (model, step), n_resamples, confidence, seed)
        rows.append(curve_row(model, step, walls[(model, step)], "kid", "all", k, lo, hi, len(scores.fovs)))
    table = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    table["step"] += [start[(m, s)][0] for m, s in zip(table["model"], table["step"])]
    return table


def kid_on(scores: SnapshotScores, key, idx: np.ndarray) -> float:
    """KID of one snapshot's patches to the truth's, on the FOVs ``idx`` (with repeats), from kernel
    block sums computed once per snapshot (:func:`vstain.evaluate.kid.kernel_blocks`)."""
    if key not in scores.blocks:
        fov = scores.meta["fov_id"].map({f: i for i, f in enumerate(scores.fovs)}).to_numpy()
        scores.blocks[key] = kidlib.kernel_blocks(scores.features[REAL], scores.features[key], fov, len(scores.fovs))
    return kidlib.kid_of_fovs(scores.blocks[key], idx)


def _kid_interval(scores: SnapshotScores, key, n_resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    n = len(scores.fovs)
    return percentile_interval([kid_on(scores, key, idx) for idx in fov_resamples(n, n_resamples, seed)], n, confidence)


# ---------------------------------------------------------------------------------------------
# Trends and the budget each verdict holds at
# ---------------------------------------------------------------------------------------------
def overall_pixel(pixel: pd.DataFrame) -> pd.DataFrame:
    """Each FOV's mean over its channels, as channel ``"all"``."""
    return (pixel.groupby(["model", "step", "fov_id", "metric"], as_index=False)["value"].mean()
            .assign(channel="all"))


def _steps(scores: SnapshotScores, model: str) -> tuple[int, int]:
    steps = sorted({s for m, s in scores.confusions if m == model})
    if not steps:
        have = sorted({m for m, _ in scores.confusions})
        raise ValueError(f"no snapshots of model {model!r} were scored (have {have})")
    return half_way(steps)


def pair_trends(scores: SnapshotScores, model_a: str, model_b: str, n_resamples: int = 999,
                confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """The trend of the gap ``b - a`` on PCC and SSIM (all channels, per FOV), F1clf and KID (FOVs
    resampled whole), each model at its own half-way and last snapshot. One row per metric:
    ``model_a, model_b, metric, trend, gap_mid, gap_last, change, low, high, n, sentence``."""
    overall = overall_pixel(scores.pixel)
    trends = {m: model_trend(overall, model_a, model_b, m, "all", confidence) for m in PIXEL}
    (a_mid, a_last), (b_mid, b_last) = _steps(scores, model_a), _steps(scores, model_b)
    c = scores.confusions

    def f1_gap(idx):
        f1 = {k: float(f1_of(c[k][idx].sum(0), None)) for k in ((model_a, a_mid), (model_a, a_last),
                                                                  (model_b, b_mid), (model_b, b_last))}
        return f1[(model_b, b_mid)] - f1[(model_a, a_mid)], f1[(model_b, b_last)] - f1[(model_a, a_last)]

    def kid_gap(idx):
        k = {key: kid_on(scores, key, idx) for key in ((model_a, a_mid), (model_a, a_last), (model_b, b_mid),
                                                        (model_b, b_last))}
        return k[(model_b, b_mid)] - k[(model_a, a_mid)], k[(model_b, b_last)] - k[(model_a, a_last)]

    n = len(scores.fovs)
    trends["f1clf"] = resampled_trend(f1_gap, n, n_resamples, confidence, seed)
    trends["kid"] = resampled_trend(kid_gap, n, n_resamples, confidence, seed)
    rows = []
    for metric, t in trends.items():
        rows.append({"model_a": model_a, "model_b": model_b, "metric": metric, "trend": t.trend,
                     "gap_mid": t.gap_mid, "gap_last": t.gap_last, "change": t.change.diff, "low": t.change.ci_low,
                     "high": t.change.ci_high, "n": t.change.n,
                     "sentence": trend_sentence(t, model_a, model_b, METRIC_LABELS[metric], "all channels")})
    return pd.DataFrame(rows)


METRIC_LABELS = {"pcc": "PCC", "ssim": "SSIM", "f1clf": "F1clf", "kid": "KID"}


def convergence(scores: SnapshotScores, confidence: float = 0.95) -> pd.DataFrame:
    """Per model: PCC against the clean truth (all channels, per FOV) at its half-way and last
    snapshot, the paired change, and ``converged``: ``"not converged"`` when the change is a decided
    gain (the curve still rises at the end, so a claim resting on the model is not tested at this
    budget), ``"undecided"`` with fewer FOVs than a decision needs, else ``"converged"``."""
    overall = overall_pixel(scores.pixel)
    overall = overall[overall["metric"] == "pcc"]
    rows = []
    for model in dict.fromkeys(m for m, _ in scores.confusions):
        mid, last = _steps(scores, model)
        g = overall[overall["model"] == model].pivot_table(index="fov_id", columns="step", values="value")
        d = paired_difference(g[mid], g[last], confidence=confidence)
        rows.append({"model": model, "mid_step": mid, "last_step": last, "pcc_mid": d.mean_a, "pcc_last": d.mean_b,
                     "gain": d.diff, "low": d.ci_low, "high": d.ci_high, "n": d.n,
                     "converged": ("undecided" if d.n < min_pairs(confidence) else
                                   "not converged" if decided(d, confidence) and d.diff > 0 else "converged")})
    return pd.DataFrame(rows)


def budget(stage_dir) -> str:
    """The training budget of a model stage in words, from its ``model.json``: steps or generator
    iterations, the network's width and the crop size."""
    meta = read_model_json(stage_dir) or {}
    cfg = meta.get("config", {})
    crop = "x".join(str(c) for c in cfg.get("crop", ()))
    steps = (f"{meta.get('iterations', cfg.get('iterations'))} generator iterations" if meta.get("model") == "wgan"
             else f"{meta.get('global_step', cfg.get('max_steps'))} steps")
    return f"{steps} of a width-{cfg.get('base_width')} network on {crop} crops"


def unconverged(conv: pd.DataFrame) -> set[str]:
    """The models of a :func:`convergence` table whose PCC still rose over their second half."""
    return set(conv.loc[conv["converged"] == "not converged", "model"])


def trend_verdict(trends: pd.DataFrame, conv: pd.DataFrame, budgets: dict[str, str]) -> str:
    """The trend sentences of every pair with the budget they hold at; a pair with a model that has
    not converged is flagged: its claims are not tested at this budget."""
    late_models = unconverged(conv)
    parts = []
    for (a, b), g in trends.groupby(["model_a", "model_b"], sort=False):
        head = (f"**{b} against {a}**, after {budgets[a]} each" if budgets[a] == budgets[b]
                else f"**{b} against {a}**, after {budgets[a]} ({a}) and {budgets[b]} ({b})")
        late = [m for m in (a, b) if m in late_models]
        if late:
            head += (f"; {' and '.join(late)} had not converged (PCC against the truth still rose over the second "
                     "half), so a claim that rests on " + ("it" if len(late) == 1 else "them") +
                     " is not tested at this budget")
        parts.append(head + ":\n\n" + "\n".join(f"- {s}" for s in g["sentence"]))
    return "\n\n".join(parts)


@dataclass
class CurvesResult:
    """What :func:`run_curves` returns: ``table`` (the long table), ``snapshots`` (per snapshot:
    training and inference seconds), ``trends`` (one row per pair and metric), ``convergence`` (one
    row per model), ``verdict`` (the trends in words with their budgets) and ``budgets`` (model ->
    its training budget in words, :func:`budget`)."""

    table: pd.DataFrame
    snapshots: pd.DataFrame
    trends: pd.DataFrame
    convergence: pd.DataFrame
    verdict: str
    budgets: dict[str, str]


def run_curves(stage_in, stages: dict[str, Path], clf, clf_cfg, out_dir, pairs: list[tuple[str, str]],
               split: str = "test", n_resamples: int = 999, confidence: float = 0.95, seed: int = 0,
               max_voxels=None, device: str = "cpu", precision: str = "32-true", progress: bool = True,
               reuse_from=()) -> CurvesResult:
    """The learning curves in one call: predict the test FOVs from every snapshot (resumable; copied
    where another curve's folder in ``reuse_from`` predicted the same snapshot file), score them,
    write ``curves.csv``, ``trends.csv`` and ``convergence.csv`` into ``out_dir``, and decide each
    pair's trend (``pairs``: ``(model_a, model_b)`` names of ``stages``)."""
    out_dir = Path(out_dir)
    snaps = snapshot_predictions(stage_in, stages, out_dir, split, max_voxels, progress, reuse_from)
    scores = score_snapshots(stage_in, snaps, clf, clf_cfg, split, device, precision)
    table = curve_table(scores, snaps, n_resamples, confidence, seed)
    trends = pd.concat([pair_trends(scores, a, b, n_resamples, confidence, seed) for a, b in pairs], ignore_index=True)
    conv = convergence(scores, confidence)
    table.to_csv(out_dir / "curves.csv", index=False)
    trends.to_csv(out_dir / "trends.csv", index=False)
    conv.to_csv(out_dir / "convergence.csv", index=False)
    budgets = {m: budget(d) for m, d in stages.items()}
    return CurvesResult(table, snaps, trends, conv, trend_verdict(trends, conv, budgets), budgets)

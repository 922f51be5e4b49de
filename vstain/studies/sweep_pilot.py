"""How long a fine-tune must run before the adversarial weight can move anything: the pilot that sizes
the adversarial-weight sweep.

Two fine-tunes from the U-Net, at the largest weight and at weight 0 (the L1-only control on the same
batches), keep snapshots at log-spaced iterations (:mod:`vstain.training.snapshots`). At each snapshot
the paired difference ``weight - control`` of every perception measure (F1clf and KID in the
classifier's feature space, FOVs resampled whole) and of PCC against the clean truth is compared with
the seed spread: the same measures between the two trainings of the U-Net that differ only in their
seed (``04_unet`` and ``04c_unet_seed``; 0 where the second has not run). The first iteration at
which a perception measure moves by more than that spread, with an interval that excludes 0, is how
long each fine-tune of the sweep must run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from vstain.evaluate.comparison import f1_bootstrap
from vstain.evaluate.stats import decided, fov_resamples, min_pairs, paired_difference, percentile_interval
from vstain.training.configs import WGANConfig

from .curves import SnapshotScores, kid_on, overall_pixel, score_snapshots, snapshot_predictions
from .sweep import run_sweep, weight_label

PERCEPTION = ("f1clf", "kid")  # the measures whose move sizes the sweep
NAMES = {"f1clf": "F1clf", "kid": "KID", "pcc": "PCC"}  # the measures, as pages write them (PCC: the cost)


def run_pilot(stage_in, out_dir, base: WGANConfig, weight: float, iterations: int, lr: float, snapshots: int = 6,
              max_voxels=None) -> dict[str, Path]:
    """The pilot's two fine-tunes (``weight`` and 0) at learning rate ``lr`` for both networks, with
    ``snapshots`` log-spaced snapshots; finished folders are reused. Returns ``name -> folder``,
    the control first."""
    if not weight > 0:
        raise ValueError(f"the pilot needs a weight > 0 to compare with the control, got {weight}")
    cfg = replace(base, iterations=int(iterations), lr_generator=float(lr), lr_critic=float(lr),
                  snapshots=int(snapshots))
    runs = run_sweep(stage_in, out_dir, cfg, [0.0, float(weight)], max_voxels=max_voxels)
    return {r["model"]: Path(r["folder"]) for _, r in runs.iterrows()}


@dataclass
class Pilot:
    """What the pilot measured: ``moves`` (:func:`pilot_moves`'s table; empty when no pilot ran),
    ``seed_spread`` (:func:`seed_reach`'s table; empty without a second seed) and its ``sentence``."""

    moves: pd.DataFrame
    seed_spread: pd.DataFrame
    sentence: str


def pilot_stage(stage_in, out_dir, base: WGANConfig, weight: float, iterations: int, lr: float, snapshots: int,
                seeds: dict[str, Path | None], clf, clf_cfg, split: str = "test", device: str = "cpu",
                precision: str = "32-true", max_voxels=None, n_resamples: int = 999, confidence: float = 0.95,
                seed: int = 0) -> Pilot:
    """The whole pilot of stage 07c in ``out_dir``: the two fine-tunes (:func:`run_pilot`), their
    snapshots predicted and scored, the seed spread of the two U-Net trainings in ``seeds`` (the
    reference first; a spread of 0 when the second is None) and the moves beyond it. Writes
    ``pilot_moves.csv`` and ``seed_reach.csv`` into the parent of ``out_dir``. ``weight`` 0 runs no
    pilot."""
    if not weight:
        return Pilot(pd.DataFrame(columns=["step", "metric", "diff", "low", "high", "n", "reach", "moved"]),
                     pd.DataFrame(), "No pilot ran (its weight is 0): the sweep runs the iterations it is given.")
    out_dir = Path(out_dir)
    dirs = run_pilot(stage_in, out_dir, base, weight, iterations, lr, snapshots, max_voxels)
    snaps = snapshot_predictions(stage_in, dirs, out_dir / "snapshots", split, max_voxels)
    scores = score_snapshots(stage_in, snaps, clf, clf_cfg, split, device, precision)
    reach, spread = {}, pd.DataFrame()
    if all(seeds.values()):
        reach, spread = seed_reach(stage_in, seeds, clf, clf_cfg, split, device, precision, n_resamples, confidence,
                                   seed)
        spread.to_csv(out_dir.parent / "seed_reach.csv", index=False)
    moves = pilot_moves(scores, *dirs, reach, n_resamples=n_resamples, confidence=confidence, seed=seed)
    moves.to_csv(out_dir.parent / "pilot_moves.csv", index=False)
    return Pilot(moves, spread, pilot_sentence(moves, weight, lr, iterations))


def seed_reach(stage_in, seeds: dict[str, Path], clf, clf_cfg, split: str = "test", device: str = "cpu",
               precision: str = "32-true", n_resamples: int = 999, confidence: float = 0.95,
               seed: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    """The seed spread in the pilot's own measures: the two trainings of the U-Net that differ only
    in their seed (``seeds``: name -> stage folder with ``predictions/``; the first is the
    reference) scored exactly as the pilot's snapshots (F1clf and KID on truth-placed patches, PCC
    against the truth, all channels, FOVs resampled whole). Returns the reach of each measure (the
    largest change its interval allows) and the table of differences (:func:`pilot_moves`'s)."""
    if len(seeds) != 2:
        raise ValueError(f"the seed spread needs two trainings of one model, got {list(seeds)}")
    snaps = pd.DataFrame([{"model": m, "step": 0, "dir": str(d)} for m, d in seeds.items()])
    scores = score_snapshots(stage_in, snaps, clf, clf_cfg, split, device, precision)
    a, b = seeds
    table = pilot_moves(scores, a, b, {}, n_resamples, confidence, seed).drop(columns=["reach", "moved"])
    reach = {r.metric: float(max(abs(r.low), abs(r.high))) for r in table.itertuples()}
    return reach, table


def pilot_moves(scores: SnapshotScores, control: str, model: str, reach: dict[str, float], n_resamples: int = 999,
                confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """At each iteration both fine-tunes kept, the paired difference ``model - control`` of F1clf,
    KID and PCC (all channels), its interval over resampled FOVs, the seed ``reach`` of the measure
    and ``moved``: a decided difference larger than the reach. One row per ``(step, metric)``."""
    steps = sorted({s for m, s in scores.confusions if m == control} & {s for m, s in scores.confusions if m == model})
    n = len(scores.fovs)
    idx = fov_resamples(n, n_resamples, seed)
    pcc = overall_pixel(scores.pixel)
    pcc = pcc[pcc["metric"] == "pcc"]
    rows = []
    for step in steps:
        a, b = (control, step), (model, step)
        d, lo, hi, _ = f1_bootstrap([scores.confusions[a], scores.confusions[b]], None, n_resamples, confidence, seed)
        rows.append((step, "f1clf", d, lo, hi))
        every = np.arange(n)
        k = kid_on(scores, b, every) - kid_on(scores, a, every)
        klo, khi = percentile_interval([kid_on(scores, b, i) - kid_on(scores, a, i) for i in idx], n, confidence)
        rows.append((step, "kid", k, klo, khi))
        g = pcc[pcc["step"] == step].pivot_table(index="fov_id", columns="model", values="value")
        p = paired_difference(g[control], g[model], n_resamples, confidence, seed)
        rows.append((step, "pcc", p.diff, p.ci_low, p.ci_high))
    out = pd.DataFrame(rows, columns=["step", "metric", "diff", "low", "high"]).assign(n=n)
    out["reach"] = out["metric"].map(lambda m: reach.get(m, 0.0))
    out["moved"] = [beyond_spread(d, lo, hi, r, n, confidence)
                    for d, lo, hi, r in zip(out["diff"], out["low"], out["high"], out["reach"])]
    return out


def beyond_spread(diff: float, low: float, high: float, reach: float, n: int, confidence: float = 0.95) -> bool:
    """Whether a paired change moved a measure: its interval excludes 0 on enough FOVs and it is
    larger than the seed ``reach``; never when the reach is unknown (NaN)."""
    return decided({"ci_low": low, "ci_high": high, "n": n}, confidence) and bool(abs(diff) > reach)


def first_move(moves: pd.DataFrame, perception=PERCEPTION) -> int | None:
    """The first iteration at which a perception measure moved (None: none did in the pilot)."""
    hit = moves[moves["metric"].isin(perception) & moves["moved"]]
    return int(hit["step"].min()) if len(hit) else None


def _move(r) -> str:
    return f"{r['diff']:+.3g} [{r['low']:+.3g}, {r['high']:+.3g}]"


def pilot_sentence(moves: pd.DataFrame, weight: float, lr: float, iterations: int) -> str:
    """The pilot's answer in words, with the iteration count the sweep should run, and whether the
    first move held at every later snapshot."""
    n = int(moves["n"].max()) if len(moves) else 0
    if n < min_pairs():
        return (f"With n = {n} test FOVs no difference can be decided (at least {min_pairs()} are needed), so the "
                "pilot cannot size the sweep; the sweep runs the iterations it is given (the pilot's length when "
                "that is 0).")
    step = first_move(moves)
    label = weight_label(weight)
    if step is None:
        last = moves[moves["step"] == moves["step"].max()]
        said = "; ".join(f"{NAMES[r['metric']]} {_move(r)} ("
                         + (f"seed reach {r['reach']:.3g})" if np.isfinite(r["reach"]) else "no seed spread measured)")
                         for _, r in last.iterrows())
        unknown = sorted(set(moves.loc[~np.isfinite(moves["reach"].astype(float)), "metric"]) & set(PERCEPTION))
        unknown = " and ".join(NAMES[m] for m in unknown)
        return (f"Within {iterations} generator iterations at learning rate {lr:g}, the fine-tune at {label} moved no "
                f"perception measure beyond the seed spread (at the last snapshot: {said}). "
                + (f"Without a seed spread of {unknown}, a change of it cannot be told from what a second training "
                   "seed does, so it does not size the sweep. " if unknown else "")
                + "A sweep of this length cannot show a trade-off beyond the seed spread; it needs longer fine-tunes, "
                  "a higher rate, or a smaller model trained from scratch.")
    r = moves[(moves["step"] == step) & moves["moved"]].iloc[0]
    later = moves[(moves["step"] > step) & (moves["metric"] == r["metric"])]
    lapsed = later[~later["moved"].astype(bool)]
    if len(lapsed):
        held = (f" The move did not hold at iteration{'s' if len(lapsed) > 1 else ''} "
                + ", ".join(f"{q['step']} ({_move(q)})" for _, q in lapsed.iterrows())
                + ": at this length the change is not yet steady, so a sweep of it may show a transient rather "
                  "than a trade-off.")
    else:
        held = f" It held at every later snapshot ({len(later)})." if len(later) else ""
    return (f"At learning rate {lr:g}, the fine-tune at {label} first moved {NAMES[r['metric']]} beyond the seed "
            f"spread after {step} generator iterations ({_move(r)}, seed reach {r['reach']:.3g}, n = {n} FOVs): "
            f"each fine-tune of the sweep needs at least that many.{held}")


def sized(base: WGANConfig, iterations: int, moves: pd.DataFrame | None, pilot_iterations: int) -> WGANConfig:
    """The sweep's recipe: ``base`` with ``iterations`` generator iterations, or, when that is 0,
    the first iteration at which the pilot moved a perception measure (the pilot's length when
    none did, or when no pilot ran)."""
    if iterations:
        return replace(base, iterations=int(iterations))
    step = first_move(moves) if moves is not None and len(moves) else None
    return replace(base, iterations=int(step or pilot_iterations))

"""Test-set learning curves: metrics of every kept snapshot, and whether the gap between two models
closes, holds or widens over the second half of training.

The long table of the curves has one row per ``model, step, wall_s, metric, channel`` with the mean
over the test FOVs, its interval and ``n`` (:func:`curve_table`). The trend of a gap is decided, not
read off a plot (:func:`gap_trend`): for each FOV the paired gap ``b - a`` is taken at each model's
snapshot half-way through its training and at its last one, and the change of the gap (signed so
that positive means the gap grew) gets a bootstrap interval over the FOVs
(:func:`vstain.evaluate.stats.paired_difference`). An interval above 0 is *widening*, below 0
*closing*, one that holds 0 *stable* (no detectable change); with fewer FOVs than
:func:`vstain.evaluate.stats.min_pairs` the trend is *undecided*.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .stats import Difference, decided, fov_resamples, min_pairs, paired_difference, percentile_interval

# undecided: fewer FOVs than a decision needs; reversing: the gap closed and reopened the other way
TRENDS = ("closing", "reversing", "stable", "widening", "undecided")
CURVE_COLUMNS = ["model", "step", "wall_s", "metric", "channel", "mean", "low", "high", "n"]


@dataclass(frozen=True)
class Trend:
    """The change of a paired gap ``b - a`` between two checkpoints.

    Args:
        trend: one of :data:`TRENDS`: ``"reversing"`` when the gap's change surely exceeds its
            size at half-way (it crossed zero: the model behind is ahead at the end).
        gap_mid, gap_last: mean gap at the half-way and the last checkpoint.
        change: the interval of the change of the gap, signed so that > 0 means it grew
            (:class:`vstain.evaluate.stats.Difference` of ``s * gap_mid`` and ``s * gap_last``,
            ``s`` the sign of the gap at half-way, or at the end when it was 0 there).
    """

    trend: str
    gap_mid: float
    gap_last: float
    change: Difference


def gap_trend(a_mid, b_mid, a_last, b_last, confidence: float = 0.95, seed: int = 0) -> Trend:
    """Whether the gap ``b - a`` closes, holds or widens from the half-way to the last checkpoint.

    Args:
        a_mid, b_mid: one value per FOV of models ``a`` and ``b`` at half-way (same FOV order).
        a_last, b_last: the same at the last checkpoint.
        confidence: interval level; a trend other than stable needs the interval to exclude 0 on at
            least :func:`vstain.evaluate.stats.min_pairs` FOVs.
    """
    mid = np.asarray(b_mid, float) - np.asarray(a_mid, float)
    last = np.asarray(b_last, float) - np.asarray(a_last, float)
    if mid.shape != last.shape:
        raise ValueError(f"gap_trend needs the same FOVs at both checkpoints, got {mid.size} and {last.size} values")
    sign = np.sign(np.nanmean(mid)) or np.sign(np.nanmean(last)) or 1.0
    change = paired_difference(sign * mid, sign * last, confidence=confidence, seed=seed)
    return Trend(_trend(change, confidence, abs(float(np.nanmean(mid)))), float(np.nanmean(mid)),
                 float(np.nanmean(last)), change)


def _trend(change: Difference, confidence: float, size_mid: float) -> str:
    """``size_mid``: the gap's absolute size at half-way; a decided shrinking beyond it is a reversal."""
    if change.n < min_pairs(confidence):
        return "undecided"
    if not decided(change, confidence):
        return "stable"
    if change.diff > 0:
        return "widening"
    return "reversing" if change.ci_high < -size_mid else "closing"


def half_way(steps) -> tuple[int, int]:
    """The kept step nearest half of the last one, and the last one."""
    steps = np.sort(np.asarray(list(steps), int))
    if steps.size < 2:
        raise ValueError(f"a trend needs at least two snapshots, got steps {steps.tolist()}")
    last = int(steps[-1])
    earlier = steps[:-1]
    return int(earlier[np.argmin(np.abs(earlier - last / 2))]), last


def model_trend(per_fov: pd.DataFrame, model_a: str, model_b: str, metric: str, channel: str,
                confidence: float = 0.95) -> Trend:
    """:func:`gap_trend` on the per-FOV table of the curves (``model, step, fov_id, channel, metric,
    value``), each model at its own half-way and last snapshot."""
    sel = per_fov[(per_fov["metric"] == metric) & (per_fov["channel"] == channel)]
    values = {}
    for model in (model_a, model_b):
        rows = sel[sel["model"] == model]
        if rows.empty:
            raise ValueError(f"no {metric} of {channel} for model {model!r} in the curves")
        mid, last = half_way(rows["step"].unique())
        values[model] = [rows[rows["step"] == s].set_index("fov_id")["value"] for s in (mid, last)]
    fovs = sorted(set(values[model_a][1].index) & set(values[model_b][1].index)
                  & set(values[model_a][0].index) & set(values[model_b][0].index))
    (a_mid, a_last), (b_mid, b_last) = ([s.reindex(fovs).to_numpy() for s in values[m]] for m in (model_a, model_b))
    return gap_trend(a_mid, b_mid, a_last, b_last, confidence=confidence)


def trend_sentence(t: Trend, model_a: str, model_b: str, metric: str, channel: str, digits: int = 3) -> str:
    """One sentence: the gap at half-way and at the end, and the decided trend. The change is taken
    along the half-way gap's sign (+ widens it, - closes it; closing by more than its half-way size
    reverses it), so a gap that changes sign is not read as one that grew."""
    c = t.change
    numbers = (f"{t.gap_mid:+.{digits}f} at half-way, {t.gap_last:+.{digits}f} at the end; widening (+) or "
               f"closing (-) {c.diff:+.{digits}f}, 95% CI {c.ci_low:+.{digits}f} to {c.ci_high:+.{digits}f}, n = {c.n} FOVs")
    if t.trend == "undecided":
        return (f"{metric} ({channel}): with n = {c.n} FOVs the trend of the gap {model_b} - {model_a} cannot be "
                f"decided ({min_pairs()} are needed; {numbers}).")
    how = {"closing": "closes", "widening": "widens", "stable": "shows no detectable change",
           "reversing": "closes and reopens the other way"}[t.trend]
    return f"{metric} ({channel}): the gap {model_b} - {model_a} {how} over the second half of training ({numbers})."



def resampled_trend(stat, n_fovs: int, n_resamples: int = 999, confidence: float = 0.95, seed: int = 0) -> Trend:
    """:func:`gap_trend` for a measure that is defined on a set of FOVs only (F1clf pools a
    model's patches, KID compares two sets of patches), so the FOVs are resampled whole.

    Args:
        stat: ``stat(idx) -> (gap_mid, gap_last)``, the gap ``b - a`` at the two checkpoints
            computed on the FOVs ``idx`` (indices ``0 .. n_fovs - 1``, with repeats).
        n_fovs: FOVs scored.
    """
    full = np.arange(int(n_fovs))
    mid, last = stat(full)
    sign = np.sign(mid) or np.sign(last) or 1.0
    if n_fovs < 2:
        nan = float("nan")
        return Trend("undecided", float(mid), float(last), Difference(int(n_fovs), 0, nan, nan, nan, nan, nan, nan,
                                                                      f"n = {n_fovs}: no interval"))
    draws = np.array([stat(idx) for idx in fov_resamples(n_fovs, n_resamples, seed)])
    lo, hi = percentile_interval(sign * (draws[:, 1] - draws[:, 0]), n_fovs, confidence)
    change = Difference(int(n_fovs), 0, float(sign * mid), float(sign * last), float(sign * (last - mid)),
                        float(lo), float(hi), float("nan"))
    return Trend(_trend(change, confidence, abs(float(mid))), float(mid), float(last), change)


def curve_row(model: str, step: int, wall_s: float, metric: str, channel: str, mean: float, low: float,
              high: float, n: int) -> dict:
    """One row of the curves' long table (:data:`CURVE_COLUMNS`)."""
    return dict(zip(CURVE_COLUMNS, (model, int(step), float(wall_s), metric, channel, float(mean), float(low),
                                    float(high), int(n))))


def per_fov_rows(per_fov: pd.DataFrame, walls: dict[tuple[str, int], float], n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> list[dict]:
    """Curve rows of the per-FOV measures (``model, step, fov_id, channel, metric, value``): the mean
    over FOVs with its bootstrap interval, per channel and over all channels (``"all"``: each FOV's
    mean over its channels)."""
    overall = per_fov.groupby(["model", "step", "fov_id", "metric"], as_index=False)["value"].mean()
    rows = []
    for table in (per_fov, overall.assign(channel="all")):
        for (model, step, metric, channel), g in table.groupby(["model", "step", "metric", "channel"], sort=False):
            v = g["value"].to_numpy(float)
            d = paired_difference(np.zeros_like(v), v, n_resamples, confidence, seed)
            rows.append(curve_row(model, step, walls[(model, int(step))], metric, channel, d.diff, d.ci_low,
                                  d.ci_high, d.n))
    return rows

"""Table 4.1 with its uncertainty, and the verdict it supports (thesis 4.2).

Data flow: the per-FOV pixel metrics (:func:`vstain.evaluate.metrics.evaluate_predictions`) and the
classifier's per-patch scores (:func:`vstain.evaluate.perceptual.score_models`) -> one long table of
per-FOV values (:func:`fov_values`; the perceptual distance averaged over each FOV's patches) ->
each model's mean with a bootstrap interval over FOVs (:func:`model_summary`; F1clf, a statistic of
pooled patches, resamples whole FOVs) -> paired differences for every pair of models
(:func:`pairwise`) -> the displayed table, where a cell is bold only when that model is better than
every other model by an interval that excludes 0 (:func:`styled_table`), and the sentences of the
verdict (:func:`verdict`).
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS

from .classifier import confusion, f1_scores
from .metrics import COLUMN_LABELS, HIGHER_IS_BETTER, METRICS
from .patches import REAL
from .stats import (channel_verdict, claim_verdict, compare, decided, format_ci, fov_resamples, n_fovs, order_digits,
    paired_difference, percentile_interval)

COLUMNS = (*METRICS, "f1clf", "perceptual")  # Table 4.1's columns, in order
PIXEL = METRICS  # the columns of the thesis' claim for the pixel-loss model


def fov_values(pixel_long: pd.DataFrame, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per FOV, model, channel and metric (``fov_id, model, channel, metric, value``): the
    pixel metrics, plus the perceptual distance averaged over the FOV's patches of that channel."""
    cols = ["fov_id", "model", "channel", "metric", "value"]
    frames = [pixel_long[cols]]
    if scores is not None and len(scores):
        s = scores[scores["model"] != REAL]
        per = s.groupby(["fov_id", "model", "channel"], sort=False)["perceptual"].mean().reset_index()
        frames.append(per.rename(columns={"perceptual": "value"}).assign(metric="perceptual")[cols])
    return pd.concat(frames, ignore_index=True)


def fov_confusions(scores: pd.DataFrame, model: str, fovs) -> np.ndarray:
    """``[F, 6, 6]`` confusion counts of one model's patches, one matrix per FOV of ``fovs``."""
    s = scores[scores["model"] == model]
    out = np.zeros((len(fovs), len(TARGETS), len(TARGETS)), np.int64)
    for i, f in enumerate(fovs):
        g = s[s["fov_id"] == f]
        out[i] = confusion(g["class"], g["predicted"])
    return out


def f1_of(counts: np.ndarray, c: int | None) -> np.ndarray:
    """F1 of class ``c`` from confusion counts ``[..., 6, 6]`` (NaN where the class never occurs);
    ``c=None``: the macro F1, the mean F1 of the classes that occur (NaN if none does)."""
    if c is None:
        per = np.stack([f1_of(counts, k) for k in range(counts.shape[-1])], -1)
        n = np.isfinite(per).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, np.nansum(per, -1) / n, np.nan)
    tp = counts[..., c, c].astype(float)
    den = counts[..., c, :].sum(-1) + counts[..., :, c].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, np.nan)


def f1_bootstrap(per_fov: list[np.ndarray], c: int | None, n_resamples: int, confidence: float, seed: int):
    """F1 of class ``c`` (``None``: the macro F1 over the classes that occur) for one or two models (``per_fov``: their ``[F, 6, 6]`` confusions over the
    same FOVs) with a percentile interval over resampled FOVs (a FOV's patches move together), at
    :func:`vstain.evaluate.stats.bootstrap_level`. One model: ``(estimate, lo, hi)``; two: the same
    for the difference second minus first, on the same resampled FOVs."""
    f = per_fov[0].shape[0]
    est = [float(f1_of(m.sum(0), c)) for m in per_fov]
    value = est[0] if len(est) == 1 else est[1] - est[0]
    if f < 2:
        return value, float("nan"), float("nan"), est
    idx = fov_resamples(f, n_resamples, seed)
    draws = [f1_of(m[idx].sum(1), c) for m in per_fov]
    lo, hi = percentile_interval(draws[0] if len(draws) == 1 else draws[1] - draws[0], f, confidence)
    return value, lo, hi, est


def model_summary(values: pd.DataFrame, scores: pd.DataFrame | None, models: list[str], n_resamples: int = 9999,
                  confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Each model's value per channel and column with its bootstrap interval over FOVs.

    Returns one row per ``(channel, model, metric)``: ``estimate, ci_low, ci_high, n`` (n = FOVs).
    The per-FOV metrics give their mean over FOVs; F1clf is computed from all of a model's patches
    and its interval resamples whole FOVs, since patches of one FOV are not independent."""
    rows = []
    for (channel, model, metric), g in values.groupby(["channel", "model", "metric"], sort=False):
        v = g["value"].to_numpy(float)
        d = paired_difference(np.zeros_like(v), v, n_resamples, confidence, seed)  # b - 0: the mean of v
        rows.append({"channel": channel, "model": model, "metric": metric, "estimate": d.diff,
                     "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.n})
    if scores is not None and len(scores):
        fovs = list(dict.fromkeys(scores["fov_id"]))
        for model in models:
            if not (scores["model"] == model).any():
                continue
            per_fov = fov_confusions(scores, model, fovs)
            for channel in scores.loc[scores["model"] == model, "channel"].unique():
                est, lo, hi, _ = f1_bootstrap([per_fov], TARGETS.index(channel), n_resamples, confidence, seed)
                rows.append({"channel": channel, "model": model, "metric": "f1clf", "estimate": est,
                             "ci_low": lo, "ci_high": hi, "n": len(fovs)})
    out = pd.DataFrame(rows)
    out = out[out["model"].isin(models)]
    key = {(c, m, k): i for i, (c, m, k) in enumerate((c, m, k) for c in TARGETS for m in models for k in COLUMNS)}
    return out.assign(_o=[key.get(t, len(key)) for t in zip(out["channel"], out["model"], out["metric"])]) \
        .sort_values("_o").drop(columns="_o").reset_index(drop=True)


def pairwise(values: pd.DataFrame, scores: pd.DataFrame | None, models: list[str], n_resamples: int = 9999,
             confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired differences ``b - a`` for every pair of ``models`` (in their order), every channel and
    column: :func:`vstain.evaluate.stats.compare` on the per-FOV values, and for F1clf a paired
    bootstrap that resamples FOVs and scores both models on the same patches."""
    frames = []
    for a, b in combinations(models, 2):
        frames.append(compare(values, a, b, higher_is_better=HIGHER_IS_BETTER, n_resamples=n_resamples,
                              confidence=confidence, seed=seed))
        if scores is None or not len(scores):
            continue
        fovs = [f for f in dict.fromkeys(scores["fov_id"])
                if {a, b} <= set(scores.loc[scores["fov_id"] == f, "model"])]
        per_fov = [fov_confusions(scores, m, fovs) for m in (a, b)]
        rows = []
        for channel in TARGETS:
            if not (scores["channel"] == channel).any() or not fovs:
                continue
            diff, lo, hi, est = f1_bootstrap(per_fov, TARGETS.index(channel), n_resamples, confidence, seed)
            row = {"channel": channel, "metric": "f1clf", "model_a": a, "model_b": b, "n": len(fovs), "dropped": 0,
                   "mean_a": est[0], "mean_b": est[1], "diff": diff, "ci_low": lo, "ci_high": hi, "p": float("nan"),
                   "note": "pooled statistic: FOVs resampled, no rank test", "higher_is_better": True}
            row["better"] = (b if diff > 0 else a) if decided(row, confidence) else "none"
            rows.append(row)
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True)


def best(comparisons: pd.DataFrame, models: list[str]) -> set[tuple[str, str, str]]:
    """``(channel, model, metric)`` cells where the model is better than every other model (each
    paired interval excludes 0 with enough FOVs): the only cells Table 4.1 sets in bold."""
    wins: dict[tuple[str, str, str], int] = {}
    for _, r in comparisons.iterrows():
        if r["better"] in models:
            k = (r["channel"], r["better"], r["metric"])
            wins[k] = wins.get(k, 0) + 1
    return {k for k, w in wins.items() if w == len(models) - 1}


def display_table(summary: pd.DataFrame, comparisons: pd.DataFrame, models: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 4.1 as strings ``"0.93 [0.91, 0.95] (n = 24)"`` (``"0.93 (n = 1)"`` for one FOV), with a
    same-shaped frame of CSS that bolds :func:`best` cells. Rows ``(Channel, Model)``."""
    bold_cells = best(comparisons, models)
    index = [(c, m) for c in TARGETS for m in models if ((summary["channel"] == c) & (summary["model"] == m)).any()]
    shown = pd.DataFrame(index=pd.MultiIndex.from_tuples(index), columns=[COLUMN_LABELS[k] for k in COLUMNS], dtype=object)
    css = pd.DataFrame("", index=shown.index, columns=shown.columns)
    # one number of decimals per channel and column, enough that no two models' numbers merge or swap
    digits = {k: order_digits(pd.concat([g["estimate"], g["ci_low"], g["ci_high"]]).tolist() + [0.0])
              for k, g in summary.groupby(["channel", "metric"])}
    for _, r in summary.iterrows():
        col = COLUMN_LABELS[r["metric"]]
        shown.loc[(r["channel"], r["model"]), col] = format_ci(r["estimate"], r["ci_low"], r["ci_high"], int(r["n"]),
                                                               digits[(r["channel"], r["metric"])])
        if (r["channel"], r["model"], r["metric"]) in bold_cells:
            css.loc[(r["channel"], r["model"]), col] = "font-weight: bold"
    shown = shown.fillna("–")
    names = pd.MultiIndex.from_tuples([(TARGET_LABELS[c], m) for c, m in shown.index], names=["Channel", "Model"])
    shown.index, css.index = names, names
    return shown, css


def styled_table(summary: pd.DataFrame, comparisons: pd.DataFrame, models: list[str], caption: str = ""):
    """A pandas Styler of :func:`display_table` (bold: better than every other model)."""
    shown, css = display_table(summary, comparisons, models)
    sty = shown.style.apply(lambda _: css, axis=None)
    return sty.set_caption(caption) if caption else sty


def channel_sentences(comparisons: pd.DataFrame, a: str, b: str, blank: pd.DataFrame | None = None) -> list[str]:
    """Per channel, which of ``a`` and ``b`` is better on which columns, from the paired intervals.
    A model that predicts (almost) nothing of a channel (a row of ``blank``,
    :func:`vstain.evaluate.structure.blank_channels`) is said so first, before any column."""
    cells = comparisons[(comparisons["model_a"] == a) & (comparisons["model_b"] == b)]
    blank = blank if blank is not None else pd.DataFrame(columns=["model", "channel", "blank", "n"])
    out = []
    for channel in TARGETS:
        rows = cells[cells["channel"] == channel]
        rows = rows.iloc[np.argsort([COLUMNS.index(m) for m in rows["metric"]], kind="stable")]
        empty = blank[(blank["channel"] == channel) & blank["model"].isin([a, b])]
        first = "".join(f"the {r['model']} "
                        + ("puts its signal off it" if r.get("off", False) else "predicts almost none of it")
                        + f" (blank on {r['blank']} of {r['n']} FOVs); " for _, r in empty.iterrows())
        if rows.empty:
            if first:
                out.append(f"**{TARGET_LABELS[channel]}**: {first}not scored on any FOV.")
            continue
        groups: dict[str, list[str]] = {}
        for _, r in rows.iterrows():
            groups.setdefault(channel_verdict(r), []).append(COLUMN_LABELS[r["metric"]])
        parts = [f"{v} on {', '.join(cols)}" for v, cols in sorted(groups.items(), key=lambda kv: kv[0])]
        text = first + "; ".join(parts)
        out.append(f"**{TARGET_LABELS[channel]}**: {text}{'' if text.endswith('.') else '.'}")
    return out


def _budget_claim(result: str, late: list[str]) -> str:
    """A claim's result read at a budget where the models in ``late`` had not converged: a claim
    that fails is not tested there (more training could turn it), one that holds holds at this budget."""
    if not late or result.startswith("cannot"):
        return result
    return "is not tested at this budget" if result == "does not hold" else "holds at this budget"


def headline(comparisons: pd.DataFrame, pixel_model: str, adversarial_model: str,
             unconverged=(), budgets: dict[str, str] | None = None) -> str:
    """The two halves of the thesis' headline: the pixel-loss model is better on most pixel-metric
    cells (SSIM, MSE, MAE, PCC), the adversarial model on most F1clf cells. Each half "holds", "does
    not hold" or "cannot be decided with n = ...". When a model of the pair is in ``unconverged``
    (its test PCC still rose over the second half of training), a half that does not hold "is not
    tested at this budget" and one that holds "holds at this budget"; ``budgets`` (model -> its
    training budget in words) then names the budget."""
    a, b = pixel_model, adversarial_model
    pair = _pair(comparisons, a, b)
    late = [m for m in (a, b) if m in set(unconverged)]
    pixel, f1 = pair[pair["metric"].isin(PIXEL)], pair[pair["metric"] == "f1clf"]
    text = (f"The thesis' claim that the {a} is better on most pixel-metric cells (SSIM, MSE, MAE, PCC of "
            f"every channel) **{_budget_claim(claim_verdict(pixel, a, 'most'), late)}** in this run")
    if len(f1):
        text += (f"; its claim that the {b}'s channels are recognised better by the classifier (F1clf, most "
                 f"channels) **{_budget_claim(claim_verdict(f1, b, 'most'), late)}**.")
    else:
        text += "; F1clf was not scored."
    if late:
        spent = "; ".join(f"the {m} after {budgets[m]}" for m in late) if budgets else " and ".join(late)
        text += (f" {' and '.join(late)} had not converged ({spent}; PCC against the clean truth still rose "
                 "over the second half of training), so neither half is a verdict on the method.")
    return text


def _pair(comparisons: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    pair = comparisons[((comparisons["model_a"] == a) & (comparisons["model_b"] == b))
                       | ((comparisons["model_a"] == b) & (comparisons["model_b"] == a))]
    if pair.empty:
        raise ValueError(f"no comparison of {a!r} and {b!r} in the table")
    return pair


def verdict(comparisons: pd.DataFrame, pixel_model: str, adversarial_model: str,
            blank: pd.DataFrame | None = None) -> str:
    """The thesis' headline checked against the paired intervals: per channel, which model is better
    on which column, then :func:`headline`. ``blank`` names the channels a model predicts (almost)
    nothing of, said first in that channel's sentence."""
    a, b = pixel_model, adversarial_model
    pair = _pair(comparisons, a, b)
    lines = [f"Paired differences over the test FOVs, {b} against {a} ({n_fovs(pair['n'])}):", ""]
    lines += [f"- {s}" for s in channel_sentences(pair, pair["model_a"].iloc[0], pair["model_b"].iloc[0], blank)]
    lines += ["", headline(comparisons, a, b)]
    return "\n".join(lines)


def confusion_sentences(confs: dict[str, np.ndarray], min_share: float = 0.5) -> str:
    """What the classifier made of each model's channels, in words: the channels none of whose
    patches it recognised (F1clf = 0) and, for every channel recognised in fewer than ``min_share``
    of its patches, the class it was mostly read as.

    Args:
        confs: model -> confusion counts ``[6, 6]`` (row: the channel a patch was generated for).
    """
    out = []
    for model, conf in confs.items():
        f1 = f1_scores(conf)
        zero = [TARGET_LABELS[TARGETS[c]] for c in range(len(TARGETS)) if conf[c].sum() and f1[c] == 0]
        mixed = []
        for c, row in enumerate(conf):
            n = int(row.sum())
            if not n or row[c] / n >= min_share:
                continue
            other = int(np.argmax(np.where(np.arange(len(row)) == c, -1, row)))
            mixed.append(f"{TARGET_LABELS[TARGETS[c]]} as {TARGET_LABELS[TARGETS[other]]} "
                         f"({row[other] / n:.0%} of {n} patches)")
        text = f"**{model}**: " + (f"F1clf is 0 for {', '.join(zero)}. " if zero else "")
        text += ("Channels read mostly as another: " + "; ".join(mixed) + "." if mixed
                 else f"every channel is recognised in at least {min_share:.0%} of its patches.")
        out.append(text)
    return "\n\n".join(out)


def lowest_channels(summary: pd.DataFrame, model: str, metric: str = "pcc", k: int = 2) -> str:
    """Which channels ``model`` scores lowest on ``metric`` in a :func:`model_summary` table, with
    their values, and the channels where F1clf sits at 0 for every model (the classifier recognises
    none of their generated patches, so that column decides nothing there)."""
    own = summary[(summary["model"] == model) & (summary["metric"] == metric)].dropna(subset=["estimate"])
    if own.empty:
        return f"The table has no {COLUMN_LABELS[metric]} of the {model}."
    low = own.nsmallest(k, "estimate")
    named = " and ".join(f"{TARGET_LABELS[r['channel']]} ({format_ci(r['estimate'], r['ci_low'], r['ci_high'], int(r['n']))})"
                         for _, r in low.iterrows())
    text = (f"In this run the {model}'s lowest {COLUMN_LABELS[metric]} is on {named}, of "
            f"{len(own)} channels scored.")
    f1 = summary[summary["metric"] == "f1clf"].groupby("channel")["estimate"]
    floor = [TARGET_LABELS[c] for c, v in f1.max().items() if v == 0]
    if floor:
        text += (f" F1clf is 0 for every model on {', '.join(floor)}: the classifier recognises none of those "
                 "generated patches, so the column is at its floor and cannot rank the models there.")
    return text


F1_FLOOR, F1_CEILING = 0.05, 0.95  # F1clf at or below / above these for every model: no room to rank them


def f1_discrimination(summary: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per channel, whether F1clf can tell the models apart at all: ``"floor"`` when every model's
    F1clf is at most :data:`F1_FLOOR`, ``"ceiling"`` when every one is at least :data:`F1_CEILING`,
    else ``"discriminates"``. Columns ``channel, state, low, high`` (the lowest and highest F1clf)."""
    f1 = summary[(summary["metric"] == "f1clf") & summary["model"].isin(models)]
    rows = []
    for channel, g in f1.groupby("channel", sort=False):
        lo, hi = float(g["estimate"].min()), float(g["estimate"].max())
        state = "floor" if hi <= F1_FLOOR else "ceiling" if lo >= F1_CEILING else "discriminates"
        rows.append({"channel": channel, "state": state, "low": lo, "high": hi})
    return pd.DataFrame(rows, columns=["channel", "state", "low", "high"])


def _name(channel: str) -> str:
    """A channel's name inside a sentence: "DNA", else the label in lower case."""
    return "DNA" if channel == "dna" else TARGET_LABELS.get(channel, channel).lower()


def f1_discrimination_sentence(table: pd.DataFrame) -> str:
    """Which channels' F1clf sits at its floor or ceiling for every model, so that no verdict on
    realism can rest on F1clf there."""
    parts = []
    for state, what in (("floor", f"at or below {F1_FLOOR} for every model"),
                        ("ceiling", f"at or above {F1_CEILING} for every model")):
        chans = [_name(c) for c in table.loc[table["state"] == state, "channel"]]
        if chans:
            parts.append(f"F1clf is {what} on {', '.join(chans)}: there it cannot rank the models, and no "
                         "verdict on realism rests on it")
    if not parts:
        return "F1clf leaves room to rank the models on every channel (no channel at its floor or ceiling for all)."
    return "; ".join(parts) + "."

"""The learnability ordering: does a model find the same channels easy and hard on the simulated
world as the thesis' U-Net on the real data (Table 4.1)? And at what training budget is that order
measured?

* :func:`learnability` puts a model's per-channel PCC beside the thesis' Table 4.1, with Spearman's
  rho, its bootstrap interval over FOVs, and each channel's difference.
* :func:`channel_budget` says, per channel, whether the model was still learning it at the end of
  its training (its half-way and last snapshot against the clean truth): a channel still rising is
  ranked by the budget as much as by the world.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from vstain.channels import TARGET_LABELS, TARGETS

from .curves import half_way
from .metrics import evaluate_predictions, thesis_table41
from .stats import decided, min_pairs, paired_difference

WITHIN = 0.15  # a channel "matches" the thesis when its PCC is within this of Table 4.1's
LEARNED = 0.2  # below this PCC against the truth a channel counts as barely learned


def learnability(pixel_metrics: pd.DataFrame, model: str = "U-Net", n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A model's per-channel PCC (mean over the scored FOVs) beside the thesis' Table 4.1 U-Net.

    Returns ``(channels, summary)``: per channel ``pcc``, ``n``, ``thesis_pcc``, ``difference``
    (simulated - thesis) and both ranks; and one row with Spearman's ``rho`` over the six channels,
    its bootstrap interval (FOVs resampled within each channel, scipy.stats.bootstrap) and how many
    channels lie within :data:`WITHIN` of the thesis."""
    pcc = pixel_metrics[(pixel_metrics["model"] == model) & (pixel_metrics["metric"] == "pcc")]
    if pcc.empty:
        models = sorted(pixel_metrics["model"].unique())
        raise ValueError(f"no PCC of model {model!r} in the pixel metrics (models: {models})")
    thesis = thesis_table41()["pcc_mean"].xs("U-Net", level="model")
    samples = [pcc.loc[pcc["channel"] == c, "value"].dropna().to_numpy() for c in TARGETS]
    missing = [c for c, s in zip(TARGETS, samples) if len(s) == 0]
    if missing:
        raise ValueError(f"model {model!r} has no PCC for {missing}: the ordering needs all six channels")
    ref = thesis.reindex(list(TARGETS)).to_numpy()
    means = np.array([s.mean() for s in samples])
    table = pd.DataFrame({"channel": list(TARGETS), "label": [TARGET_LABELS[c] for c in TARGETS], "pcc": means,
                          "n": [len(s) for s in samples], "thesis_pcc": ref, "difference": means - ref,
                          "rank": stats.rankdata(-means).astype(int), "thesis_rank": stats.rankdata(-ref).astype(int)})

    def rho(*xs):
        return stats.spearmanr([np.mean(x) for x in xs], ref)[0]

    lo = hi = np.nan  # an interval needs two FOVs in every channel
    if min(len(s) for s in samples) >= 2:
        res = stats.bootstrap(samples, rho, n_resamples=n_resamples, confidence_level=confidence,
                              vectorized=False, paired=False, method="percentile", random_state=seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    summary = pd.DataFrame([{"model": model, "rho": float(stats.spearmanr(means, ref)[0]), "rho_lo": lo, "rho_hi": hi,
                             "confidence": confidence, "within": int((np.abs(means - ref) <= WITHIN).sum()),
                             "channels": len(TARGETS), "n_fovs": int(pcc["fov_id"].nunique())}])
    return table, summary


def learnability_sentence(summary: pd.DataFrame, table: pd.DataFrame) -> str:
    """The ordering's verdict in words, from :func:`learnability`'s tables."""
    s = summary.iloc[0]
    order = ", ".join(table.sort_values("rank")["label"])
    thesis_order = ", ".join(table.sort_values("thesis_rank")["label"])
    far = table[np.abs(table["difference"]) > WITHIN]
    far_txt = ("; farther than that: " + ", ".join(f"{r.label} ({r.difference:+.2f})" for r in far.itertuples())
               if len(far) else "")
    return (f"The {s['model']} ranks the channels {order} (highest PCC first); the thesis' Table 4.1 ranks them "
            f"{thesis_order}. Spearman's rho between the two is **{s['rho']:.2f}** "
            + (f"({s['confidence']:.0%} bootstrap interval over the {s['n_fovs']} test FOVs: {s['rho_lo']:.2f} to "
               f"{s['rho_hi']:.2f}). " if np.isfinite(s["rho_lo"]) else
               f"(no interval: a channel was scored on fewer than two of the {s['n_fovs']} test FOVs). ")
            + f"{s['within']} of {s['channels']} channels lie within {WITHIN} of the thesis' "
            f"PCC{far_txt}.")


def channel_budget(stage03: str | Path, snapshot_predictions: str | Path, model: str = "U-Net",
                   split: str = "test", confidence: float = 0.95) -> pd.DataFrame:
    """Per channel: the model's PCC against the clean truth at its half-way and last snapshot (the
    predictions of ``07_results``' learning curves, ``snapshot_predictions.csv``), the paired change
    over the test FOVs with its interval, and ``learning``: ``"still rising"`` when the change is a
    decided gain, ``"undecided"`` with too few FOVs, else ``"no detectable change"``. A channel still
    rising is ranked by the training budget as much as by the world."""
    snaps = pd.read_csv(snapshot_predictions)
    snaps = snaps[snaps["model"] == model]
    if snaps.empty:
        raise ValueError(f"{snapshot_predictions}: no snapshot of model {model!r}")
    mid, last = half_way(snaps["step"])
    dirs = {str(s): Path(d) / "predictions" for s, d in zip(snaps["step"], snaps["dir"]) if s in (mid, last)}
    long = evaluate_predictions(stage03, dirs, split=split, reference="truth")
    long = long[long["metric"] == "pcc"]
    rows = []
    for c in TARGETS:
        g = long[long["channel"] == c].pivot_table(index="fov_id", columns="model", values="value")
        d = paired_difference(g[str(mid)], g[str(last)], confidence=confidence)
        learning = ("undecided" if d.n < min_pairs(confidence) else
                    "still rising" if decided(d, confidence) and d.diff > 0 else "no detectable change")
        rows.append({"channel": c, "label": TARGET_LABELS[c], "mid_step": mid, "last_step": last,
                     "pcc_mid": d.mean_a, "pcc_last": d.mean_b, "gain": d.diff, "low": d.ci_low,
                     "high": d.ci_high, "n": d.n, "learning": learning})
    return pd.DataFrame(rows)


def budget_sentence(table: pd.DataFrame, summary: pd.DataFrame) -> str:
    """What :func:`channel_budget` means for the learnability ordering, in words."""
    t = table.iloc[0]
    rising = table[table["learning"] == "still rising"]
    low = table[table["pcc_last"] < LEARNED]
    conf = summary.iloc[0]["confidence"] if "confidence" in summary else 0.95
    out = (f"The ordering is measured after {t['last_step']} steps. Against the clean truth, between step "
           f"{t['mid_step']} and step {t['last_step']} ({conf:.0%} intervals over {t['n']} test FOVs), ")
    if len(rising):
        out += ("the PCC still rose for " + ", ".join(f"{r.label} ({r.gain:+.3f}, {r.low:+.3f} to {r.high:+.3f})"
                                                     for r in rising.itertuples())
                + ": where these channels fall in the order depends on the training budget as well as on the "
                  "simulated world.")
    else:
        out += "no channel's PCC changed detectably: the order is that of a model that had stopped learning."
    if len(low):
        out += (" " + ", ".join(f"{r.label} reached a PCC of only {r.pcc_last:.2f}" for r in low.itertuples())
                + f" at the end (below {LEARNED}): barely learned at this budget.")
    return out

"""Paired comparisons of models over test FOVs, with their uncertainty, and the sentences the book
states from them (thesis 4.2, Table 4.1).

Data flow: metric tables (long format, one row per FOV, model, channel and metric) -> paired
differences per channel and metric (:func:`compare`) -> verdicts (:func:`channel_verdict`,
:func:`claim_verdict`). Models are scored on the same test FOVs, so every comparison is paired by
FOV, and the FOV is the unit that is resampled: patches or voxels of one FOV share its cells and
its optics and are not independent (F1clf's intervals resample whole FOVs:
:func:`vstain.evaluate.comparison.f1_bootstrap`).

Conventions:

- A difference is always ``b - a`` (second model minus first). For a lower-is-better metric such as
  MSE a negative difference favours ``b``.
- Intervals are percentile bootstrap intervals (``scipy.stats.bootstrap``) taken at Hesterberg's
  expanded level (The American Statistician 69(4), 2015): the level is widened from ``1 - alpha``
  to ``1 - 2 Phi(-sqrt(n / (n - 1)) t_{alpha/2, n-1})``, which undoes most of the percentile
  interval's too-narrow coverage for few FOVs and leaves it unchanged for many. BCa is not used:
  it is undefined when all differences are equal and erratic for 3 to 5 FOVs.
- A model is called better only when the interval excludes 0 *and* there are at least
  :func:`min_pairs` FOVs (6 at 95 %), the fewest at which an exact two-sided signed-rank test can
  reach that level at all. Below that a bootstrap interval of differences that all share one sign
  always excludes 0 (no resample mean is below the smallest difference), which is no evidence.

Nothing of the project is imported here: channel, metric and model names come from the tables.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

N_RESAMPLES = 9999  # paired differences: a vectorised mean, cheap
QUANTIFIERS = {"all": "every", "most": "more than half of the", "any": "at least one of the"}


@dataclass(frozen=True)
class Difference:
    """A paired difference ``b - a`` over FOVs.

    Args:
        n: FOVs used (scored by both models, no NaN).
        dropped: FOVs left out because one model lacks them or a value is NaN.
        mean_a, mean_b: means over the n FOVs.
        diff: mean of ``b - a``.
        ci_low, ci_high: bootstrap interval of ``diff``; NaN when n < 2.
        p: two-sided Wilcoxon signed-rank p-value; 1 when every difference is 0, NaN when n = 0
            or no rank test applies.
        note: why the interval or p is missing or collapsed, else "".
    """

    n: int
    dropped: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of 0 (False for a NaN interval)."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    @property
    def reach(self) -> float:
        """The largest |difference| the interval allows: ``max(|ci_low|, |ci_high|)``."""
        return float(np.maximum(abs(self.ci_low), abs(self.ci_high)))


# ---------------------------------------------------------------------------------------------
# Intervals and tests
# ---------------------------------------------------------------------------------------------
def min_pairs(confidence: float = 0.95) -> int:
    """Fewest pairs at which an exact two-sided signed-rank test can reach ``confidence``
    (its smallest p-value is ``2 / 2**n``): 6 at 0.95, 8 at 0.99."""
    _check_confidence(confidence)
    return math.ceil(math.log2(2 / (1 - confidence)))


def bootstrap_level(n: int, confidence: float = 0.95) -> float:
    """Hesterberg's expanded level for a percentile interval of a mean of ``n`` values."""
    _check_confidence(confidence)
    if n < 2:
        raise ValueError(f"an interval needs n >= 2 values, got n = {n}")
    z = math.sqrt(n / (n - 1)) * stats.t.ppf(1 - (1 - confidence) / 2, n - 1)
    return float(min(1 - 2 * stats.norm.sf(z), 1 - 1e-12))


def fov_resamples(n_fovs: int, n_resamples: int = 999, seed: int = 0) -> np.ndarray:
    """``[n_resamples, n_fovs]`` FOV indices drawn with replacement: each row is one bootstrap
    resample of whole FOVs (a FOV's patches share its cells and optics, so they move together)."""
    n = int(n_fovs)
    return np.random.default_rng(seed).integers(0, n, (int(n_resamples), n))


def percentile_interval(draws, n_fovs: int, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a statistic's bootstrap ``draws`` over ``n_fovs`` resampled FOVs, at
    :func:`bootstrap_level`; draws that are not finite are dropped. NaN for fewer than two FOVs or
    no finite draw."""
    d = np.asarray(draws, dtype=float)
    d = d[np.isfinite(d)]
    if int(n_fovs) < 2 or not d.size:
        return float("nan"), float("nan")
    level = bootstrap_level(int(n_fovs), confidence)
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def signed_rank_p(d) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences ``d`` (NaN dropped).

    scipy picks the exact null distribution without ties or zeros, an exhaustive permutation for
    n <= 13 with them, else the normal approximation. All-zero differences give 1 (nothing
    differs); an empty ``d`` gives NaN."""
    d = np.asarray(d, float)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    if not d.any():
        return 1.0
    return float(stats.wilcoxon(d).pvalue)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _interval(data: tuple, statistic, vectorized: bool, n: int, n_resamples: int, confidence: float,
              seed: int) -> tuple[float, float, str]:
    if n < 2:
        return float("nan"), float("nan"), f"n = {n}: no interval"
    res = stats.bootstrap(data, statistic, n_resamples=n_resamples, vectorized=vectorized,
                          confidence_level=bootstrap_level(n, confidence), method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), ""


def paired_difference(a, b, n_resamples: int = N_RESAMPLES, confidence: float = 0.95,
                      seed: int = 0) -> Difference:
    """Mean paired difference ``b - a`` with its bootstrap interval and signed-rank p-value.

    Args:
        a, b: one value per FOV, in the same FOV order (NaN in either drops that FOV).
        n_resamples: bootstrap resamples of the FOVs (default 9999).
        confidence: interval level (default 0.95).
        seed: seed of the resampling, so a rerun prints the same interval.
    """
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per FOV in the same order, got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b, dropped = a[keep], b[keep], int((~keep).sum())
    d, n = b - a, int(keep.sum())
    if n == 0:
        nan = float("nan")
        return Difference(0, dropped, nan, nan, nan, nan, nan, nan, "no FOV scored by both models")
    diff = float(d.mean())
    if n >= 2 and np.ptp(d) <= 8 * np.finfo(float).eps * np.abs(d).max():  # equal up to rounding
        lo = hi = diff
        note = "all differences equal: the interval collapses to the point"
    else:
        lo, hi, note = _interval((d,), np.mean, True, n, n_resamples, confidence, seed)
    return Difference(n, dropped, float(a.mean()), float(b.mean()), diff, lo, hi, signed_rank_p(d), note)


def decided(x, confidence: float = 0.95) -> bool:
    """Whether a difference (:class:`Difference` or a :func:`compare` row) calls a winner: its
    interval excludes 0 and it rests on at least :func:`min_pairs` FOVs."""
    lo, hi, n = _field(x, "ci_low"), _field(x, "ci_high"), _field(x, "n")
    return bool((lo > 0 or hi < 0) and n >= min_pairs(confidence))


def _field(x, name: str):
    return x[name] if isinstance(x, (Mapping, pd.Series)) else getattr(x, name)


# ---------------------------------------------------------------------------------------------
# Tables of comparisons
# ---------------------------------------------------------------------------------------------
def _directions(higher_is_better: Mapping[str, bool] | bool, metrics) -> dict[str, bool]:
    if isinstance(higher_is_better, bool):
        return {m: higher_is_better for m in metrics}
    missing = [m for m in metrics if m not in higher_is_better]
    if missing:
        raise ValueError(f"higher_is_better has no entry for metric(s) {missing}: give True or False for each")
    return {m: bool(higher_is_better[m]) for m in metrics}


def compare(long: pd.DataFrame, model_a: str, model_b: str, *, higher_is_better: Mapping[str, bool] | bool,
            by=("channel", "metric"), fov: str = "fov_id", n_resamples: int = N_RESAMPLES,
            confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired comparison of two models in every cell (e.g. channel x metric) of a long table.

    Args:
        long: one row per FOV, model and cell, columns ``model``, ``fov``, ``value`` and the
            ``by`` columns (the layout :func:`vstain.evaluate.metrics.evaluate_predictions` writes:
            ``fov_id, structure, model, channel, metric, value``). NaN values are dropped.
        model_a, model_b: the two models; differences are ``model_b - model_a``.
        higher_is_better: per metric (needs ``"metric"`` in ``by``), or one bool for all cells.
        by: columns that define a cell (default ``("channel", "metric")``).
        fov: the column that pairs rows (inner join: a FOV counts only if both models have it).
        n_resamples, confidence, seed: as :func:`paired_difference`.

    Returns one row per cell in first-appearance order: the ``by`` columns, ``model_a``,
    ``model_b``, :class:`Difference`'s fields, ``higher_is_better`` and ``better`` (``model_a``,
    ``model_b`` or ``"none"``, see :func:`decided`).
    """
    by = list(by)
    missing = [c for c in ["model", fov, "value", *by] if c not in long.columns]
    if missing:
        raise ValueError(f"the long table lacks column(s) {missing}; it has {list(long.columns)}")
    if model_a == model_b:
        raise ValueError(f"model_a and model_b are both {model_a!r}: compare two different models")
    for m in (model_a, model_b):
        if m not in set(long["model"]):
            raise ValueError(f"model {m!r} is not in the table's 'model' column (it has {sorted(set(long['model']))})")
    if not isinstance(higher_is_better, bool) and "metric" not in by:
        raise ValueError(f"higher_is_better per metric needs 'metric' among by={by}; or pass one bool")
    sub = long[long["model"].isin([model_a, model_b])]
    repeated = sub.duplicated(["model", fov, *by])
    if repeated.any():
        raise ValueError(f"{int(repeated.sum())} rows repeat a (model, {fov}, {', '.join(by)}) key, e.g. "
                         f"{sub.loc[repeated, ['model', fov, *by]].iloc[0].tolist()}: pairing would be ambiguous")
    hib = _directions(higher_is_better, sub["metric"].unique() if "metric" in by else [])
    wide = sub.pivot(index=[*by, fov], columns="model", values="value")
    rows = []
    for key, cell in wide.groupby(level=by, sort=False):
        r = paired_difference(cell[model_a].to_numpy(), cell[model_b].to_numpy(), n_resamples, confidence, seed)
        row = {**dict(zip(by, key)), "model_a": model_a, "model_b": model_b, **asdict(r)}
        row["higher_is_better"] = higher_is_better if isinstance(higher_is_better, bool) else hib[row["metric"]]
        b_higher = r.diff > 0
        row["better"] = ((model_b if b_higher == row["higher_is_better"] else model_a)
                         if decided(r, confidence) else "none")
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread(a, b, **kwargs) -> Difference:
    """The paired difference between two trainings of the same model that differ only in the seed
    (per-FOV values ``a``, ``b``; keywords as :func:`paired_difference`). Its ``reach`` is the
    largest difference a change of seed alone is compatible with: the yardstick of
    :func:`is_finding`."""
    return paired_difference(a, b, **kwargs)


def is_finding(model_diff, seed_diff, confidence: float = 0.95) -> bool:
    """Whether a model difference is a finding: it calls a winner (:func:`decided`) and its
    |mean| exceeds the seed spread's reach ``max(|ci_low|, |ci_high|)``. Both arguments are
    :class:`Difference` objects or :func:`compare` rows; a seed spread without an interval
    (n < 2) admits no finding."""
    reach = np.maximum(abs(_field(seed_diff, "ci_low")), abs(_field(seed_diff, "ci_high")))  # NaN stays NaN
    return bool(decided(model_diff, confidence) and abs(_field(model_diff, "diff")) > reach)


def against_seed(comparison: pd.DataFrame, seed: pd.DataFrame, by=("channel", "metric"),
                 confidence: float = 0.95) -> pd.DataFrame:
    """:func:`compare`'s table with ``seed_reach`` and ``finding`` (:func:`is_finding`) per cell,
    ``seed`` being :func:`compare` of two seeds of one model; cells the seed table lacks are no
    finding."""
    by = list(by)
    ref = seed.set_index(by)[["ci_low", "ci_high"]]
    out = comparison.copy()
    keys = pd.MultiIndex.from_frame(out[by])
    lo, hi = ref["ci_low"].reindex(keys).to_numpy(), ref["ci_high"].reindex(keys).to_numpy()
    out["seed_reach"] = np.maximum(np.abs(lo), np.abs(hi))
    out["finding"] = [is_finding(r, {"ci_low": l, "ci_high": h}, confidence)
                      for (_, r), l, h in zip(out.iterrows(), lo, hi)]
    return out


# ---------------------------------------------------------------------------------------------
# Sentences and numbers for the book
# ---------------------------------------------------------------------------------------------
def n_fovs(n) -> str:
    """``"n = 1 FOV"``, ``"n = 4 FOVs"``, or ``"n = 3 to 5 FOVs"`` for several counts."""
    ns = sorted({int(v) for v in np.atleast_1d(n)})
    text = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]}"
    return f"n = {text} FOV{'' if ns == [1] else 's'}"


def channel_verdict(row, model_a: str | None = None, model_b: str | None = None, n: int | None = None,
                    confidence: float = 0.95) -> str:
    """One cell of :func:`compare` (or :func:`against_seed`) as a sentence: ``"<model> better"``;
    ``"no detectable difference with n = 8 FOVs"`` (interval includes 0); ``"cannot be decided
    with n = 4 FOVs"`` (fewer than :func:`min_pairs` FOVs, whatever the interval); or, when the
    winner's margin is within the seed-to-seed spread, ``"no difference beyond the seed-to-seed
    spread with n = 8 FOVs"``. Models and n default to the row's own."""
    a, b = model_a or row["model_a"], model_b or row["model_b"]
    n = int(row["n"]) if n is None else n
    better = row["better"]
    if better not in (a, b, "none"):
        raise ValueError(f"row's better={better!r} is neither {a!r}, {b!r} nor 'none'")
    if n == 0:
        return "not scored on any FOV"
    if n < min_pairs(confidence):
        return f"cannot be decided with {n_fovs(n)}"
    if better == "none":
        return f"no detectable difference with {n_fovs(n)}"
    if "finding" in row and not row["finding"]:
        return f"no difference beyond the seed-to-seed spread with {n_fovs(n)}"
    return f"{better} better"


def claim_verdict(comparison: pd.DataFrame, winner: str, quantifier: str = "all") -> str:
    """Whether "``winner`` beats the other model in <quantifier> cells of ``comparison``" holds.

    A cell supports the claim when :func:`compare` calls ``winner`` better, contradicts it when it
    calls the other model better (with a ``finding`` column, only cells that are findings count
    either way), and is open otherwise. The claim "holds" when the supporting cells already meet
    the quantifier (``"all"``: every cell; ``"most"``: more than half; ``"any"``: one), "does not
    hold" when it cannot be met even if every open cell turned out to support it, and otherwise
    "cannot be decided with n = ..." FOVs.
    """
    if quantifier not in QUANTIFIERS:
        raise ValueError(f"quantifier must be one of {sorted(QUANTIFIERS)}, got {quantifier!r}")
    if comparison.empty:
        raise ValueError("the comparison table is empty: a claim needs at least one cell")
    pairs = set(zip(comparison["model_a"], comparison["model_b"]))
    if len(pairs) != 1 or winner not in next(iter(pairs)):
        raise ValueError(f"a claim needs one model pair that includes {winner!r}, the table has {sorted(pairs)}")
    a, b = next(iter(pairs))
    loser = a if winner == b else b
    counts = comparison["finding"] if "finding" in comparison else pd.Series(True, index=comparison.index)
    support = int(((comparison["better"] == winner) & counts).sum())
    against = int(((comparison["better"] == loser) & counts).sum())
    k = len(comparison)
    need = {"all": k, "most": k // 2 + 1, "any": 1}[quantifier]
    if support >= need:
        return "holds"
    if support + (k - support - against) < need:
        return "does not hold"
    return f"cannot be decided with {n_fovs(comparison['n'])}"


def order_digits(values, min_digits: int = 2) -> int:
    """Fewest decimals (at least ``min_digits``) at which distinct finite ``values`` print distinct,
    so the order shown is the order of the numbers (rounding never reverses an order; too few
    decimals only merge neighbours, ``-0.00`` and ``0.00`` count as equal)."""
    v = np.unique(np.asarray(values, float).ravel())
    v = v[np.isfinite(v)]
    for d in range(min_digits, 60):
        shown = [Decimal(f"{x:.{d}f}") for x in v]
        if all(p < q for p, q in zip(shown, shown[1:])):
            return d
    raise ValueError(f"values {v.tolist()} differ below 1e-60: no fixed-point format separates them")


def format_ordered(values, min_digits: int = 2) -> list[str]:
    """``values`` printed with :func:`order_digits` decimals (NaN as ``"nan"``)."""
    d = order_digits(values, min_digits)
    return [f"{x:.{d}f}" if np.isfinite(x) else "nan" for x in np.asarray(values, float).ravel()]


def format_ci(mean: float, lo: float, hi: float, n: int, digits: int | None = None) -> str:
    """``"0.93 [0.91, 0.95] (n = 4)"``; one value or no interval shows ``"0.93 (n = 1)"``, never
    a zero spread. ``digits`` defaults to :func:`order_digits` of the three numbers and 0, so the
    printed interval keeps its order and its side of 0 (``0.0003`` never shows as ``0.000``)."""
    if not np.isfinite(mean):
        return f"n/a (n = {n})"
    if n < 2 or not (np.isfinite(lo) and np.isfinite(hi)):
        d = order_digits([mean, 0.0]) if digits is None else digits
        return f"{mean:.{d}f} (n = {n})"
    d = order_digits([lo, mean, hi, 0.0]) if digits is None else digits
    return f"{mean:.{d}f} [{lo:.{d}f}, {hi:.{d}f}] (n = {n})"

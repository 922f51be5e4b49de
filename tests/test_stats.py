"""Paired model comparisons: intervals, tests, cluster resampling, verdicts, formatting, forest plot."""
from __future__ import annotations

from decimal import Decimal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from scipy import stats as sps  # noqa: E402

from vstain.evaluate import stats as S
from vstain.plots.stats import forest_plot

HIB = {"ssim": True, "mse": False}
CHANNELS = ("dna", "mito", "nucleoli")
R = 999  # resamples: enough for the tests, fast


def long_table(n_fov: int, shift: dict[str, float], seed: int = 0, models=("U-Net", "WGAN")) -> pd.DataFrame:
    """Per-FOV scores of two models; the second is the first plus ``shift[metric]`` plus small noise
    (no noise where the shift is 0, so those models are identical)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in CHANNELS:
        for metric, centre in (("ssim", 0.7), ("mse", 0.02)):
            base = centre + rng.normal(0, centre / 10, n_fov)
            noise = rng.normal(0, abs(shift[metric]) / 10, n_fov)
            for i in range(n_fov):
                rows.append({"fov_id": f"f{i}", "model": models[0], "channel": c, "metric": metric, "value": base[i]})
                rows.append({"fov_id": f"f{i}", "model": models[1], "channel": c, "metric": metric,
                             "value": base[i] + shift[metric] + noise[i]})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# paired_difference and its pieces
# ---------------------------------------------------------------------------------------------
def test_min_pairs_and_expanded_level():
    assert S.min_pairs(0.95) == 6 and S.min_pairs(0.99) == 8
    levels = [S.bootstrap_level(n) for n in (2, 3, 7, 20, 200)]
    assert all(x > y for x, y in zip(levels, levels[1:]))  # widening shrinks as n grows
    assert 0.95 < levels[-1] < 0.952 and 0.965 < levels[3] < 0.972
    with pytest.raises(ValueError, match="confidence"):
        S.min_pairs(1.0)
    with pytest.raises(ValueError, match="n >= 2"):
        S.bootstrap_level(1)


def test_identical_models_show_no_difference_in_any_cell():
    table = S.compare(long_table(7, {"ssim": 0.0, "mse": 0.0}), "U-Net", "WGAN", higher_is_better=HIB, n_resamples=R)
    assert len(table) == 6 and (table["n"] == 7).all()
    assert (table["better"] == "none").all() and (table["diff"] == 0).all() and (table["p"] == 1).all()
    assert {S.channel_verdict(r) for _, r in table.iterrows()} == {"no detectable difference with n = 7 FOVs"}


@pytest.mark.parametrize("ssim_shift, mse_shift, winner", [
    (0.05, -0.004, "WGAN"),   # WGAN higher SSIM and lower MSE: better on both
    (-0.05, 0.004, "U-Net"),  # the reverse
])
def test_clear_margin_on_every_fov_is_called_better(ssim_shift, mse_shift, winner):
    long = long_table(8, {"ssim": ssim_shift, "mse": mse_shift}, seed=3)
    for a, b in (("U-Net", "WGAN"), ("WGAN", "U-Net")):  # the order of the pair does not matter
        table = S.compare(long, a, b, higher_is_better=HIB, n_resamples=R)
        assert (table["better"] == winner).all(), table
        assert (table["p"] < 0.01).all()  # 8 FOVs of one sign: exact p = 2 / 2**8
        assert {S.channel_verdict(r) for _, r in table.iterrows()} == {f"{winner} better"}
        assert S.claim_verdict(table, winner, "all") == "holds"
        assert S.claim_verdict(table, "U-Net" if winner == "WGAN" else "WGAN", "any") == "does not hold"
    mse = table[table["metric"] == "mse"]
    assert (np.sign(mse["diff"]) == np.sign(-mse_shift if (a, b) == ("WGAN", "U-Net") else mse_shift)).all()


@pytest.mark.parametrize("n, called", [(3, False), (5, False), (6, True), (9, True)])
def test_too_few_fovs_call_no_winner_even_when_all_agree(n, called):
    d = S.paired_difference(np.zeros(n), np.linspace(0.1, 0.2, n), n_resamples=R)
    assert d.excludes_zero  # a one-signed bootstrap interval always excludes 0 ...
    assert S.decided(d) is called  # ... which counts only from min_pairs() FOVs on


def test_bootstrap_intervals_cover_the_true_difference_about_95_percent():
    rng = np.random.default_rng(2024)
    hits = []
    for i in range(200):
        a = rng.normal(5.0, 1.0, 20)
        d = S.paired_difference(a, a + rng.normal(0.3, 1.0, 20), n_resamples=R, seed=i)
        hits.append(d.ci_low <= 0.3 <= d.ci_high)
    assert 0.88 <= np.mean(hits) <= 0.99


def test_degenerate_inputs():
    one = S.paired_difference([0.5], [0.7])
    assert one.n == 1 and one.diff == pytest.approx(0.2) and np.isnan(one.ci_low) and np.isnan(one.ci_high)
    assert "n = 1" in one.note and not one.excludes_zero and np.isnan(one.reach)
    two = S.paired_difference([1.0, 2.0], [1.5, 3.0], n_resamples=R)
    assert two.n == 2 and 0.5 <= two.ci_low <= two.ci_high <= 1.0 and not S.decided(two)
    same = S.paired_difference([0.1, 0.4, 0.9], [0.35, 0.65, 1.15])  # every difference 0.25
    assert same.ci_low == same.ci_high == pytest.approx(0.25) and "collapses" in same.note
    zeros = S.paired_difference([0.3, 0.2, 0.1, 0.4], [0.3, 0.2, 0.1, 0.4])
    assert (zeros.diff, zeros.ci_low, zeros.ci_high, zeros.p) == (0, 0, 0, 1)
    gaps = S.paired_difference([1.0, np.nan, 3.0, 4.0, 2.0], [2.0, 3.0, np.nan, 5.5, 2.5], n_resamples=R)
    assert (gaps.n, gaps.dropped) == (3, 2) and gaps.mean_a == pytest.approx(7 / 3)
    assert gaps.diff == pytest.approx((1 + 1.5 + 0.5) / 3)
    empty = S.paired_difference([np.nan], [1.0])
    assert empty.n == 0 and np.isnan(empty.diff) and "no FOV" in empty.note
    with pytest.raises(ValueError, match="3 and 2 values"):
        S.paired_difference([1, 2, 3], [1, 2])


def test_signed_rank_p_follows_scipy_and_handles_zeros():
    d = np.array([0.3, -0.1, 0.25, 0.4, 0.05, 0.6, -0.02])
    assert S.signed_rank_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert S.signed_rank_p(np.zeros(5)) == 1.0 and np.isnan(S.signed_rank_p([np.nan]))


def test_compare_pairs_by_fov_drops_nan_and_checks_its_input():
    long = long_table(6, {"ssim": 0.05, "mse": -0.004})
    long = long[~((long["model"] == "WGAN") & (long["fov_id"] == "f0"))]  # WGAN lacks one FOV
    long.loc[(long["model"] == "U-Net") & (long["fov_id"] == "f1") & (long["channel"] == "dna"), "value"] = np.nan
    table = S.compare(long, "U-Net", "WGAN", higher_is_better=HIB, n_resamples=R).set_index(["channel", "metric"])
    assert table.loc[("dna", "ssim"), "n"] == 4 and table.loc[("dna", "ssim"), "dropped"] == 2
    assert table.loc[("mito", "mse"), "n"] == 5 and (table["better"] == "none").all()  # n < 6
    with pytest.raises(ValueError, match="lacks column"):
        S.compare(long.drop(columns="fov_id"), "U-Net", "WGAN", higher_is_better=HIB)
    with pytest.raises(ValueError, match="'GAN' is not in"):
        S.compare(long, "U-Net", "GAN", higher_is_better=HIB)
    with pytest.raises(ValueError, match="no entry for metric"):
        S.compare(long, "U-Net", "WGAN", higher_is_better={"ssim": True})
    with pytest.raises(ValueError, match="repeat"):
        S.compare(pd.concat([long, long.head(1)]), "U-Net", "WGAN", higher_is_better=HIB)


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------
def test_a_model_difference_within_the_seed_spread_is_no_finding():
    rng = np.random.default_rng(5)
    a = rng.normal(0.7, 0.05, 9)
    seed = S.seed_spread(a, a + rng.normal(0.02, 0.004, 9), n_resamples=R)  # reach about 0.023
    big = S.paired_difference(a, a + 0.06 + rng.normal(0, 0.004, 9), n_resamples=R)
    small = S.paired_difference(a, a + 0.015 + rng.normal(0, 0.001, 9), n_resamples=R)
    assert S.decided(big) and S.decided(small)
    assert S.is_finding(big, seed) and not S.is_finding(small, seed)
    assert not S.is_finding(big, S.seed_spread([0.1], [0.2]))  # no seed interval, no finding

    long = long_table(8, {"ssim": 0.05, "mse": -0.004}, seed=1)
    seeds = long_table(8, {"ssim": 0.01, "mse": -0.01}, seed=1, models=("U-Net s0", "U-Net s1"))
    cmp = S.compare(long, "U-Net", "WGAN", higher_is_better=HIB, n_resamples=R)
    spread = S.compare(seeds, "U-Net s0", "U-Net s1", higher_is_better=HIB, n_resamples=R)
    judged = S.against_seed(cmp, spread)
    ssim, mse = judged[judged["metric"] == "ssim"], judged[judged["metric"] == "mse"]
    assert ssim["finding"].all() and not mse["finding"].any()
    assert set(mse.apply(S.channel_verdict, axis=1)) == {"no difference beyond the seed-to-seed spread with n = 8 FOVs"}
    assert S.claim_verdict(ssim, "WGAN") == "holds"
    assert S.claim_verdict(mse, "WGAN") == "cannot be decided with n = 8 FOVs"


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------
def cells(better: list[str], n=4) -> pd.DataFrame:
    ns = n if isinstance(n, list) else [n] * len(better)
    return pd.DataFrame({"model_a": "A", "model_b": "B", "better": better, "n": ns})


@pytest.mark.parametrize("better, quantifier, verdict", [
    (["B", "B", "B"], "all", "holds"),
    (["B", "none", "B"], "all", "cannot be decided with n = 4 FOVs"),
    (["B", "A", "B"], "all", "does not hold"),
    (["B", "B", "none"], "most", "holds"),
    (["B", "none", "none"], "most", "cannot be decided with n = 4 FOVs"),
    (["B", "A", "none", "none"], "most", "cannot be decided with n = 4 FOVs"),
    (["B", "A", "A", "none"], "most", "does not hold"),
    (["none", "A"], "any", "cannot be decided with n = 4 FOVs"),
    (["A", "A"], "any", "does not hold"),
    (["A", "B"], "any", "holds"),
])
def test_claim_verdict_rule(better, quantifier, verdict):
    assert S.claim_verdict(cells(better), "B", quantifier) == verdict


def test_claim_and_channel_verdict_texts_and_errors():
    assert S.claim_verdict(cells(["none", "B", "none"], n=[3, 5, 4]), "B") == "cannot be decided with n = 3 to 5 FOVs"
    assert S.channel_verdict(cells(["none"], n=1).iloc[0]) == "cannot be decided with n = 1 FOV"
    assert S.channel_verdict(cells(["none"], n=5).iloc[0]) == "cannot be decided with n = 5 FOVs"
    assert S.channel_verdict(cells(["none"], n=6).iloc[0]) == "no detectable difference with n = 6 FOVs"
    assert S.channel_verdict(cells(["A"], n=6).iloc[0], "A", "B") == "A better"
    assert S.channel_verdict(cells(["none"], n=0).iloc[0]) == "not scored on any FOV"
    with pytest.raises(ValueError, match="better='C'"):
        S.channel_verdict(cells(["C"]).iloc[0])
    with pytest.raises(ValueError, match="quantifier"):
        S.claim_verdict(cells(["B"]), "B", "majority")
    with pytest.raises(ValueError, match="includes 'C'"):
        S.claim_verdict(cells(["B"]), "C")
    with pytest.raises(ValueError, match="empty"):
        S.claim_verdict(cells([]), "B")


@pytest.mark.parametrize("args, text", [
    ((0.93, 0.91, 0.95, 4), "0.93 [0.91, 0.95] (n = 4)"),
    ((0.9312, 0.9299, 0.9388, 7), "0.931 [0.930, 0.939] (n = 7)"),
    ((0.0012, 0.0003, 0.0021, 5), "0.0012 [0.0003, 0.0021] (n = 5)"),
    ((0.93, np.nan, np.nan, 1), "0.93 (n = 1)"),
    ((0.93, 0.93, 0.93, 1), "0.93 (n = 1)"),
    ((0.25, 0.25, 0.25, 3), "0.25 [0.25, 0.25] (n = 3)"),
    ((np.nan, np.nan, np.nan, 0), "n/a (n = 0)"),
])
def test_format_ci(args, text):
    assert S.format_ci(*args) == text


def test_rounding_never_merges_or_reverses_distinct_numbers():
    rng = np.random.default_rng(11)
    cases = [[0.1, 0.1 + 1e-12, 0.1], [-0.001, 0.001, 0.0], [0.7449, 0.7451, 0.745], [12.0, 11.99999]]
    cases += [list(rng.normal(rng.uniform(-1, 1), 10.0 ** rng.integers(-6, 1), 5)) for _ in range(200)]
    for values in cases:
        shown = [Decimal(s) for s in S.format_ordered(values)]
        for x, sx in zip(values, shown):
            for y, sy in zip(values, shown):
                assert (sx < sy) == (x < y) and (sx == sy) == (x == y), (values, shown)
    assert S.format_ordered([0.5, 0.25]) == ["0.50", "0.25"] and S.order_digits([0.7449, 0.7451]) == 2
    assert S.order_digits([0.7449, 0.7451, 0.745]) == 4
    assert S.format_ordered([0.5, np.nan]) == ["0.50", "nan"]


# ---------------------------------------------------------------------------------------------
# Forest plot
# ---------------------------------------------------------------------------------------------
def test_forest_plot_draws_one_panel_per_pair_and_metric_with_b_better_to_the_right():
    long = pd.concat([long_table(8, {"ssim": 0.05, "mse": -0.004}, seed=2),
                      long_table(8, {"ssim": 0.0, "mse": 0.0}, seed=2, models=("U-Net", "WGAN from U-Net"))])
    long = long.drop_duplicates(["model", "fov_id", "channel", "metric"])
    tables = [S.compare(long, "U-Net", m, higher_is_better=HIB, n_resamples=R) for m in ("WGAN", "WGAN from U-Net")]
    fig = forest_plot(tables, labels={"ssim": "SSIM", "mse": "MSE"})
    assert len(fig.axes) == 4
    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == len(CHANNELS)
        xs = [c.lines[0].get_xdata()[0] for c in bars]
        filled = [c.lines[0].get_markerfacecolor() != "white" for c in bars]
        if "vs U-Net: " in ax.get_title() and ax.get_title().startswith("WGAN vs"):
            assert all(x > 0 for x in xs) and all(filled)  # better on SSIM and on MSE (flipped)
        else:
            assert not any(filled)
        assert "better" in ax.get_xlabel() and ("lower is better" in ax.get_xlabel()) == ("MSE" in ax.get_title())
    plt.close(fig)
    with pytest.raises(ValueError, match="missing column"):
        forest_plot(tables[0].drop(columns="better"))


def test_fov_percentile_interval_covers_the_mean_and_widens_for_few_fovs():
    """The whole-FOV bootstrap shared by F1clf, KID and the trends: the interval of a mean over FOVs
    covers the true mean about as often as asked, and Hesterberg's level widens it for few FOVs."""
    rng = np.random.default_rng(3)
    hits = 0
    for trial in range(200):
        x = rng.normal(1.0, 1.0, 12)
        idx = S.fov_resamples(12, 999, seed=trial)
        lo, hi = S.percentile_interval(x[idx].mean(axis=1), 12)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99
    x = rng.normal(0, 1, 4)
    draws = x[S.fov_resamples(4, 4999, 0)].mean(axis=1)
    lo, hi = S.percentile_interval(draws, 4)
    plain_lo, plain_hi = np.percentile(draws, [2.5, 97.5])
    assert lo < plain_lo and hi > plain_hi
    assert np.isnan(S.percentile_interval(draws, 1)).all() and np.isnan(S.percentile_interval([np.nan], 6)).all()

"""The seed spread as the yardstick of model differences: which winners survive it, the table,
the sentences, the figure, and adding a second seed to 07_results' tables."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from test_classifier import blob_records  # noqa: E402

from vstain.channels import TARGETS
from vstain.evaluate import classifier as C
from vstain.evaluate import patches as P
from vstain.evaluate import perceptual as Q
from vstain.evaluate import seeds
from vstain.evaluate.comparison import fov_values
from vstain.evaluate.metrics import evaluate_predictions
from vstain.plots.stats import seed_forest_plot
from vstain.preprocess.processed import write_processed
from vstain.volumes import read_volume, write_volume

R = 999


def values_table(n_fov=9, seed_sd=0.05, shifts=None, seed=0) -> pd.DataFrame:
    """Per-FOV PCC and MAE of the U-Net, its second seed (U-Net plus noise of ``seed_sd``) and the
    models of ``shifts`` (U-Net plus a constant shift, plus noise a tenth of it)."""
    shifts = shifts or {"small": 0.02, "large": 0.3}
    rng = np.random.default_rng(seed)
    rows = []
    for ch in ("dna", "membrane", "mito"):
        for metric, centre in (("pcc", 0.7), ("mae", 0.4)):
            base = centre + 0.05 * rng.standard_normal(n_fov)
            models = {"U-Net": base, "U-Net s1": base + seed_sd * rng.standard_normal(n_fov)}
            for m, s in shifts.items():
                models[m] = base + s + abs(s) / 10 * rng.standard_normal(n_fov)
            for m, v in models.items():
                rows += [{"fov_id": f"f{i}", "model": m, "channel": ch, "metric": metric, "value": v[i]}
                         for i in range(n_fov)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table():
    return seeds.seed_comparison(values_table(), None, "U-Net", "U-Net s1", ["small", "large"], n_resamples=R)


def test_winners_within_the_seed_spread_are_not_findings(table):
    assert list(dict.fromkeys(table["kind"])) == ["seed", "model"]
    assert list(dict.fromkeys(table["model_b"])) == ["U-Net s1", "small", "large"]
    assert list(table.loc[table["kind"] == "seed", "channel"].iloc[:2]) == ["dna", "dna"]  # channel, then column order
    seed_rows = table[table["kind"] == "seed"]
    assert np.allclose(seed_rows["seed_reach"], np.maximum(seed_rows["ci_low"].abs(), seed_rows["ci_high"].abs()))
    small, large = (table[table["model_b"] == m] for m in ("small", "large"))
    assert (small["better"] != "none").all()  # a shift of 0.02 with little noise: every interval excludes 0 ...
    assert not small["finding"].any()  # ... but 0.02 is within the seeds' spread (noise sd 0.05)
    assert large["finding"].all()
    assert (small["seed_reach"].to_numpy() > 0.02).all()


def test_display_and_sentences_say_which_winners_survive(table):
    shown = seeds.seed_display(table)
    assert shown.shape == (6, 6) and list(shown.index[0]) == ["DNA", "MAE"]
    assert list(shown.columns) == ["U-Net s1 − U-Net", "seed p", "small − U-Net", "small: verdict",
                                   "large − U-Net", "large: verdict"]
    assert set(shown["small: verdict"]) == {"within seed spread"} and set(shown["large: verdict"]) == {"finding"}
    assert shown.iloc[0, 0].endswith("(n = 9)")
    text = seeds.seed_verdict(table)
    assert "**small against U-Net**: 6 of 6 cells call a winner, **0** of them beyond the seed spread" in text
    assert "**large against U-Net**: 6 of 6 cells call a winner, **6** of them" in text
    assert "no difference beyond the seed-to-seed spread with n = 9 FOVs on MAE, PCC" in text
    assert "U-Net better on MAE; large better on PCC" in text  # MAE: lower is better


def test_identical_seeds_make_every_decided_difference_a_finding():
    t = seeds.seed_comparison(values_table(seed_sd=0.0), None, "U-Net", "U-Net s1", ["small"], n_resamples=R)
    assert (t.loc[t["kind"] == "seed", "seed_reach"] == 0).all()
    assert t.loc[t["kind"] == "model", "finding"].all()
    assert "(U-Net s1 against U-Net, n = 9 FOVs) in **0 of 6** cells" in seeds.seed_verdict(t)


def test_bad_input_is_named():
    v = values_table()
    with pytest.raises(ValueError, match="'nope' is not in the per-FOV values"):
        seeds.seed_comparison(v, None, "U-Net", "nope", ["small"])
    with pytest.raises(ValueError, match="must not include the reference"):
        seeds.seed_comparison(v, None, "U-Net", "U-Net s1", ["U-Net s1"])
    with pytest.raises(ValueError, match="no seed rows"):
        seeds.seed_display(pd.DataFrame({"kind": ["model"]}))
    with pytest.raises(FileNotFoundError, match="07_results"):
        seeds.read_results("/nonexistent/07_results")


def test_seed_forest_plot_puts_the_seed_beside_each_model(table):
    fig = seed_forest_plot(table, labels={"pcc": "PCC", "mae": "MAE"})
    axes = fig.axes
    assert len(axes) == 4  # 2 model pairs x 2 metrics
    assert axes[0].get_title() == "small vs U-Net: MAE"
    # per channel: the model marker, the seed marker and the band of the seed's reach
    assert len(axes[0].containers) == 3 * 2 + 3  # errorbar containers (2 per channel) + 3 bar containers
    bands = [p for p in axes[0].patches]
    assert len(bands) == 3 and all(abs(b.get_x() + b.get_width() / 2) < 1e-12 for b in bands)
    plt.close(fig)
    with pytest.raises(ValueError, match="seed and model rows"):
        seed_forest_plot(table[table["kind"] == "model"])


def _blob_set(tmp_path, shape=(8, 24, 26)):
    """Three FOVs per structure of random blobs; a model that predicts the target (NaN as 0)."""
    stage = tmp_path / "03_denoising"
    df = write_processed(stage, blob_records(shape))
    d = tmp_path / "copy"
    for _, r in df[df["split"] == "test"].iterrows():
        write_volume(d / f"{r['fov_id']}.tif", np.nan_to_num(read_volume(stage / r["path"])[1:], nan=0.0))
    return stage, d


def test_with_model_scores_the_second_seed_like_table_41(tmp_path):
    stage, d = _blob_set(tmp_path)
    cfg = C.ClassifierConfig(patch=(8, 8, 8), widen_factor=0.125)
    clf = C.build_classifier(cfg)
    pixel = evaluate_predictions(stage, {"U-Net": d})
    scores = Q.score_models(clf, cfg, stage, {"U-Net": d})
    pixel2, scores2 = seeds.with_model(pixel, scores, stage, "U-Net s1", d, clf, cfg)
    a, b = (pixel2[pixel2["model"] == m].drop(columns="model").reset_index(drop=True) for m in ("U-Net", "U-Net s1"))
    pd.testing.assert_frame_equal(a, b)
    sa, sb = (scores2[scores2["model"] == m].drop(columns="model").reset_index(drop=True) for m in ("U-Net", "U-Net s1"))
    pd.testing.assert_frame_equal(sa, sb)
    assert (scores2["model"] == P.REAL).sum() == (scores["model"] == P.REAL).sum()
    with pytest.raises(ValueError, match="already in the 07_results tables"):
        seeds.with_model(pixel, scores, stage, "U-Net", d, clf, cfg)
    with pytest.raises(ValueError, match="are not those of the 07_results tables"):
        seeds.with_model(pixel, scores.iloc[1:], stage, "U-Net s1", d, clf, cfg)


def test_f1clf_cells_use_the_seeds_patches():
    """Patches of 9 FOVs: the U-Net reads half its DNA patches as membrane, its second seed exactly the
    same, the WGAN all of them right; F1clf's seed difference is 0, so the WGAN's DNA gain is a finding."""
    rng = np.random.default_rng(0)
    rows = []
    for f in range(9):
        for ch in ("dna", "membrane"):
            c = TARGETS.index(ch)
            for k in range(6):
                wrong = ch == "dna" and rng.random() < 0.5
                for model in (P.REAL, "U-Net", "U-Net s1", "WGAN"):
                    pred = TARGETS.index("membrane") if wrong and model in ("U-Net", "U-Net s1") else c
                    rows.append({"model": model, "fov_id": f"f{f}", "channel": ch, "class": c, "predicted": pred,
                                 "perceptual": 0.0 if model == P.REAL else 0.3 + 0.01 * k})
    scores = pd.DataFrame(rows)
    pixel = values_table(shifts={"WGAN": 0.01}).query("channel != 'mito'").assign(structure="mito")
    t = seeds.seed_comparison(fov_values(pixel, scores), scores, "U-Net", "U-Net s1", ["WGAN"], n_resamples=R)
    f1 = t[t["metric"] == "f1clf"].set_index(["kind", "channel"])
    assert f1.loc[("seed", "dna"), "diff"] == 0 and f1.loc[("seed", "dna"), "seed_reach"] == 0
    assert f1.loc[("model", "dna"), "diff"] > 0 and bool(f1.loc[("model", "dna"), "finding"])
    per = t[t["metric"] == "perceptual"]
    assert len(per) == 4 and (per.loc[per["kind"] == "seed", "diff"] == 0).all()


def test_a_list_ending_in_an_abbreviation_ends_with_one_period():
    values = values_table(shifts={"small": 0.02})
    values = values[values["metric"] == "mae"].assign(metric="perceptual")  # label "Perceptual dist."
    text = seeds.seed_verdict(seeds.seed_comparison(values, None, "U-Net", "U-Net s1", ["small"], n_resamples=R))
    assert "so not findings: DNA Perceptual dist.," in text and "Perceptual dist.." not in text

"""Table 4.1 with intervals: per-FOV values, model summaries, paired comparisons, bold cells and
the verdict, on synthetic per-FOV tables whose answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vstain.channels import TARGETS
from vstain.evaluate import comparison as C
from vstain.evaluate.patches import REAL

MODELS = ["U-Net", "WGAN-GP"]


def pixel_table(n_fovs=8, shift=None, seed=0) -> pd.DataFrame:
    """Per-FOV SSIM/MSE/MAE/PCC of two models on DNA and membrane; ``shift`` adds to the WGAN's
    SSIM and PCC and subtracts from its MSE and MAE (so positive = WGAN better everywhere)."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n_fovs):
        for ch in ("dna", "membrane"):
            base = {"ssim": 0.7, "mse": 0.3, "mae": 0.4, "pcc": 0.9}
            for metric, v in base.items():
                noise = 0.02 * rng.standard_normal()
                for model in MODELS:
                    s = 0.0 if model == "U-Net" or shift is None else shift * (1 if metric in ("ssim", "pcc") else -1)
                    rows.append({"fov_id": str(f), "structure": "mito", "model": model, "channel": ch,
                                 "metric": metric, "value": v + noise + s})
    return pd.DataFrame(rows)


def patch_scores(n_fovs=8, wgan_right=1.0, seed=0) -> pd.DataFrame:
    """Classifier patches: the U-Net's DNA patches are read as membrane half the time, the WGAN's
    DNA patches correctly with probability ``wgan_right``."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n_fovs):
        for model in (REAL, *MODELS):
            for ch in ("dna", "membrane"):
                c = TARGETS.index(ch)
                for k in range(6):
                    right = {"U-Net": 0.5, "WGAN-GP": wgan_right, REAL: 1.0}[model] if ch == "dna" else 1.0
                    pred = c if rng.random() < right else TARGETS.index("membrane" if ch == "dna" else "dna")
                    rows.append({"model": model, "fov_id": str(f), "channel": ch, "class": c,
                                 "predicted": pred, "perceptual": 0.5 + 0.1 * rng.random()})
    return pd.DataFrame(rows)


def test_fov_values_average_the_perceptual_distance_per_fov():
    v = C.fov_values(pixel_table(3), patch_scores(3))
    per = v[v["metric"] == "perceptual"]
    assert len(per) == 3 * 2 * 2  # fovs x models x channels, the Real row left out
    assert set(per["model"]) == set(MODELS)


def test_identical_models_show_no_bold_and_no_detectable_difference():
    values = C.fov_values(pixel_table(8))
    comp = C.pairwise(values, None, MODELS, n_resamples=999)
    assert (comp["better"] == "none").all()
    assert C.best(comp, MODELS) == set()
    _, css = C.display_table(C.model_summary(values, None, MODELS, n_resamples=999), comp, MODELS)
    assert (css == "").all().all()
    text = C.verdict(comp, "U-Net", "WGAN-GP")
    assert "no detectable difference with n = 8 FOVs on SSIM, MSE, MAE, PCC" in text


def test_a_clearly_better_model_is_bold_and_the_claim_is_decided():
    values = C.fov_values(pixel_table(8, shift=0.1))
    comp = C.pairwise(values, None, MODELS, n_resamples=999)
    assert (comp["better"] == "WGAN-GP").all()
    bold = C.best(comp, MODELS)
    assert ("dna", "WGAN-GP", "mse") in bold and not any(m == "U-Net" for _, m, _ in bold)
    text = C.verdict(comp, "U-Net", "WGAN-GP")
    assert "**DNA**: WGAN-GP better on SSIM, MSE, MAE, PCC." in text
    assert "better on most pixel-metric cells (SSIM, MSE, MAE, PCC of every channel) **does not hold**" in text


def test_a_claim_on_an_unconverged_model_is_not_tested_at_this_budget():
    comp = C.pairwise(C.fov_values(pixel_table(8, shift=0.1)), None, MODELS, n_resamples=999)
    assert "**does not hold**" in C.headline(comp, "U-Net", "WGAN-GP")
    text = C.headline(comp, "U-Net", "WGAN-GP", unconverged={"WGAN-GP"},
                      budgets={"WGAN-GP": "460 generator iterations of a width-16 network on 16x64x64 crops"})
    assert "**is not tested at this budget**" in text and "does not hold" not in text
    assert "the WGAN-GP after 460 generator iterations" in text
    # the reverse claim holds, but only at this budget; a converged pair keeps the plain words
    flipped = C.headline(comp, "WGAN-GP", "U-Net", unconverged={"U-Net"})
    assert "**holds at this budget**" in flipped
    assert C.headline(comp, "U-Net", "WGAN-GP", unconverged={"another model"}) == C.headline(comp, "U-Net", "WGAN-GP")


def test_few_fovs_cannot_decide():
    comp = C.pairwise(C.fov_values(pixel_table(4, shift=0.1)), None, MODELS, n_resamples=999)
    assert (comp["better"] == "none").all()
    assert "cannot be decided with n = 4 FOVs" in C.verdict(comp, "U-Net", "WGAN-GP")


def test_f1clf_interval_resamples_fovs_and_decides_a_clear_gap():
    scores = patch_scores(8, wgan_right=1.0)
    values = C.fov_values(pixel_table(8), scores)
    summary = C.model_summary(values, scores, MODELS, n_resamples=999)
    f1 = summary[(summary["metric"] == "f1clf") & (summary["channel"] == "dna")].set_index("model")
    assert f1.loc["WGAN-GP", "estimate"] == pytest.approx(1.0)
    assert f1.loc["U-Net", "estimate"] < 0.8 and f1.loc["U-Net", "n"] == 8
    assert f1.loc["U-Net", "ci_low"] <= f1.loc["U-Net", "estimate"] <= f1.loc["U-Net", "ci_high"]
    comp = C.pairwise(values, scores, MODELS, n_resamples=999)
    row = comp[(comp["metric"] == "f1clf") & (comp["channel"] == "dna")].iloc[0]
    assert row["better"] == "WGAN-GP"
    assert "F1clf, most channels) **" in C.verdict(comp, "U-Net", "WGAN-GP")


def test_display_shows_intervals_and_n_and_never_a_zero_spread():
    values = C.fov_values(pixel_table(1))
    summary = C.model_summary(values, None, MODELS, n_resamples=999)
    shown, _ = C.display_table(summary, C.pairwise(values, None, MODELS, n_resamples=999), MODELS)
    cell = shown.loc[("DNA", "U-Net"), "SSIM"]
    assert cell.endswith("(n = 1)") and "[" not in cell and "±" not in cell
    values = C.fov_values(pixel_table(8))
    summary = C.model_summary(values, None, MODELS, n_resamples=999)
    shown, _ = C.display_table(summary, C.pairwise(values, None, MODELS, n_resamples=999), MODELS)
    assert shown.loc[("DNA", "U-Net"), "PCC"].endswith("(n = 8)") and "[" in shown.loc[("DNA", "U-Net"), "PCC"]


def test_three_models_bold_only_the_model_better_than_both_others():
    a = pixel_table(8)
    b = a[a["model"] == "WGAN-GP"].assign(model="WGAN from U-Net")
    b = b.assign(value=b["value"] + np.where(b["metric"].isin(["ssim", "pcc"]), 0.1, -0.1))
    values = C.fov_values(pd.concat([a, b], ignore_index=True))
    models = ["U-Net", "WGAN-GP", "WGAN from U-Net"]
    bold = C.best(C.pairwise(values, None, models, n_resamples=999), models)
    assert bold and all(m == "WGAN from U-Net" for _, m, _ in bold)


def test_confusions_are_named_in_words():
    conf = np.eye(6, dtype=int) * 10
    conf[2] = 0
    conf[2, 1] = 8  # mitochondria read as membrane
    conf[2, 0] = 2
    text = C.confusion_sentences({"U-Net": conf, "WGAN-GP": np.eye(6, dtype=int) * 5})
    assert "**U-Net**: F1clf is 0 for Mitochondria. Channels read mostly as another: Mitochondria as Cell membrane (80% of 10 patches)." in text
    assert "**WGAN-GP**: every channel is recognised in at least 50% of its patches." in text


def test_digits_keep_the_order_of_two_close_models():
    values = C.fov_values(pixel_table(8))
    summary = C.model_summary(values, None, MODELS, n_resamples=999)
    sel = (summary["channel"] == "dna") & (summary["metric"] == "pcc")
    summary.loc[sel & (summary["model"] == "WGAN-GP"), "estimate"] = summary.loc[sel & (summary["model"] == "U-Net"), "estimate"].iloc[0] + 0.002
    shown, _ = C.display_table(summary, C.pairwise(values, None, MODELS, n_resamples=999), MODELS)
    a, b = (float(shown.loc[("DNA", m), "PCC"].split()[0]) for m in MODELS)
    assert b > a


def test_lowest_channels_names_them_and_a_metric_at_its_floor():
    from vstain.evaluate.comparison import lowest_channels

    rows = [{"channel": c, "model": m, "metric": "pcc", "estimate": v, "ci_low": v - 0.05, "ci_high": v + 0.05, "n": 8}
            for m in ("U-Net", "WGAN") for c, v in zip(("dna", "membrane", "mito", "nucleoli"), (0.9, 0.8, 0.4, 0.6))]
    rows += [{"channel": c, "model": m, "metric": "f1clf", "estimate": f, "ci_low": 0, "ci_high": 1, "n": 8}
             for m in ("U-Net", "WGAN") for c, f in (("mito", 0.0), ("nucleoli", 0.5 if m == "WGAN" else 0.0))]
    text = lowest_channels(pd.DataFrame(rows), "U-Net")
    assert "lowest PCC is on Mitochondria (0.40 [0.35, 0.45] (n = 8)) and Nucleoli (0.60" in text
    assert "of 4 channels scored" in text
    assert "F1clf is 0 for every model on Mitochondria:" in text and "Nucleoli:" not in text
    assert lowest_channels(pd.DataFrame(rows), "GAN") == "The table has no PCC of the GAN."


def test_galleries_take_one_fov_per_tagged_structure():
    from vstain.preprocess.processed import one_per_structure

    fovs = pd.DataFrame({"fov_id": list("abcdefg"), "structure": ["mito", "mito", "envelope", "mito", "nucleoli",
                                                                  "envelope", "actomyosin"]})
    assert one_per_structure(fovs)["fov_id"].tolist() == ["a", "c", "e", "g"]
    assert one_per_structure(fovs, 2)["fov_id"].tolist() == ["a", "c"]


def test_the_verdict_says_a_blank_prediction_first_and_handles_a_missing_score_and_a_tie():
    """A tie (identical models) is "no detectable difference"; a channel one model predicts nothing
    of is said so before its columns; a channel with no score is named as such."""
    comp = C.pairwise(C.fov_values(pixel_table(8)), None, MODELS, n_resamples=999)
    blank = pd.DataFrame([{"model": "WGAN-GP", "channel": "membrane", "blank": 7, "n": 8},
                          {"model": "WGAN-GP", "channel": "nucleoli", "blank": 8, "n": 8}])
    text = C.verdict(comp, "U-Net", "WGAN-GP", blank=blank)
    assert ("**Cell membrane**: the WGAN-GP predicts almost none of it (blank on 7 of 8 FOVs); "
            "no detectable difference with n = 8 FOVs on SSIM, MSE, MAE, PCC.") in text
    assert "**Nucleoli**: the WGAN-GP predicts almost none of it (blank on 8 of 8 FOVs); not scored on any FOV." in text
    assert "**DNA**: no detectable difference with n = 8 FOVs on SSIM, MSE, MAE, PCC." in text
    assert C.verdict(comp, "U-Net", "WGAN-GP") == C.verdict(comp, "U-Net", "WGAN-GP", blank=blank.iloc[:0])


def test_f1_discrimination_names_channels_at_floor_or_ceiling():
    from vstain.evaluate.comparison import f1_discrimination, f1_discrimination_sentence
    rows = [dict(channel=c, model=m, metric="f1clf", estimate=v, ci_low=v, ci_high=v, n=6)
            for c, vals in (("mito", (0.0, 0.02)), ("dna", (0.97, 1.0)), ("nucleoli", (0.2, 0.9)))
            for m, v in zip(("A", "B"), vals)]
    t = f1_discrimination(pd.DataFrame(rows), ["A", "B"]).set_index("channel")
    assert t.loc["mito", "state"] == "floor" and t.loc["dna", "state"] == "ceiling"
    assert t.loc["nucleoli", "state"] == "discriminates"
    text = f1_discrimination_sentence(t.reset_index())
    assert "below 0.05 for every model on mitochondria" in text and "above 0.95 for every model on DNA" in text
    assert "nucleoli" not in text.lower()

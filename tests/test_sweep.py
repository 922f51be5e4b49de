"""The adversarial weight sweep: weights and folders, resuming, the per-FOV table, the summary
against the L1-only control, the verdict and the perception-distortion figure."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from vstain.channels import TARGETS
from vstain.evaluate import classifier as C
from vstain.evaluate import patches as P
from vstain.plots.sweep import perception_distortion
from vstain.preprocess import processed
from vstain.studies import sweep
from vstain.training.configs import WGANConfig

R = 999
MODELS = [sweep.weight_label(w) for w in (0, 0.05, 0.5)]


def test_weights_folders_and_labels(tmp_path):
    assert sweep.check_weights([0.2, 0, 0.05]) == [0, 0.05, 0.2]
    for bad in ([0.1, 0.2], [0], [0, 0.1, 0.1], [-0.1, 0]):
        with pytest.raises(ValueError, match="including 0"):
            sweep.check_weights(bad)
    assert sweep.weight_dir(tmp_path, 0.05) == tmp_path / "lambda_0.05"
    assert sweep.weight_dir(tmp_path, 0.0).name == "lambda_0" and sweep.weight_label(1.0) == "λ = 1"
    with pytest.raises(ValueError, match="init_from is empty"):
        sweep.run_sweep(tmp_path, tmp_path / "out", WGANConfig(), [0, 0.1])


def synthetic(n_fov=8, pcc_drop=0.1, f1_gain=True, seed=0):
    """Per-FOV values of three weights on 3 channels: each higher weight loses ``pcc_drop`` PCC
    (truth and target) and has a smaller perceptual distance; with ``f1_gain`` its classifier reads
    more DNA patches right. One channel's transfer is NaN for the largest weight only."""
    rng = np.random.default_rng(seed)
    rows, patches = [], []
    for f in range(n_fov):
        for ch in ("dna", "membrane", "mito"):
            base = 0.8 + 0.05 * rng.standard_normal()
            for k, m in enumerate(MODELS):
                noise = 0.005 * rng.standard_normal()
                for metric, ref, v in (("pcc", "truth", base - k * pcc_drop), ("pcc", "target", base - k * pcc_drop - 0.1),
                                       ("ssim", "truth", base - 0.2), ("perceptual", "target", 0.5 - 0.1 * k),
                                       ("transfer", "truth", np.nan if (ch == "mito" and k == 2) else 0.3)):
                    rows.append({"model": m, "fov_id": f"f{f}", "channel": ch, "metric": metric, "reference": ref,
                                 "value": v + noise})
        for ch in ("dna", "membrane"):
            c = TARGETS.index(ch)
            for j in range(6):
                for k, m in enumerate((P.REAL, *MODELS)):
                    right = 1.0 if (ch != "dna" or m == P.REAL) else (0.4 + 0.3 * (k - 1) if f1_gain else 0.6)
                    pred = c if rng.random() < right else TARGETS.index("membrane")
                    patches.append({"model": m, "fov_id": f"f{f}", "channel": ch, "class": c, "predicted": pred})
    return pd.DataFrame(rows), pd.DataFrame(patches)


def test_fov_means_average_the_same_channels_for_every_model():
    values, _ = synthetic()
    means = sweep.fov_means(values, MODELS)
    t = means[means["metric"] == "transfer"]
    assert len(t) == 8 and np.allclose(t[MODELS].to_numpy(), 0.3, atol=0.02)  # mito dropped for all three
    p = means[(means["metric"] == "pcc") & (means["reference"] == "truth")]
    assert np.allclose((p[MODELS[0]] - p[MODELS[2]]).to_numpy(), 0.2, atol=0.02)
    with pytest.raises(ValueError, match=r"model\(s\) \['λ = 9'\] have no values"):
        sweep.fov_means(values, [*MODELS, "λ = 9"])


def test_summary_and_verdict_see_the_trade():
    values, scores = synthetic()
    s = sweep.sweep_summary(values, scores, MODELS, n_resamples=R)
    assert set(zip(s["metric"], s["reference"])) == {("pcc", "truth"), ("pcc", "target"), ("ssim", "truth"),
                                                     ("perceptual", "target"), ("transfer", "truth"), ("f1clf", "target")}
    at = s.set_index(["metric", "reference", "model"]).sort_index()
    assert at.loc[("pcc", "truth", MODELS[2]), "diff"] == pytest.approx(-0.2, abs=0.01)
    assert at.loc[("pcc", "truth", MODELS[0]), "diff"] == 0 and not at.loc[("pcc", "truth", MODELS[0]), "decided"]
    assert bool(at.loc[("pcc", "truth", MODELS[2]), "decided"]) and (at["n"] == 8).all()
    f1 = at.loc[("f1clf", "target")]
    assert f1.loc[MODELS[2], "estimate"] > f1.loc[MODELS[0], "estimate"] and np.isnan(f1["p"]).all()
    assert f1.loc[MODELS[2], "ci_low"] <= f1.loc[MODELS[2], "estimate"] <= f1.loc[MODELS[2], "ci_high"]
    text = sweep.sweep_verdict(s, MODELS)
    assert "(λ = 0.5) **trades pixel fidelity for realism**: lower PCC vs truth" in text
    assert "- **λ = 0.05**: PCC vs truth -0.098 [-0.102, -0.093] (n = 8), worse; SSIM vs truth" in text and "n = 8 FOVs" in text
    assert "For scale: the largest change is" in text and "Every change is small" not in text


def test_verdict_says_when_every_change_is_small():
    """A decided but tiny change (0.1% of the control) is called a direction, not a practical trade."""
    values, scores = synthetic(pcc_drop=0.0008, f1_gain=False)
    values.loc[values["metric"] == "perceptual", "value"] = 0.5 - 0.0004 * values["model"].map(MODELS.index)
    summary = sweep.sweep_summary(values, scores, MODELS, n_resamples=R)
    text = sweep.sweep_verdict(summary[summary["metric"] != "f1clf"], MODELS)  # F1clf: random here
    assert "**gains realism without a detectable loss of pixel fidelity**" in text  # decided, though tiny
    assert "Every change is small, though: the largest change is" in text and "07b_seed_spread" in text


def test_verdict_without_a_realism_gain():
    values, scores = synthetic(f1_gain=False)
    values.loc[values["metric"] == "perceptual", "value"] = 0.5 + 0.01 * np.arange((values["metric"] == "perceptual").sum()) % 3
    s = sweep.sweep_summary(values, scores, MODELS, n_resamples=R)
    text = sweep.sweep_verdict(s, MODELS)  # the perceptual distance rises by 0.01 per weight: worse
    assert "**costs both pixel fidelity and realism** (lower PCC vs truth; worse perceptual distance)" in text
    values, scores = synthetic(pcc_drop=0.0, f1_gain=False)
    values.loc[values["metric"] == "perceptual", "value"] = 0.5
    assert "**changes neither pixel fidelity nor realism detectably** with n = 8 FOVs" in \
        sweep.sweep_verdict(sweep.sweep_summary(values, scores, MODELS, n_resamples=R), MODELS)
    few = values[values["fov_id"].isin(["f0", "f1", "f2", "f3"])]
    assert "**cannot be decided** with n = 4 FOVs (a paired interval decides from 6 on)" in \
        sweep.sweep_verdict(sweep.sweep_summary(few, scores[scores["fov_id"].isin(["f0", "f1", "f2", "f3"])], MODELS,
                                                n_resamples=R), MODELS)


def test_perception_distortion_plane():
    values, scores = synthetic()
    s = sweep.sweep_summary(values, scores, MODELS, n_resamples=R)
    fig = perception_distortion(s, MODELS)
    assert len(fig.axes) == 2 * 3  # (1 - PCC, 1 - SSIM) x (F1clf, perceptual, sharpness)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("1 − PCC vs truth") and ax.get_ylabel().startswith("F1clf (up")
    assert [t.get_text() for t in ax.texts] == MODELS
    x = ax.lines[0].get_xdata()  # the line joining the weights: distortion rises with the weight
    assert np.all(np.diff(x) > 0)
    plt.close(fig)
    with pytest.raises(ValueError, match="lacks a distortion"):
        perception_distortion(s[~s["metric"].isin(["pcc", "ssim"])], MODELS)


@pytest.fixture(scope="module")
def stage_in(tmp_path_factory):
    """A processed set of 12 random FOVs of 10x20x22 (3 per structure), with a clean truth."""
    rng = np.random.default_rng(0)
    records = []
    for s in ("mito", "envelope", "actomyosin", "nucleoli"):
        for k in range(3):
            tgt = rng.normal(size=(6, 10, 20, 22)).astype(np.float32)
            tgt[[c for c, n in enumerate(TARGETS) if n not in ("dna", "membrane", s)]] = np.nan
            records.append(dict(fov_id=f"{s}{k}", gene="G", structure=s, bf=rng.normal(size=(10, 20, 22)),
                                target=tgt, truth=rng.normal(size=(6, 10, 20, 22))))
    stage = tmp_path_factory.mktemp("processed")
    processed.write_processed(stage, records)
    return stage


def test_sweep_trains_each_weight_once_and_resumes(stage_in, tmp_path):
    unet = tmp_path / "unet.ckpt"
    import torch

    from vstain.models import Generator
    gen = Generator(WGANConfig(base_width=2).generator_config())
    torch.save({"state_dict": {f"generator.{k}": v for k, v in gen.state_dict().items()}}, unet)
    cfg = WGANConfig(base_width=2, critic_width=2, batch_size=2, crop=(8, 16, 16), samples=4, val_samples=2,
                     iterations=2, val_every=2, ckpt_every=2, n_critic=2, optimizer="adam", init_from=str(unet), seed=3)
    out = tmp_path / "07c"
    first = sweep.run_sweep(stage_in, out, cfg, [0.5, 0])
    assert list(first["weight"]) == [0, 0.5] and list(first["status"]) == ["trained", "trained"]
    assert list(first["iterations"]) == [2, 2] and (first["stopped"] == "").all()
    assert first["median_grad_ratio"].iloc[0] == 0 and first["median_grad_ratio"].iloc[1] > 0
    n_test = (processed.read_manifest(stage_in)["split"] == "test").sum()
    for w in (0, 0.5):
        d = sweep.weight_dir(out, w)
        assert len(list((d / "predictions").glob("*.tif"))) == n_test  # the test split only
        meta = json.loads((d / "model.json").read_text())
        assert meta["config"]["lambda_adv"] == w and meta["complete"]
        assert not (d / "finished.json").exists()
    again = sweep.run_sweep(stage_in, out, cfg, [0, 0.5])
    assert list(again["status"]) == ["reused", "reused"]
    pd.testing.assert_frame_equal(again.drop(columns="status"), first.drop(columns="status"))
    threads = sweep.run_sweep(stage_in, out, WGANConfig(**{**cfg.to_dict(), "num_threads": 1}), [0, 0.5])
    assert list(threads["status"]) == ["reused", "reused"]  # a resumable key retrains nothing
    longer = sweep.run_sweep(stage_in, out, WGANConfig(**{**cfg.to_dict(), "iterations": 3}), [0, 0.5])
    assert list(longer["status"]) == ["trained", "trained"] and list(longer["iterations"]) == [3, 3]
    # the per-FOV table of the sweep: both references, every measure, one value per FOV and channel
    clf_cfg = C.ClassifierConfig(patch=(8, 8, 8), widen_factor=0.125)
    values, scores = sweep.sweep_values(stage_in, {sweep.weight_label(w): sweep.weight_dir(out, w) for w in (0, 0.5)},
                                        C.build_classifier(clf_cfg), clf_cfg)
    assert set(zip(values["metric"], values["reference"])) >= {("pcc", "truth"), ("ssim", "truth"), ("pcc", "target"),
                                                                ("ssim", "target"), ("perceptual", "target")}
    assert not values.duplicated(["model", "fov_id", "channel", "metric", "reference"]).any()
    truth = values[(values["metric"] == "pcc") & (values["reference"] == "truth")]
    assert len(truth) == 2 * n_test * 6 and set(scores["model"]) == {P.REAL, "λ = 0", "λ = 0.5"}


def test_sweep_table_shows_each_measure_per_weight():
    values, scores = synthetic()
    shown = sweep.sweep_table(sweep.sweep_summary(values, scores, MODELS, n_resamples=R), MODELS)
    assert list(shown.index) == MODELS
    assert list(shown.columns) == ["PCC vs truth", "SSIM vs truth", "PCC vs target", "F1clf", "perceptual distance",
                                   "coherent sharpness"]
    assert shown.loc["λ = 0.5", "F1clf"] == "1.00 [1.00, 1.00] (n = 8)" and shown.iloc[0, 0].endswith("(n = 8)")


@pytest.mark.parametrize("moves, answer", [
    (dict(fid_worse="PCC vs truth", real_better="F1clf"), "**trades pixel fidelity for realism**: lower PCC vs truth"),
    (dict(fid_worse="PCC vs truth"), "**costs pixel fidelity without a detectable gain in realism**"),
    (dict(real_better="F1clf", real_worse="coherent sharpness"), "(better F1clf, but worse coherent sharpness)"),
    (dict(real_worse="F1clf", fid_better="SSIM vs truth"),
     "**moves against the trade the thesis reads**: worse F1clf and higher SSIM vs truth"),
    (dict(real_worse="F1clf"), "**loses realism without a detectable change in pixel fidelity** (worse F1clf)"),
    (dict(fid_better="SSIM vs truth"), "**gains pixel fidelity without a detectable change in realism**"),
    (dict(), ""),
])
def test_the_answer_names_every_direction_the_largest_weight_can_move(moves, answer):
    """Each combination of decided moves of fidelity and realism gets its own answer; the reverse of
    the trade (less realism, more fidelity) is not called "no change"."""
    got = sweep._answer({**dict.fromkeys(("fid_worse", "fid_better", "real_worse", "real_better"), ""), **moves})
    assert answer in got and bool(got) == bool(answer)

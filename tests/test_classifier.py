"""The perceptual classifier: patches, the background rule, F1, the perceptual distance, and that
it learns to tell the six structures apart on simulated data."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from vstain.channels import TARGETS
from vstain.evaluate import classifier as C
from vstain.evaluate import patches as P
from vstain.evaluate import perceptual as Q
from vstain.preprocess.processed import write_processed
from vstain.volumes import read_volume, write_volume


@pytest.mark.parametrize("bad,match", [({"arch": "resnet50"}, "arch"), ({"patch": (3, 16, 16)}, "patch"),
                                       ({"min_foreground_ratio": -0.1}, "min_foreground_ratio"),
                                       ({"epochs": 0}, "epochs")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        C.ClassifierConfig(**bad)


@pytest.mark.parametrize("arch,patch", [("resnet10", (9, 33, 35)), ("resnet18", (16, 32, 32)),
                                        ("resnet10", (5, 17, 12))])
def test_network_shapes(arch, patch):
    cfg = C.ClassifierConfig(arch=arch, patch=patch, widen_factor=0.125)
    m = C.build_classifier(cfg).eval()
    x = torch.randn(3, 1, *patch)
    assert m(x).shape == (3, len(TARGETS))
    feats = C.features(m, x)
    assert len(feats) == len(C.FEATURE_LAYERS)
    assert [f.shape[1] for f in feats] == [8, 8, 16, 32, 64]
    assert torch.allclose(m.fc(m.avgpool(feats[-1]).flatten(1)), m(x), atol=1e-5)  # features() is forward()


def test_grid_and_background_rule():
    shape, patch = (9, 40, 50), (5, 10, 10)
    assert len(P.grid_starts(shape, patch, patch)) == 1 * 4 * 5
    ref = np.zeros(shape, np.float32)
    ref[2:6, 12:18, 31:38] = 1.0  # one object, inside grid cell y=10, x=30
    kept = P.foreground_starts(ref, patch, patch, 0.5)
    assert kept == [(0, 10, 30)]
    assert P.foreground_starts(np.zeros(shape), patch, patch, 0.5) == []  # empty: nothing kept
    # ratio 0 keeps every patch that holds any foreground, and only those
    ref[0, 0, 0] = 1.0
    assert P.foreground_starts(ref, patch, patch, 0.0) == [(0, 0, 0), (0, 10, 30)]
    with pytest.raises(ValueError, match="does not fit"):
        P.grid_starts((4, 40, 50), patch, patch)


def test_confusion_and_f1_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    yhat = [0, 1, 1, 1, 2, 0]
    conf = C.confusion(y, yhat, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 1, fn 1 -> 2/3
    assert np.allclose(C.f1_scores(conf), [0.5, 0.8, 2 / 3])
    assert np.isnan(C.f1_scores(C.confusion([0], [0], 2))[1])


def test_perceptual_distance_is_zero_for_identical_and_bounded():
    cfg = C.ClassifierConfig(patch=(8, 16, 16), widen_factor=0.125)
    m = C.build_classifier(cfg)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 8, 16, 16)).astype(np.float32)
    b = rng.normal(size=(4, 8, 16, 16)).astype(np.float32)
    assert np.allclose(Q.perceptual_distance(m, a, a, cfg), 0, atol=1e-6)
    assert np.allclose(Q.perceptual_distance(m, a, 3 * a + 1, cfg), 0, atol=1e-5)  # patches are standardised
    d = Q.perceptual_distance(m, a, b, cfg)
    assert d.shape == (4,) and (d > 0).all() and (d <= 4).all()
    # the one-pass scorer gives the same classes as predict() and the same distances
    classes, dist = Q.classify_and_compare(m, a, {"b": b}, cfg, batch_size=3)
    assert (classes[P.REAL] == C.predict(m, a, cfg).argmax(1)).all()
    assert (classes["b"] == C.predict(m, b, cfg).argmax(1)).all()
    assert np.allclose(dist["b"], d, atol=1e-6)


def blob_records(shape=(8, 24, 26), seed=0) -> list[dict]:
    """Three FOVs per tagged structure of random blobs (clean truth), each target the truth with
    the channels the FOV does not carry set to NaN."""
    rng = np.random.default_rng(seed)
    recs = []
    for s in ("mito", "envelope", "actomyosin", "nucleoli"):
        for i in range(3):
            truth = (rng.random((6, *shape)) > 0.97).astype(np.float32) + 0.01 * rng.normal(size=(6, *shape))
            target = truth.copy()
            target[[c for c, t in enumerate(TARGETS) if t not in ("dna", "membrane", s)]] = np.nan
            recs.append({"fov_id": f"{s}{i}", "gene": s, "structure": s, "bf": rng.normal(size=shape),
                         "target": target, "truth": truth})
    return recs


def _blob_set(tmp_path, shape=(8, 24, 26)):
    """Three FOVs per structure of random blobs; predictions equal to the targets."""
    stage = tmp_path / "03_denoising"
    df = write_processed(stage, blob_records(shape))
    d = tmp_path / "same" / "predictions"
    for _, r in df[df["split"] != "train"].iterrows():
        vol = np.nan_to_num(read_volume(stage / r["path"])[1:], nan=0.0)
        write_volume(d / f"{r['fov_id']}.tif", vol)
    return stage, df, d


def test_scores_of_a_copy_equal_the_real_ones(tmp_path):
    stage, df, d = _blob_set(tmp_path)
    cfg = C.ClassifierConfig(patch=(8, 8, 8), widen_factor=0.125)
    m = C.build_classifier(cfg)
    scores = Q.score_models(m, cfg, stage, {"copy": d})
    real, copy = scores[scores["model"] == P.REAL], scores[scores["model"] == "copy"]
    assert len(real) == len(copy) > 0
    assert (real["predicted"].to_numpy() == copy["predicted"].to_numpy()).all()
    assert np.allclose(copy["perceptual"], 0, atol=1e-6)
    # only labelled channels are scored against the target; all six against the truth
    n_test = (df["split"] == "test").sum()
    assert real.groupby("fov_id")["channel"].nunique().max() == 3
    truth = Q.score_models(m, cfg, stage, {"copy": d}, reference="truth")
    assert truth.groupby("fov_id")["channel"].nunique().min() == 6 and truth["fov_id"].nunique() == n_test
    summ = Q.summarise_scores(scores)
    assert set(summ.index.get_level_values("model")) == {P.REAL, "copy"}
    assert np.allclose(summ.xs(P.REAL, level="model")["f1clf"], summ.xs("copy", level="model")["f1clf"], equal_nan=True)


def _simulated_set(tmp_path, n_per=3, shape=(32, 64, 64), window=16):
    """A processed set of simulated FOVs (measured channels, not denoised), as 03_denoising writes it."""
    from vstain.data.simulate import STRUCTURES, SimConfig, simulate_fov

    cfg = SimConfig(shape=shape)
    recs, k = [], 0
    for s in STRUCTURES:
        for _ in range(n_per):
            o = simulate_fov(cfg, s, k)
            k += 1
            z0 = int(np.clip((o["focus_z_lo"] + o["focus_z_hi"]) // 2 - window // 2, 0, shape[0] - window))
            sl = slice(z0, z0 + window)
            tgt = np.full((6, window, *shape[1:]), np.nan, np.float32)
            for key, name in (("dna", "dna"), ("membrane", "membrane"), ("struct", s)):
                tgt[TARGETS.index(name)] = o[key][sl]
            recs.append({"fov_id": f"sim{k:02d}", "gene": s, "structure": s, "bf": o["brightfield"][sl],
                         "target": tgt, "truth": o["truth"][:, sl]})
    stage = tmp_path / "03_denoising"
    write_processed(stage, recs)
    return stage


@pytest.mark.slow
def test_classifier_beats_chance_on_simulated_patches(tmp_path):
    stage = _simulated_set(tmp_path)
    cfg = C.ClassifierConfig(patch=(16, 32, 32), train_stride=(8, 8, 8), epochs=4, patches_per_class=24)
    out = tmp_path / "06_classifier"
    rep = C.run_classifier_stage(stage, out, cfg, progress=False)
    for f in ("classifier.pt", "classifier.json", "history.csv", "heldout.json"):
        assert (out / f).exists()
    assert rep["test"]["accuracy"] > 3 * rep["chance"]  # chance is 1/6
    assert rep["val"]["accuracy"] > 3 * rep["chance"]
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == cfg.epochs and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert json.loads((out / "classifier.json").read_text())["classes"] == list(TARGETS)
    # the saved classifier reproduces the held-out report
    m, cfg2 = C.load_classifier(out)
    assert C.heldout_report(m, stage, cfg2)["test"]["accuracy"] == rep["test"]["accuracy"]

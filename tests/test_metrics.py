"""Pixel metrics against hand-computed values, and the Table 4.1 layout."""
import numpy as np
import pandas as pd
import pytest

from vstain.channels import TARGETS
from vstain.evaluate import metrics
from vstain.preprocess.processed import write_processed
from vstain.volumes import write_volume

SHAPES = [(7, 9, 11), (16, 33, 35), (5, 40, 21), (3, 8, 10)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pcc_of_affine_copy_is_one(shape):
    y = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    assert metrics.pcc(2 * y + 1, y) == pytest.approx(1.0, abs=1e-6)
    assert metrics.pcc(-3 * y + 2, y) == pytest.approx(-1.0, abs=1e-6)
    assert metrics.pcc(np.ones(shape), y) == 0.0  # a constant prediction has no correlation


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_of_identical_volumes_is_one(shape):
    y = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    assert metrics.ssim3d(y, y) == pytest.approx(1.0, abs=1e-9)
    assert metrics.ssim3d(y + np.random.default_rng(2).normal(size=shape), y) < 0.9


def test_ssim_rejects_too_thin_volumes():
    with pytest.raises(ValueError, match="at least 3 voxels"):
        metrics.ssim3d(np.zeros((2, 9, 9)), np.zeros((2, 9, 9)))


def test_mse_mae_of_known_arrays():
    target = np.array([1.0, -3.0, 0.5, 2.0]).reshape(1, 2, 2)
    pred = np.array([0.0, -1.0, 0.5, 5.0]).reshape(1, 2, 2)
    # errors 1, -2, 0, -3: squares 1, 4, 0, 9; absolutes 1, 2, 0, 3
    assert metrics.mse(pred, target) == pytest.approx(14 / 4)
    assert metrics.mae(pred, target) == pytest.approx(6 / 4)


def test_nan_channels_are_excluded():
    rng = np.random.default_rng(3)
    target = rng.normal(size=(6, 7, 12, 13)).astype(np.float32)
    target[[2, 4]] = np.nan
    pred = target.copy()
    pred[[2, 4]] = rng.normal(size=(2, 7, 12, 13))
    m = metrics.fov_metrics(pred, target)
    assert sorted(set(m["channel"])) == sorted(TARGETS[c] for c in (0, 1, 3, 5))
    assert len(m) == 4 * len(metrics.METRICS)
    assert np.isfinite(m["value"]).all()
    perfect = m.set_index(["channel", "metric"])["value"]
    assert perfect.xs("ssim", level="metric").min() == pytest.approx(1.0)
    assert perfect.xs("mse", level="metric").max() == pytest.approx(0.0)


def test_partly_nan_channel_is_an_error():
    target = np.zeros((6, 5, 8, 8), np.float32)
    target[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="partly NaN"):
        metrics.fov_metrics(target, target)


def _tiny_set(tmp_path, shape=(9, 20, 23)):
    """Three FOVs per structure with truth, and two models' predictions for val and test."""
    rng = np.random.default_rng(0)
    structures = ("mito", "envelope", "actomyosin", "nucleoli")
    recs = []
    for s in structures:
        for i in range(3):
            truth = rng.normal(size=(6, *shape)).astype(np.float32)
            target = truth + 0.1 * rng.normal(size=truth.shape).astype(np.float32)
            keep = {"dna", "membrane", s}
            target[[c for c, t in enumerate(TARGETS) if t not in keep]] = np.nan
            recs.append({"fov_id": f"{s}{i}", "gene": s.upper(), "structure": s, "bf": rng.normal(size=shape),
                         "target": target, "truth": truth})
    stage = tmp_path / "03_denoising"
    df = write_processed(stage, recs)
    preds = {}
    for k, (model, noise) in enumerate((("U-Net", 0.3), ("WGAN", 0.8))):
        d = tmp_path / model / "predictions"
        for fid in df.loc[df["split"] != "train", "fov_id"]:
            r = next(r for r in recs if r["fov_id"] == fid)
            t = np.stack([(c - c.mean()) / c.std() for c in r["truth"]])
            write_volume(d / f"{fid}.tif", t + noise * rng.normal(size=t.shape))
        preds[model] = d
    return stage, df, preds


def test_long_table_scores_labelled_channels_and_the_truth_every_channel(tmp_path):
    stage, df, preds = _tiny_set(tmp_path)
    long = metrics.evaluate_predictions(stage, preds)
    n_test = (df["split"] == "test").sum()
    # each test FOV carries three labels
    assert len(long) == n_test * 3 * len(preds) * len(metrics.METRICS)
    assert not long["value"].isna().any()
    assert metrics.coverage(long).startswith(f"Scored on {n_test} test FOVs (DNA on {n_test},")
    mean = long.groupby(["model", "metric"])["value"].mean()
    assert mean[("U-Net", "pcc")] > mean[("WGAN", "pcc")] and mean[("U-Net", "mse")] < mean[("WGAN", "mse")]
    clean = metrics.evaluate_predictions(stage, preds, reference="truth")
    assert (clean.groupby(["channel", "model", "metric"])["fov_id"].nunique() == n_test).all()  # all six channels
    assert clean[(clean["channel"] == "mito") & (clean["model"] == "U-Net") & (clean["metric"] == "pcc")]["value"].mean() > 0.9


def test_bad_reference_and_missing_truth(tmp_path):
    stage, _, preds = _tiny_set(tmp_path)
    with pytest.raises(ValueError, match="reference"):
        metrics.evaluate_predictions(stage, preds, reference="clean")
    with pytest.raises(FileNotFoundError):
        metrics.evaluate_predictions(stage, {"x": tmp_path / "nowhere"})


def test_thesis_reference_table():
    t = metrics.thesis_table41()
    assert list(t.index) == [(c, m) for c in TARGETS for m in ("U-Net", "WGAN")]
    assert t.loc[("dna", "U-Net"), "ssim_mean"] == 0.75
    assert t.loc[("envelope", "WGAN"), "f1clf"] == 0.9410
    named = metrics.thesis_table41(thesis_names=True)
    assert named.loc[("Myofib.", "U-Net"), "pcc_mean"] == t.loc[("actomyosin", "U-Net"), "pcc_mean"]
    # the thesis' headline in its own numbers: F1clf is the WGAN's on every channel
    f1 = t["f1clf"].unstack("model")
    assert (f1["WGAN"] > f1["U-Net"]).all()


# --- FOVs in threads ---------------------------------------------------------------------------
def test_map_fovs_keeps_order_and_raises_the_first_error(monkeypatch):
    import threading
    import time

    from vstain.evaluate.fovpool import MAX_FOVS, map_fovs
    from vstain.threads import cpu_share

    names = []

    def slow_first(i):
        time.sleep(0.05 if i == 0 else 0.0)  # the first item finishes last
        names.append(threading.current_thread().name)
        return i * i

    assert map_fovs(slow_first, range(6), workers=2) == [0, 1, 4, 9, 16, 25]
    assert any(n.startswith("fov") for n in names)  # ran in the pool's threads
    names.clear()
    assert map_fovs(slow_first, range(3), workers=1) == [0, 1, 4] and names == [threading.current_thread().name] * 3

    def bad(i):
        if i >= 2:
            raise ValueError(f"FOV {i} is broken")
        return i

    with pytest.raises(ValueError, match="FOV 2 is broken"):
        map_fovs(bad, range(5), workers=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert cpu_share() == 16 and MAX_FOVS == 2  # many cores: still two FOVs in memory at most
    seen = set()
    map_fovs(lambda i: seen.add(threading.current_thread().name), range(8))
    assert len(seen) <= MAX_FOVS
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # OpenMP's nested form counts its first level
    assert cpu_share() == 2


def test_scores_in_threads_equal_the_serial_ones(tmp_path, monkeypatch):
    """Pixel metrics, structure scores and sharpness: two FOVs at a time give the serial tables."""
    from vstain.evaluate import sharpness, structure

    stage, _, preds = _tiny_set(tmp_path)
    stage_dirs = {m: d.parent for m, d in preds.items()}
    tables = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        tables[threads] = (metrics.evaluate_predictions(stage, preds, reference="truth"),
                           structure.structure_table(stage, preds, split="test"),
                           sharpness.sharpness_table(stage, stage_dirs, split="test"))
    for serial, threaded in zip(tables["1"], tables["2"]):
        assert len(serial) > 0
        pd.testing.assert_frame_equal(serial, threaded)

"""Learning curves: the log-spaced snapshot schedule, snapshots that survive a resume, and the
decision whether a gap between two models closes, holds or widens."""
import numpy as np
import pandas as pd
import pytest
import torch

from test_train import Interrupt, fit, stage, tiny_cfg  # noqa: F401  (stage: the module's processed set)
from vstain.evaluate.curves import gap_trend, half_way, model_trend, trend_sentence
from vstain.models import Generator
from vstain.modelfiles import load_snapshot, read_snapshots, snapshot_path
from vstain.training.snapshots import Snapshots, log_steps


# --- schedule ------------------------------------------------------------------------------------
def test_log_steps_double_up_to_the_total():
    assert log_steps(1500) == [47, 94, 188, 375, 750, 1500]
    steps = log_steps(460, n=6)
    assert len(steps) == 6 and steps[-1] == 460
    ratios = np.diff(np.log(steps))
    assert np.allclose(ratios, ratios.mean(), atol=0.02)  # equal steps on a log axis


def test_log_steps_small_totals_and_bad_arguments():
    assert log_steps(3, n=6) == [1, 2, 3]  # fewer distinct steps than asked
    assert log_steps(10, n=3, first=10) == [10]
    with pytest.raises(ValueError, match="first"):
        log_steps(10, first=11)
    with pytest.raises(ValueError, match="total"):
        log_steps(0)


# --- snapshots survive an interruption ----------------------------------------------------------
@pytest.mark.slow
def test_snapshots_resume_without_rewriting_and_keep_the_clock(stage, tmp_path):  # noqa: F811
    cfg = tiny_cfg(max_steps=8, val_every=8, ckpt_every=1)
    steps = log_steps(8, n=4)  # 1, 2, 4, 8
    assert steps == [1, 2, 4, 8]
    with pytest.raises(RuntimeError, match="simulated"):
        fit(stage, tmp_path, cfg, [Snapshots(tmp_path, steps), Interrupt(5)])
    before = read_snapshots(tmp_path)
    assert before["step"].tolist() == [1, 2, 4]
    first_written = snapshot_path(tmp_path, 2).stat().st_mtime_ns
    module, _ = fit(stage, tmp_path, cfg, [Snapshots(tmp_path, steps)])
    after = read_snapshots(tmp_path)
    assert after["step"].tolist() == steps
    assert snapshot_path(tmp_path, 2).stat().st_mtime_ns == first_written  # not written again
    assert after["wall_s"].is_monotonic_increasing and after["wall_s"].iloc[-1] > before["wall_s"].iloc[-1]
    # the last snapshot is the trained generator
    gen = load_snapshot(tmp_path, 8, Generator(cfg.generator_config()))
    for a, b in zip(gen.parameters(), module.generator.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_final_snapshot_reuses_the_stage_predictions(stage, tmp_path):  # noqa: F811
    """The last snapshot of a finished stage is its final generator: its test predictions are the
    stage's own files, copied rather than predicted again; earlier snapshots are predicted."""
    from vstain.studies.curves import snapshot_predictions
    from vstain.training.unet import run_unet_stage
    from vstain.volumes import read_volume

    out = tmp_path / "04_unet"
    run_unet_stage(stage, out, tiny_cfg(max_steps=4, val_every=4, snapshots=2), splits=("test",), progress=False)
    table = snapshot_predictions(stage, {"U-Net": out}, tmp_path / "curves", progress=False).set_index("step")
    assert list(table.index) == [2, 4]
    assert table.loc[2, "seconds"] > 0 and np.isnan(table.loc[4, "seconds"])  # predicted / reused
    for f in sorted((out / "predictions").glob("*.tif")):
        again = tmp_path / "curves" / "u_net" / "step_000004" / "predictions" / f.name
        assert np.array_equal(read_volume(again), read_volume(f))
    # an earlier snapshot is not the final generator: predicted, and different
    first = sorted((tmp_path / "curves" / "u_net" / "step_000002" / "predictions").glob("*.tif"))[0]
    assert not np.array_equal(read_volume(first), read_volume(out / "predictions" / first.name))
    # a snapshot file that changed (its stage retrained) is predicted again, not taken from the cache
    snapshot_path(out, 2).write_bytes(snapshot_path(out, 4).read_bytes())
    again = snapshot_predictions(stage, {"U-Net": out}, tmp_path / "curves", progress=False).set_index("step")
    assert np.isnan(again.loc[2, "seconds"]) and np.array_equal(read_volume(first),
                                                                read_volume(out / "predictions" / first.name))


@pytest.mark.slow
def test_a_snapshot_another_curve_predicted_is_copied(stage, tmp_path, monkeypatch):  # noqa: F811
    """Learning curves under another model name (07e's "WGAN-GP, equal time" is 07's "WGAN-GP")
    copy the predictions another curve made from the same snapshot file on the same processed set;
    another snapshot file, another processed set or an incomplete folder is predicted again."""
    import json
    import shutil

    from vstain.inference import infer
    from vstain.studies import curves
    from vstain.training.unet import run_unet_stage
    from vstain.volumes import read_volume, sha256

    stage_in = tmp_path / "03_denoising"
    shutil.copytree(stage, stage_in)
    (stage_in / "manifest.json").write_text('{"stage": "03_denoising"}')
    out = tmp_path / "04_unet"
    run_unet_stage(stage_in, out, tiny_cfg(max_steps=4, val_every=4, snapshots=2), splits=("test",), progress=False)
    results = tmp_path / "07_results"
    curves.snapshot_predictions(stage_in, {"U-Net": out}, results / "curves", progress=False)
    (results / "manifest.json").write_text(json.dumps({"inputs": {"03": sha256(stage_in / "manifest.json")}}))
    first = results / "curves" / "u_net" / "step_000002" / "predictions"
    predicted = []

    def counted(*a, **k):
        predicted.append(a)
        return infer.write_predictions(*a, **k)

    monkeypatch.setattr(curves, "write_predictions", counted)

    def curve(stages, name):
        return curves.snapshot_predictions(stage_in, stages, tmp_path / name, progress=False,
                                           reuse_from=[results / "curves"]).set_index("step")

    table = curve({"Renamed": out}, "07e")
    assert predicted == [] and table["seconds"].isna().all()  # nothing predicted: copied, and the final reused
    for f in sorted(first.glob("*.tif")):
        assert np.array_equal(read_volume(tmp_path / "07e" / "renamed" / "step_000002" / "predictions" / f.name),
                              read_volume(f))
    # another training (another seed): other snapshot files, predicted
    other = tmp_path / "04c_unet_seed"
    run_unet_stage(stage_in, other, tiny_cfg(max_steps=4, val_every=4, snapshots=2, seed=1), splits=("test",),
                   progress=False)
    curve({"Seed 1": other}, "07f")
    assert len(predicted) == 1
    # the processed set changed since the other curve ran: predicted
    (stage_in / "manifest.json").write_text('{"stage": "03_denoising", "again": true}')
    curve({"Renamed": out}, "07g")
    assert len(predicted) == 2
    # a folder missing one FOV is no source: predicted
    (results / "manifest.json").write_text(json.dumps({"inputs": {"03": sha256(stage_in / "manifest.json")}}))
    sorted(first.glob("*.tif"))[0].unlink()
    curve({"Renamed": out}, "07h")
    assert len(predicted) == 3


def test_missing_snapshots_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshots.csv"):
        read_snapshots(tmp_path)
    pd.DataFrame([{"step": 4, "wall_s": 1.0, "path": "snapshots/step_000004.pt"}]).to_csv(tmp_path / "snapshots.csv")
    with pytest.raises(FileNotFoundError, match="step_000004"):
        read_snapshots(tmp_path)


def test_a_fine_tune_starts_at_the_clock_of_its_init_snapshots(tmp_path):
    import json

    from vstain.studies.curves import started_from
    init = tmp_path / "init"
    init.mkdir()
    (init / "model.json").write_text(json.dumps({"global_step": 8, "train_seconds": 50.0}))
    meta = {"config": {"init_from": str(init)}}
    assert started_from(meta) == (8, 50.0)  # no snapshots: the stage's own training seconds
    pd.DataFrame([{"step": 4, "wall_s": 20.0, "path": "a"}, {"step": 8, "wall_s": 41.5, "path": "b"}]).to_csv(
        init / "snapshots.csv", index=False)
    assert started_from(meta) == (8, 41.5)  # the snapshot clock at the init's last step
    assert started_from({"config": {}}) == (0, 0.0)


# --- the trend of a gap --------------------------------------------------------------------------
N = 12  # FOVs
rng = np.random.default_rng(0)
NOISE = 0.01 * rng.normal(size=(4, N))


def curves(gap_mid: float, gap_last: float):
    """Model a's scores at half-way and at the end, and model b's with the given mean gaps (with
    per-FOV noise much smaller than the change)."""
    a_mid, a_last = 0.6 + NOISE[0], 0.7 + NOISE[1]
    return a_mid, a_mid + gap_mid + NOISE[2], a_last, a_last + gap_last + NOISE[3]


@pytest.mark.parametrize("gap_mid,gap_last,expected", [
    (-0.20, -0.05, "closing"),   # b behind, catching up
    (0.20, 0.05, "closing"),     # b ahead, a catching up
    (-0.10, -0.10, "stable"),    # constant gap
    (-0.05, -0.20, "widening"),  # b falling further behind
    (0.05, 0.20, "widening"),
    (-0.20, 0.15, "reversing"),  # b behind, then ahead: the gap crossed zero
    (0.10, -0.20, "reversing"),
])
def test_trend_of_synthetic_gaps(gap_mid, gap_last, expected):
    t = gap_trend(*curves(gap_mid, gap_last))
    assert t.trend == expected
    assert t.gap_mid == pytest.approx(gap_mid, abs=0.01) and t.gap_last == pytest.approx(gap_last, abs=0.01)


def test_trend_needs_enough_fovs_to_call_a_change():
    a_mid, b_mid, a_last, b_last = curves(-0.2, -0.05)
    few = gap_trend(a_mid[:4], b_mid[:4], a_last[:4], b_last[:4])
    assert few.trend == "undecided"  # 4 FOVs decide nothing
    crossed = gap_trend(*curves(-0.2, 0.15))
    assert "the gap b - a closes and reopens the other way over the second half" in trend_sentence(
        crossed, "a", "b", "PCC", "all")
    assert "with n = 4 FOVs the trend of the gap b - a cannot be decided" in trend_sentence(few, "a", "b", "PCC", "all")


def test_model_trend_uses_each_models_own_half_way():
    assert half_way([47, 94, 188, 375, 750, 1500]) == (750, 1500)
    assert half_way([14, 29, 58, 115, 230, 460]) == (230, 460)
    rows = []
    for model, steps, gaps in (("unet", [750, 1500], [0.0, 0.0]), ("wgan", [230, 460], [-0.2, -0.05])):
        a_mid, b_mid, a_last, b_last = curves(-0.2, -0.05)
        vals = (a_mid, a_last) if model == "unet" else (b_mid, b_last)
        for step, v in zip(steps, vals):
            rows += [dict(model=model, step=step, fov_id=f"f{i}", channel="dna", metric="pcc", value=x)
                     for i, x in enumerate(v)]
    t = model_trend(pd.DataFrame(rows), "unet", "wgan", "pcc", "dna")
    assert t.trend == "closing" and t.change.n == N


# --- the curves of whole models ------------------------------------------------------------------
def synthetic_scores(n_fovs=8, gap_mid=-0.2, gap_last=-0.05):
    """SnapshotScores of two models, 'a' (steps 2, 4) flat and 'b' (iterations 1, 2) catching up on
    PCC; b's classifier answers get better too; features: b's drift towards the truth's."""
    from vstain.studies.curves import SnapshotScores
    from vstain.evaluate.patches import REAL
    r = np.random.default_rng(1)
    fovs = [f"f{i}" for i in range(n_fovs)]
    rows = []
    for model, steps, gaps in (("a", (2, 4), (0, 0)), ("b", (1, 2), (gap_mid, gap_last))):
        for step, gap in zip(steps, gaps):
            for i, f in enumerate(fovs):
                for ch in ("dna", "mito"):
                    base = 0.7 + 0.05 * (step == steps[-1]) * (model == "a") * 0
                    rows += [dict(model=model, step=step, fov_id=f, channel=ch, metric=m,
                                  value=base + gap + 0.005 * r.normal()) for m in ("pcc", "ssim")]
    patches_per_fov = 6
    meta = pd.DataFrame({"fov_id": np.repeat(fovs, patches_per_fov), "channel": "dna",
                         "class": np.tile(np.arange(6), n_fovs)})
    n = len(meta)
    real = r.normal(size=(n, 4))
    feats = {REAL: real}
    conf = {}
    for model, steps, wrong in (("a", (2, 4), (1, 1)), ("b", (1, 2), (4, 1))):
        for step, w in zip(steps, wrong):
            feats[(model, step)] = real + (0.1 if w == 1 else 1.5) + 0.1 * r.normal(size=real.shape)
            c = np.zeros((n_fovs, 6, 6), np.int64)
            for i in range(n_fovs):
                for k in range(6):
                    c[i, k, k if k >= w else (k + 1) % 6] += 1
            conf[(model, step)] = c
    return SnapshotScores(pd.DataFrame(rows), conf, feats, meta, fovs)


def test_pair_trends_and_convergence_on_synthetic_curves():
    from vstain.studies.curves import convergence, pair_trends, trend_verdict
    scores = synthetic_scores()
    t = pair_trends(scores, "a", "b", n_resamples=199).set_index("metric")
    assert t.loc["pcc", "trend"] == "closing" and t.loc["ssim", "trend"] == "closing"
    assert t.loc["pcc", "gap_mid"] == pytest.approx(-0.2, abs=0.01)
    assert t.loc["f1clf", "trend"] == "closing"  # b's F1 rose to a's
    assert t.loc["kid", "trend"] == "closing"  # b's features came close to the truth's
    conv = convergence(scores).set_index("model")
    assert conv.loc["a", "converged"] == "converged" and conv.loc["b", "converged"] == "not converged"  # b still gained
    text = trend_verdict(t.reset_index(), conv.reset_index(), {"a": "4 steps", "b": "2 generator iterations"})
    assert "after 4 steps (a) and 2 generator iterations (b)" in text
    assert "b had not converged" in text and "not tested at this budget" in text
    assert text.count("closes over the second half") == 4


def test_curve_table_has_a_row_per_model_step_metric_and_channel():
    from vstain.evaluate.curves import CURVE_COLUMNS
    from vstain.studies.curves import curve_table
    scores = synthetic_scores()
    snaps = pd.DataFrame({"model": ["a", "a", "b", "b"], "step": [2, 4, 1, 2], "wall_s": [1.0, 2.0, 3.0, 6.0]})
    t = curve_table(scores, snaps, n_resamples=99)
    assert list(t.columns) == CURVE_COLUMNS
    # pcc, ssim x (dna, mito, all) + f1clf + kid, for each of the 4 snapshots
    assert len(t) == 4 * (2 * 3 + 2)
    r = t[(t["model"] == "b") & (t["step"] == 1) & (t["metric"] == "pcc") & (t["channel"] == "all")].iloc[0]
    assert r["mean"] == pytest.approx(0.5, abs=0.01) and r["low"] < r["mean"] < r["high"] and r["n"] == 8
    assert r["wall_s"] == 3.0
    k = t[(t["metric"] == "kid")].set_index(["model", "step"])["mean"]
    assert k[("b", 1)] > k[("b", 2)]


def test_spread_sentence_gives_the_largest_reach_and_the_moved_cells():
    from vstain.studies.classifier_seed import spread_sentence
    t = pd.DataFrame([
        dict(model="U-Net", channel="dna", diff=0.01, low=-0.02, high=0.04, n=24, decided=False),
        dict(model="WGAN-GP", channel="mito", diff=-0.2, low=-0.3, high=-0.1, n=6, decided=True),
        dict(model="U-Net", channel="KID", diff=np.nan, low=1.0, high=2.0, n=24),
    ])
    s = spread_sentence(t, ("seed 0", "seed 1"))
    assert "trained with seed 1 instead of seed 0 changes F1clf by up to 0.300" in s
    assert "WGAN-GP, mito: -0.200 [-0.300, -0.100], n = 6 FOVs" in s and "1 of 2 model-channel cells" in s


def test_pilot_finds_the_first_iteration_that_moves_a_perception_measure():
    from vstain.studies.sweep_pilot import beyond_spread, first_move, pilot_moves, pilot_sentence
    scores = synthetic_scores()
    moves = pilot_moves(scores, "a", "b", {"f1clf": 0.05, "kid": 0.0}, n_resamples=199)
    assert set(moves["step"]) == {2} and set(moves["metric"]) == {"f1clf", "kid", "pcc"}  # the common iteration
    m = moves.set_index("metric")
    assert not m.loc["f1clf", "moved"] and not m.loc["kid", "moved"]  # b at 2 answers and embeds as a does
    assert m.loc["pcc", "moved"] and m.loc["pcc", "diff"] == pytest.approx(-0.05, abs=0.01)  # but lost 0.05 PCC
    assert first_move(moves) is None
    huge = pilot_moves(scores, "a", "b", {"f1clf": 5.0, "kid": 1e9}, n_resamples=199)
    assert first_move(huge) is None
    assert "moved no perception measure beyond the seed spread" in pilot_sentence(huge, 1.0, 1e-4, 2)
    moved = moves.assign(moved=moves["metric"] == "kid")
    assert first_move(moved) == 2 and "after 2 generator iterations" in pilot_sentence(moved, 1.0, 1e-4, 2)
    # a move that lapses at a later snapshot is named as not yet steady; one that holds, as holding
    later = pd.concat([moved, moved.assign(step=4, moved=False), moved.assign(step=8)])
    text = pilot_sentence(later, 1.0, 1e-4, 8)
    assert "first moved KID" in text and "did not hold at iteration 4 (" in text and "not yet steady" in text
    assert "held at every later snapshot (2)" in pilot_sentence(later.assign(moved=later["metric"] == "kid"), 1.0,
                                                                 1e-4, 8)
    # a measure with no known spread (NaN) never moves; a spread of 0 moves on any decided change
    assert beyond_spread(0.5, 0.4, 0.6, 0.0, 24) and beyond_spread(-0.5, -0.6, -0.4, 0.45, 24)
    assert not beyond_spread(0.5, 0.4, 0.6, float("nan"), 24) and not beyond_spread(0.5, 0.4, 0.6, 0.6, 24)
    assert not beyond_spread(0.5, -0.1, 0.6, 0.0, 24) and not beyond_spread(0.5, 0.4, 0.6, 0.0, 5)  # undecided
    unknown = pilot_moves(scores, "a", "b", {"f1clf": 5.0, "kid": float("nan")}, n_resamples=199)
    unknown = unknown.assign(diff=np.where(unknown["metric"] == "kid", 0.5, unknown["diff"]),
                             low=np.where(unknown["metric"] == "kid", 0.4, unknown["low"]),
                             high=np.where(unknown["metric"] == "kid", 0.6, unknown["high"]))
    text = pilot_sentence(unknown, 1.0, 1e-4, 2)
    assert "KID +0.5 [+0.4, +0.6] (no seed spread measured)" in text and "Without a seed spread of KID" in text


def test_the_seed_reach_is_measured_as_the_pilot_measures(monkeypatch, tmp_path):
    from vstain.studies import sweep_pilot
    asked = {}

    def scored(stage_in, snaps, *args):
        asked["snaps"] = snaps
        return synthetic_scores()  # 'b' is 0.05 PCC below 'a' at their common iteration 2

    monkeypatch.setattr(sweep_pilot, "score_snapshots", scored)
    reach, table = sweep_pilot.seed_reach(tmp_path, {"a": tmp_path / "a", "b": tmp_path / "b"}, None, None,
                                          n_resamples=199)
    assert list(asked["snaps"]["model"]) == ["a", "b"] and list(asked["snaps"]["dir"]) == [str(tmp_path / "a"),
                                                                                           str(tmp_path / "b")]
    pcc = table.set_index("metric").loc["pcc"]
    assert reach["pcc"] == pytest.approx(max(abs(pcc["low"]), abs(pcc["high"]))) and 0.05 < reach["pcc"] < 0.06
    assert set(reach) == {"f1clf", "kid", "pcc"}
    with pytest.raises(ValueError, match="two trainings"):
        sweep_pilot.seed_reach(tmp_path, {"a": tmp_path}, None, None)


def test_the_pilot_stage_writes_its_tables_and_measures_against_a_spread_of_0_without_a_second_seed(
        monkeypatch, tmp_path):
    from vstain.studies import sweep_pilot
    from vstain.training.configs import WGANConfig
    monkeypatch.setattr(sweep_pilot, "run_pilot", lambda *a, **k: {"a": tmp_path / "a", "b": tmp_path / "b"})
    monkeypatch.setattr(sweep_pilot, "snapshot_predictions", lambda *a, **k: None)
    monkeypatch.setattr(sweep_pilot, "score_snapshots", lambda *a, **k: synthetic_scores())
    pilot = sweep_pilot.pilot_stage(tmp_path, tmp_path / "pilot", WGANConfig(), 1.0, 2, 1e-4, 2,
                                    {"U-Net": tmp_path / "a", "U-Net (second seed)": None}, None, None,
                                    n_resamples=199)
    assert (pilot.moves["reach"] == 0).all() and pilot.seed_spread.empty
    assert (tmp_path / "pilot_moves.csv").exists() and not (tmp_path / "seed_reach.csv").exists()
    assert pilot.moves.set_index("metric").loc["pcc", "moved"]  # b lost 0.05 PCC, beyond a spread of 0
    assert "moved no perception measure" in pilot.sentence  # F1clf and KID did not move
    none = sweep_pilot.pilot_stage(tmp_path, tmp_path / "none", WGANConfig(), 0.0, 2, 1e-4, 2, {}, None, None)
    assert none.moves.empty and "No pilot ran" in none.sentence
    assert sweep_pilot.sized(WGANConfig(iterations=7), 0, none.moves, 5).iterations == 5

"""Learning curves: the log-spaced snapshot schedule, snapshots that survive a resume, and the
decision whether a gap between two models closes, holds or widens."""
import numpy as np
import pandas as pd
import pytest
import torch

from test_train import Interrupt, fit, stage, tiny_cfg  # noqa: F401  (stage: the module's processed set)
from vstain.evaluate.curves import gap_trend, half_way, model_trend
from vstain.models import Generator
from vstain.training.snapshots import Snapshots, load_snapshot, log_steps, read_snapshots, snapshot_path


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


def test_missing_snapshots_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshots.csv"):
        read_snapshots(tmp_path)
    pd.DataFrame([{"step": 4, "wall_s": 1.0, "path": "snapshots/step_000004.pt"}]).to_csv(tmp_path / "snapshots.csv")
    with pytest.raises(FileNotFoundError, match="step_000004"):
        read_snapshots(tmp_path)


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
])
def test_trend_of_synthetic_gaps(gap_mid, gap_last, expected):
    t = gap_trend(*curves(gap_mid, gap_last))
    assert t.trend == expected
    assert t.gap_mid == pytest.approx(gap_mid, abs=0.01) and t.gap_last == pytest.approx(gap_last, abs=0.01)


def test_trend_needs_enough_fovs_to_call_a_change():
    a_mid, b_mid, a_last, b_last = curves(-0.2, -0.05)
    assert gap_trend(a_mid[:4], b_mid[:4], a_last[:4], b_last[:4]).trend == "stable"  # 4 FOVs decide nothing


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

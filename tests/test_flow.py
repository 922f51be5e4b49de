"""The conditional flow on a problem with a known answer, and the uncertainty checks against a truth.

The toy: the brightfield shows a blob; target channel 0 is the blob bright (+1) or dark (-1) with
probability 1/2, channel 1 is the blob itself (deterministic), the other four channels are absent
(NaN) as in a FOV that carries three labels. A flow must sample both modes of channel 0, its mean
must approach the conditional mean 0, and channel 1 must come out sharp.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from vstain.evaluate.calibration import (
    calibration_summary,
    coverage_rows,
    error_auroc,
    interval_halfwidth,
    object_auroc,
    object_rows,
)
from vstain.inference.flow import noise_seed, sample_fov, sample_volume
from vstain.models import Generator, VelocityConfig, VelocityNet
from vstain.training.configs import FlowConfig
from vstain.training.flow import FlowModule, FlowSampling

SHAPE = (8, 12, 12)
BLOB = (slice(2, 6), slice(3, 9), slice(3, 9))


def toy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(n, 1, *SHAPE)
    x[(slice(None), slice(None)) + BLOB] = 1.0
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    y = torch.full((n, 6, *SHAPE), float("nan"))
    y[:, 0] = 0.0
    y[(slice(None), 0) + BLOB] = sign[:, None, None, None]
    y[:, 1] = x[:, 0]
    return x, y


@pytest.fixture(scope="module")
def toy_flow() -> FlowModule:
    """A width-4 flow trained 800 steps on the toy (~30 s on 2 cores)."""
    torch.manual_seed(0)
    module = FlowModule(FlowConfig(base_width=4, crop=(8, 8, 8), optimizer="adam", lr=3e-3))
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        loss = module.flow_loss(*toy_batch(8, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module.eval()


def test_flow_samples_both_modes_and_its_mean_approaches_the_conditional_mean(toy_flow):
    x = toy_batch(1, torch.Generator().manual_seed(1))[0][0].numpy()
    k = 24
    samples = np.stack([sample_volume(toy_flow.velocity, x, 8, "euler", noise_seed(0, j)) for j in range(k)])
    blob = samples[(slice(None), 0) + BLOB].mean(axis=(1, 2, 3))  # each sample's channel 0 over the blob
    assert (blob > 0.5).sum() >= 3 and (blob < -0.5).sum() >= 3, blob.round(2)  # both modes
    assert (np.abs(blob) > 0.6).mean() >= 0.8, blob.round(2)  # each sample near a mode, not the mean
    assert abs(blob.mean()) <= 3 * blob.std(ddof=1) / np.sqrt(k)  # the mean: 0 within 3 standard errors
    sharp = samples[(slice(None), 1) + BLOB]
    assert sharp.mean() > 0.8 and sharp.std(axis=0).mean() < 0.25  # the deterministic channel
    assert np.abs(samples[:, 1][:, 0]).mean() < 0.15  # outside the blob, channel 1 stays dark


def test_flow_sampling_is_repeatable_for_a_seed_and_differs_between_seeds(toy_flow):
    x = toy_batch(1, torch.Generator().manual_seed(2))[0][0].numpy()
    a = sample_volume(toy_flow.velocity, x, steps=3, seed=5)
    b = sample_volume(toy_flow.velocity, x, steps=3, seed=5)
    c = sample_volume(toy_flow.velocity, x, steps=3, seed=6)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    first, mean, sd = sample_fov(toy_flow.velocity, x, k=3, steps=3, seed=5)
    np.testing.assert_array_equal(first, sample_volume(toy_flow.velocity, x, steps=3, seed=noise_seed(5, 0)))
    assert mean.shape == sd.shape == (6, *SHAPE) and (sd >= 0).all()


def test_flow_loss_ignores_the_absent_channels():
    torch.manual_seed(0)
    module = FlowModule(FlowConfig(base_width=2, crop=(8, 8, 8)))
    x, y = toy_batch(2, torch.Generator().manual_seed(0))
    out = {}

    def keep(module, inputs, output):
        output.retain_grad()
        out["o"] = output

    module.velocity.unet.head.register_forward_hook(keep)
    module.flow_loss(x, y, torch.Generator().manual_seed(3)).backward()
    grad = out["o"].grad
    assert grad[:, 2:].abs().max() == 0  # the four absent channels get no gradient
    assert grad[:, :2].abs().max() > 0
    # and what the absent channels' noisy inputs hold does not change the loss: they enter as zeros
    l1 = module.flow_loss(x, y, torch.Generator().manual_seed(3))
    y2 = y.clone()
    y2[:, 2:] = float("nan")
    assert torch.equal(l1, module.flow_loss(x, y2, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("shape", [(9, 17, 12), (8, 8, 8)])
def test_velocity_net_at_a_time_is_a_plain_generator(shape):
    torch.manual_seed(0)
    net = VelocityNet(VelocityConfig(base_width=4, time_features=8))
    for p in net.time.parameters():
        torch.nn.init.normal_(p, std=0.3)  # non-trivial gains
    net.eval()
    x, y = torch.randn(2, 1, *shape), torch.randn(2, 6, *shape)
    with torch.no_grad():
        direct = net(x, y, torch.tensor([0.3, 0.3]))
        folded = net.at(0.3)
        assert isinstance(folded, Generator)
        torch.testing.assert_close(folded(torch.cat([x, y], 1)), direct, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(net(x, y, torch.tensor([0.7, 0.7])), direct)  # time matters


def test_flow_sample_tiled_equals_one_pass(toy_flow):
    """Each ODE step goes through whole-FOV prediction: tiled (layer by layer) equals one pass."""
    x = np.random.default_rng(0).normal(size=(1, 12, 24, 20)).astype(np.float32)
    whole = sample_volume(toy_flow.velocity, x, steps=2, seed=1)
    with pytest.warns(UserWarning, match="exceeds the budget"):
        tiled = sample_volume(toy_flow.velocity, x, steps=2, seed=1, max_voxels=512)
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [dict(k=0), dict(steps=0), dict(method="dopri5")])
def test_flow_sampling_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FlowSampling(**bad)


def test_flow_config_rejects_other_losses():
    with pytest.raises(ValueError, match="loss 'l1'"):
        FlowConfig(loss="l1")


# --------------------------------------------------------------------------------------------
# Calibration against a known truth
# --------------------------------------------------------------------------------------------
def test_coverage_of_calibrated_draws_is_nominal_and_overconfident_draws_undercover():
    rng = np.random.default_rng(0)
    k, shape = 5, (6, 4, 40, 40)
    scale = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)  # a different spread per voxel
    draws = rng.normal(size=(k, *shape)) * scale
    truth = rng.normal(size=shape) * scale  # the truth is one more draw
    mean, sd = draws.mean(0), draws.std(0, ddof=1)
    rows = coverage_rows("calibrated", 0, mean, sd, truth, k)
    cov = {(r["channel"], r["level"]): r["coverage"] for r in rows if "coverage" in r}
    for (_, level), c in cov.items():
        assert abs(c - level) < 0.03, (level, c)
    narrow = coverage_rows("overconfident", 0, mean, sd / 3, truth, k)
    assert all(r["coverage"] < r["level"] - 0.15 for r in narrow if "coverage" in r)
    assert interval_halfwidth(np.ones(1), 5, 0.95)[0] > 1.96 * np.sqrt(1.2)  # Student t is wider than z


def test_error_auroc_finds_large_errors_only_with_an_informative_spread():
    rng = np.random.default_rng(1)
    sd = rng.uniform(0.1, 2.0, size=50_000)
    err = np.abs(rng.normal(size=sd.size) * sd)
    assert error_auroc(sd, err) > 0.75
    assert abs(error_auroc(rng.permutation(sd), err) - 0.5) < 0.03


def test_object_level_auroc_flags_missed_and_invented_nuclei():
    zz, yy, xx = np.mgrid[:16, :48, :48]

    def ball(cy, cx):  # a nucleus of radius 4.2 µm at voxels of 0.6 µm, with bright chromatin at its centre
        r2 = (zz - 8) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
        return (r2 <= 49).astype(np.float32) + (r2 <= 4)

    truth = ball(10, 10) + ball(36, 36)  # the second is missed by the prediction
    pred = ball(10, 10) + ball(36, 10)  # the second is invented
    rng = np.random.default_rng(0)
    truth, pred = (ndimage.gaussian_filter(v, 1.0) + rng.normal(0, 0.01, v.shape) for v in (truth, pred))
    sd = np.full_like(truth, 0.1)
    sd[:, 28:44, :] = 0.9  # the spread is high where the prediction goes wrong
    rows = object_rows("m", 0, pred, sd, truth, voxel_size_zyx=(0.6, 0.6, 0.6))
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == ["invented", "matched", "missed"]
    import pandas as pd
    summary = object_auroc(pd.DataFrame(rows))
    assert summary.loc[0, "auroc"] == 1.0 and summary.loc[0, "missed"] == 1 and summary.loc[0, "invented"] == 1


def test_calibration_summary_gives_intervals_over_fovs():
    import pandas as pd
    rows = pd.DataFrame([{"model": "m", "fov_id": str(i), "channel": "dna", "level": 0.8, "coverage": c}
                         for i, c in enumerate([0.7, 0.75, 0.8, 0.78, 0.72, 0.74])])
    s = calibration_summary(rows, n_resamples=999)
    r = s.iloc[0]
    assert r["n"] == 6 and r["low"] <= r["value"] <= r["high"] and abs(r["value"] - 0.748) < 1e-3


# --------------------------------------------------------------------------------------------
# The study's sentences and tables
# --------------------------------------------------------------------------------------------
def _summary_row(model, control, metric, diff, lo, hi, n, role="distortion", hib=True):
    from vstain.evaluate.stats import decided
    return {"model": model, "control": control, "metric": metric, "reference": "truth", "diff": diff,
            "diff_low": lo, "diff_high": hi, "n": n, "higher_is_better": hib, "role": role,
            "decided": decided({"ci_low": lo, "ci_high": hi, "n": n})}


def test_plane_verdict_says_better_worse_no_difference_and_too_few():
    import pandas as pd

    from vstain.studies.flow import flow_names, plane_verdict
    one, mean = flow_names(4)
    rows = [_summary_row(mean, "U-Net", "pcc", 0.03, 0.01, 0.05, 24),  # decided better
            _summary_row(mean, "U-Net", "ssim", -0.04, -0.06, -0.02, 24),  # decided worse
            _summary_row(mean, "U-Net", "perceptual", 0.01, -0.02, 0.03, 24, "perception", False),  # undecided
            _summary_row(one, "WGAN-GP", "pcc", -0.2, -0.3, -0.1, 4)]  # too few FOVs
    text = plane_verdict(pd.DataFrame(rows), 4)
    assert f"**{mean}** beats the U-Net on PCC; loses on SSIM; no detectable difference on perceptual distance" in text
    assert f"**{one}** beats the WGAN-GP on no measure; too few FOVs to decide PCC" in text


def test_calibration_display_and_sampling_cost():
    import pandas as pd

    from vstain.evaluate.calibration import calibration_summary
    from vstain.studies.flow import calibration_display, sampling_cost
    rows = pd.DataFrame([{"model": "m", "fov_id": str(i), "channel": "dna", "level": lv, "coverage": lv - 0.1}
                         for i in range(3) for lv in (0.5, 0.8, 0.95)])
    table = calibration_summary(rows, n_resamples=99)
    wide = calibration_display(table)
    assert list(wide.columns) == ["coverage 50%", "coverage 80%", "coverage 95%"]
    assert wide.loc[("m", "dna"), "coverage 80%"] == "0.70 [0.70, 0.70]"  # FOVs alike: a zero-width interval
    sampling = pd.DataFrame({"fov_id": [1, 2, 3], "seconds": [10.0, 12.0, float("nan")]})
    cost = pd.DataFrame({"fov_id": ["1", "2", "3"], "unet_seconds": [0.5, 0.6, 0.5]})
    table, sentence = sampling_cost(sampling, cost, k=4, passes=32)
    assert len(table) == 2 and "11.0 s on average" in sentence and "20 times as long" in sentence


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    import pandas as pd

    from vstain.evaluate.kid import ALL, kid, kid_table
    from vstain.evaluate.patches import REAL
    rng = np.random.default_rng(0)
    n, d = 300, 16
    real, same, shifted = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
    assert abs(kid(real, same)) < 0.02
    assert kid(real, shifted) > 0.1
    meta = pd.DataFrame({"fov_id": [str(i % 6) for i in range(n)], "channel": "dna"})
    table = kid_table(meta, {REAL: real, "same": same, "shifted": shifted}, ["same", "shifted"], control="same",
                      n_resamples=99)
    at = table[table["channel"] == ALL].set_index("model")
    assert at.loc["same", "low"] <= 0.02 and at.loc["shifted", "low"] > 0.05 and at.loc["shifted", "n"] == 6
    assert at.loc["shifted", "decided"] and at.loc["shifted", "diff_low"] > 0 and not at.loc["same", "decided"]


def test_kid_of_fov_blocks_equals_kid_of_the_repeated_patches():
    """A bootstrap resample's KID from the per-FOV kernel sums is the KID of its patches stacked with
    their repeats (torchmetrics' poly_mmd)."""
    from vstain.evaluate.kid import kernel_blocks, kid, kid_of_fovs
    rng = np.random.default_rng(0)
    fov = np.repeat(np.arange(5), [3, 4, 2, 5, 3])
    real, fake = rng.normal(size=(len(fov), 8)), rng.normal(size=(len(fov), 8)) + 0.3
    blocks = kernel_blocks(real, fake, fov, 5)
    assert kid_of_fovs(blocks, np.arange(5)) == pytest.approx(kid(real, fake), rel=1e-10)
    take = np.array([0, 3, 3, 1, 4])
    rows = np.concatenate([np.flatnonzero(fov == f) for f in take])
    assert kid_of_fovs(blocks, take) == pytest.approx(kid(real[rows], fake[rows]), rel=1e-10)

"""The conditional WGAN-GP (vstain.training.wgan): Algorithm 1's steps, the masked critic input, the
gradient penalty, divergence guard, resume, and the sharpness measure. Tiny widths, tiny data."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from lightning import seed_everything
from lightning.pytorch.callbacks import Callback
from scipy.ndimage import gaussian_filter

from vstain.channels import TARGETS
from vstain.evaluate.sharpness import sharpness, sharpness_table
from vstain.losses import gradient_penalty, mask_pair, masked_l1
from vstain.modelfiles import init_generator
from vstain.preprocess import processed
from vstain.training import wgan
from vstain.training.configs import WGANConfig
from vstain.volumes import write_volume

STRUCTURES = ("mito", "envelope", "actomyosin", "nucleoli")


def tiny_batch(n=3, zyx=(9, 17, 16), seed=0):
    """x [n,1,Z,Y,X]; y [n,6,Z,Y,X] carrying dna, membrane and one structure per sample.

    The critic sees an axis of 8-15 voxels as one score; with every axis that small its
    InstanceNorm has one voxel to normalise and the critic is constant, so one axis is >= 16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *zyx, generator=g)
    y = torch.randn(n, 6, *zyx, generator=g)
    for i in range(n):
        keep = {"dna", "membrane", STRUCTURES[i % len(STRUCTURES)]}
        for c, name in enumerate(TARGETS):
            if name not in keep:
                y[i, c] = float("nan")
    return x, y


def tiny_config(**kw):
    base = dict(base_width=2, critic_width=2, batch_size=2, crop=(8, 16, 16), samples=8, val_samples=2,
                iterations=4, val_every=2, ckpt_every=1, n_critic=2, optimizer="adam",
                lr_generator=1e-3, lr_critic=1e-3, seed=3)
    base.update(kw)
    return WGANConfig(**base)


@pytest.fixture(scope="module")
def stage_in(tmp_path_factory):
    """A processed set of 12 random FOVs of 10x20x22 (3 per structure), with a 'clean truth'."""
    rng = np.random.default_rng(0)
    records = []
    for s in STRUCTURES:
        for k in range(3):
            tgt = rng.normal(size=(6, 10, 20, 22)).astype(np.float32)
            for c, name in enumerate(TARGETS):
                if name not in ("dna", "membrane", s):
                    tgt[c] = np.nan
            records.append(dict(fov_id=f"{s}{k}", gene="G", structure=s, bf=rng.normal(size=(10, 20, 22)),
                                target=tgt, truth=rng.normal(size=(6, 10, 20, 22))))
    stage = tmp_path_factory.mktemp("processed")
    processed.write_processed(stage, records)
    return stage


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def test_config_defaults_are_the_thesis_values():
    c = WGANConfig()
    assert (c.lr_generator, c.lr_critic, c.lambda_adv, c.lambda_gp, c.n_critic, c.batch_size) == (5e-5, 5e-5, 0.05, 10.0, 5, 16)
    assert (c.optimizer, c.adv_weighting, c.base_width, c.critic_width) == ("rmsprop", "constant", 64, 64)
    assert c.steps_per_iteration == 6
    assert WGANConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("bad, match", [
    (dict(n_critic=0), "n_critic must be a positive integer, got 0"),
    (dict(lambda_gp=-1.0), "lambda_gp must be >= 0, got -1.0"),
    (dict(adv_weighting="linear"), "adv_weighting must be one of"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(crop=(8, 7, 16)), r"crop must be 3 sizes .* got \(8, 7, 16\)"),
    (dict(lr_critic=0.0), "lr_critic must be > 0"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        WGANConfig(**bad)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown WGANConfig keys"):
        WGANConfig.from_dict({"lambda_adversarial": 1})


# --------------------------------------------------------------------------------------------
# The critic's inputs: real and fake carry the same empty channels
# --------------------------------------------------------------------------------------------
class Recorder:
    """Wraps a critic and records every (x, y) it is called with."""

    def __init__(self, critic):
        self.calls = []
        self.handle = critic.register_forward_pre_hook(lambda m, args: self.calls.append(tuple(a.detach() for a in args)))


@pytest.mark.parametrize("n, zyx", [(3, (9, 17, 11)), (2, (8, 10, 19))])
def test_real_and_fake_critic_inputs_have_identical_empty_channels(n, zyx):
    torch.manual_seed(0)
    m = wgan.WGAN(tiny_config())
    x, y = tiny_batch(n, zyx)
    rec = Recorder(m.critic)
    m.critic_step(x, y, step=0)
    m.generator_step(x, y, step=1)
    missing = torch.isnan(y).flatten(2).all(2)  # [n, 6]
    _, both = rec.calls[0]  # critic step: real and fake in one batch
    real, fake = both[:n], both[n:]
    fake_gen = rec.calls[-1][1]  # generator step: the masked fake
    for t in (real, fake, fake_gen):
        assert not torch.isnan(t).any()
        empty = (t == 0).flatten(2).all(2)
        assert torch.equal(empty, missing)
    # the interpolate of the gradient penalty carries the same empty channels as well
    y_hat = rec.calls[1][1]
    assert torch.equal((y_hat == 0).flatten(2).all(2), missing)


# --------------------------------------------------------------------------------------------
# Each step changes only its own network
# --------------------------------------------------------------------------------------------
def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return sorted(k for k, v in module.state_dict().items() if not torch.equal(before[k], v))


def test_critic_step_changes_only_the_critic():
    torch.manual_seed(1)
    m = wgan.WGAN(tiny_config())
    x, y = tiny_batch(2, (8, 17, 10))
    g0, c0 = _snapshot(m.generator), _snapshot(m.critic)
    out = m.critic_step(x, y, step=0)
    assert _changed(g0, m.generator) == []
    # every critic tensor moved but the score's bias: it cancels in D(fake) - D(real), and the
    # penalty does not see it, so a Wasserstein critic's last bias never gets a gradient
    assert _changed(c0, m.critic) == sorted(k for k in c0 if k != "score.bias")
    assert all(p.grad is None for p in m.generator.parameters())
    assert set(out) == {"critic_loss", "wasserstein", "gp", "d_real", "d_fake", "grad_norm_critic"}
    assert all(math.isfinite(v) for v in out.values())
    assert out["critic_loss"] == pytest.approx(out["d_fake"] - out["d_real"] + 10.0 * out["gp"], rel=1e-5)
    assert out["wasserstein"] == pytest.approx(out["d_real"] - out["d_fake"], rel=1e-5)


def test_generator_step_changes_only_the_generator():
    torch.manual_seed(2)
    m = wgan.WGAN(tiny_config())
    x, y = tiny_batch(2, (8, 17, 10))
    g0, c0 = _snapshot(m.generator), _snapshot(m.critic)
    out = m.generator_step(x, y, step=2)
    assert _changed(c0, m.critic) == []
    assert _changed(g0, m.generator) == sorted(g0)
    assert all(p.grad is None for p in m.critic.parameters())  # no critic weight gradient was computed
    assert all(p.requires_grad for p in m.critic.parameters())  # ... and the critic is trainable again
    assert out["generator_loss"] == pytest.approx(out["l1"] + 0.05 * out["adv"], rel=1e-5)


def test_generator_gradient_is_l1_plus_weighted_adversarial():
    """The output-gradient route gives the same generator gradient as backpropagating the loss."""
    torch.manual_seed(4)
    m = wgan.WGAN(tiny_config(lambda_adv=0.3))
    x, y = tiny_batch(2, (8, 9, 16))
    ref = wgan.WGAN(tiny_config(lambda_adv=0.3))
    ref.load_state_dict(m.state_dict())
    pred = ref.generator(x)
    fake, _ = mask_pair(pred, y)
    loss = masked_l1(pred, y) - 0.3 * ref.critic(x, fake).mean()
    loss.backward()
    m._plain_optimizers = [torch.optim.SGD(m.critic.parameters(), lr=0.0), torch.optim.SGD(m.generator.parameters(), lr=0.0)]
    m.generator_step(x, y)
    for (name, p), q in zip(m.generator.named_parameters(), ref.generator.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", [dict(critic_channels_last=True), dict(channels_last=True, critic_channels_last=True)])
def test_channels_last_gives_the_same_steps(layout):
    x, y = tiny_batch(2, (8, 9, 16))
    ref, alt = wgan.WGAN(tiny_config()), wgan.WGAN(tiny_config(**layout))
    alt.load_state_dict(ref.state_dict())
    for m in (ref, alt):
        m._plain_optimizers = [torch.optim.SGD(m.critic.parameters(), lr=1e-3),
                               torch.optim.SGD(m.generator.parameters(), lr=1e-3)]
    a = [ref.critic_step(x, y, 0), ref.generator_step(x, y, 1)]
    b = [alt.critic_step(x, y, 0), alt.generator_step(x, y, 1)]
    for da, db in zip(a, b):
        for k in da:
            assert db[k] == pytest.approx(da[k], rel=2e-3, abs=1e-6), k  # summation order differs


# --------------------------------------------------------------------------------------------
# Gradient penalty
# --------------------------------------------------------------------------------------------
class LinearCritic(torch.nn.Module):
    """D(x, y) = scale * <w/|w|, y>: linear in y with gradient norm ``scale`` everywhere."""

    def __init__(self, shape, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(*shape))
        self.scale = scale

    def forward(self, x, y):
        w = self.w / self.w.norm()
        return self.scale * (y * w).flatten(1).sum(1).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("n, zyx, scale, expected", [
    (3, (8, 9, 10), 1.0, 0.0),
    (1, (11, 8, 13), 1.0, 0.0),
    (2, (9, 9, 8), 3.0, 4.0),  # (3 - 1)^2
    (4, (8, 10, 9), 0.5, 0.25),
])
def test_gradient_penalty_of_a_linear_critic(n, zyx, scale, expected):
    torch.manual_seed(n)
    x, y = tiny_batch(n, zyx)
    fake = torch.randn_like(y)
    fake, real = mask_pair(fake, y)
    critic = LinearCritic((6, *zyx), scale)
    assert float(gradient_penalty(critic, x, real, fake).detach()) == pytest.approx(expected, abs=1e-6)


def test_critic_step_with_a_unit_linear_critic_has_zero_penalty():
    torch.manual_seed(5)
    m = wgan.WGAN(tiny_config())
    x, y = tiny_batch(2, (8, 9, 16))
    m.critic = LinearCritic((6, 8, 9, 16))
    out = m.critic_step(x, y, step=7)
    assert out["gp"] == pytest.approx(0.0, abs=1e-6)
    assert out["critic_loss"] == pytest.approx(out["d_fake"] - out["d_real"], abs=1e-6)


def test_gradient_penalty_epsilon_depends_on_seed_and_step_only():
    x, y = tiny_batch(2, (8, 9, 16))
    base = wgan.WGAN(tiny_config())

    def gp(step, global_seed):
        m = wgan.WGAN(tiny_config())
        m.load_state_dict(base.state_dict())
        torch.manual_seed(global_seed)
        return m.critic_step(x, y, step=step)["gp"]

    assert gp(3, 0) == gp(3, 99)  # the global RNG does not matter ...
    assert gp(3, 0) != gp(4, 0)  # ... the step does


# --------------------------------------------------------------------------------------------
# Adversarial weighting
# --------------------------------------------------------------------------------------------
def test_balanced_weighting_sets_the_gradient_ratio():
    torch.manual_seed(6)
    m = wgan.WGAN(tiny_config(adv_weighting="balanced", lambda_adv=0.4))
    out = m.generator_step(*tiny_batch(2, (8, 9, 16)))
    assert out["grad_ratio"] == pytest.approx(0.4, rel=1e-5)


@pytest.mark.parametrize("weighting, epoch, expected", [("constant", 3, 0.05), ("inverse_epoch", 1, 0.05),
                                                        ("inverse_epoch", 4, 0.0125)])
def test_adversarial_weight_schedule(weighting, epoch, expected, monkeypatch):
    m = wgan.WGAN(tiny_config(adv_weighting=weighting, lambda_adv=0.05))
    monkeypatch.setattr(m, "epoch_number", lambda: epoch)
    assert m.adv_weight(1.0, 2.0) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Training runs: finite losses, divergence guard, exact resume
# --------------------------------------------------------------------------------------------
class Crash(Callback):
    """Simulates an interruption after optimiser step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_short_run_resume_reproduces_the_losses(stage_in, tmp_path):
    cfg = tiny_config(samples=6)  # 4 iterations of 2 batches, 3 steps; epochs of 3 batches; checkpoints every 3 steps
    full = wgan.run_wgan_stage(stage_in, tmp_path / "full", cfg, progress=False)
    train = full.losses[full.losses["kind"] != "val"]
    assert list(train["kind"]) == ["critic", "critic", "generator"] * 4
    assert list(train["step"]) == list(range(12))
    num = train.drop(columns=["kind"]).to_numpy(dtype=float)
    assert np.isfinite(num[~np.isnan(num)]).all()
    for col in ("critic_loss", "wasserstein", "gp", "grad_norm_critic"):
        assert train.loc[train["kind"] == "critic", col].notna().all()
    for col in ("l1", "adv", "lambda_adv", "grad_ratio", "grad_norm_generator"):
        assert train.loc[train["kind"] == "generator", col].notna().all()
    assert full.losses["val_l1"].notna().sum() == 2
    assert (tmp_path / "full" / "losses.csv").exists() and (tmp_path / "full" / "model.json").exists()
    assert len(full.predictions) == 8 and (tmp_path / "full" / full.predictions["path"][0]).exists()
    assert full.global_step == 12 and full.iterations == 4 and full.stopped == ""

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        wgan.fit_wgan(cfg, stage_in, out, progress=False, callbacks=[Crash(at=7)])  # last checkpoint: step 6, mid-epoch
    module, trainer, stopped = wgan.fit_wgan(cfg, stage_in, out, progress=False)
    assert trainer.global_step == 12 and stopped == ""
    resumed = wgan.history_frame(module.history)
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), full.losses.reset_index(drop=True), rtol=1e-6)
    for a, b in zip(module.generator.state_dict().values(), full.generator.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("which", ["critic", "generator"])
def test_non_finite_loss_raises_before_the_step(which):
    m = wgan.WGAN(tiny_config())
    x, y = tiny_batch(2, (8, 9, 16))
    with torch.no_grad():
        m.critic.score.bias.fill_(float("inf"))  # every score infinite
    before = _snapshot(m)
    with pytest.raises(wgan.TrainingDiverged, match="non-finite"):
        m.critic_step(x, y, step=0) if which == "critic" else m.generator_step(x, y, step=0)
    assert _changed(before, m) == []
    assert m.history[-1]["kind"] == "diverged"


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message(stage_in, tmp_path):
    cfg = tiny_config(iterations=3, max_wasserstein=1e-9)
    module, trainer, stopped = wgan.fit_wgan(cfg, stage_in, tmp_path, progress=False)
    assert "WGAN training stopped at optimiser step 0" in stopped and "max_wasserstein" in stopped
    assert module.history[-1]["kind"] == "diverged"
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing bad was saved


@pytest.mark.slow
def test_init_from_the_unet_checkpoint(stage_in, tmp_path):
    first = wgan.fit_wgan(tiny_config(iterations=1), stage_in, tmp_path / "a", progress=False)[0]
    torch.save({"state_dict": {f"generator.{k}": v for k, v in first.generator.state_dict().items()}},
               tmp_path / "unet.ckpt")
    m = wgan.WGAN(tiny_config())
    init_generator(m.generator, tmp_path / "unet.ckpt")
    for a, b in zip(m.generator.state_dict().values(), first.generator.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="base_width 2 but the WGAN's generator has 4"):
        init_generator(wgan.WGAN(tiny_config(base_width=4)).generator, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="run notebooks/04_unet.ipynb first"):
        init_generator(m.generator, tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# Sharpness that noise cannot fool
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(1)
    return gaussian_filter(rng.normal(size=(6, 40, 44)), (0.5, 1.5, 1.5))


@pytest.mark.parametrize("make, transfer, power", [
    (lambda t, r: t, (0.99, 1.01), (0.99, 1.01)),
    (lambda t, r: 0.3 * t + 2.0, (0.99, 1.01), (0.99, 1.01)),  # gain and offset cancel
    (lambda t, r: t + 0.5 * t.std() * r.normal(size=t.shape), (0.9, 1.1), (1.5, np.inf)),  # noise: power fooled
    (lambda t, r: gaussian_filter(t, (0, 1.5, 1.5)), (0.0, 0.6), (0.0, 0.6)),  # blur
    (lambda t, r: gaussian_filter(t, (0, 1.5, 1.5)) + 0.5 * t.std() * r.normal(size=t.shape), (0.0, 0.65), (1.0, np.inf)),
])
def test_sharpness_is_not_fooled_by_noise(clean, make, transfer, power):
    pred = make(clean, np.random.default_rng(2))
    s = sharpness(pred, clean)
    assert transfer[0] <= s["transfer"] <= transfer[1]
    assert power[0] <= s["power"] <= power[1]
    assert s["coarse"] > 0.2


def test_sharpness_of_a_prediction_that_misses_the_structure_is_undefined(clean):
    s = sharpness(clean.std() * np.random.default_rng(4).normal(size=clean.shape), clean)
    assert abs(s["coarse"]) < 0.1 and math.isnan(s["transfer"]) and s["power"] > 1


def test_sharpness_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="must be equal"):
        sharpness(np.zeros((4, 8, 8)), np.zeros((4, 8, 9)))


@pytest.mark.parametrize("with_truth, reference", [(True, "truth"), (False, "target")])
def test_sharpness_table_reference(tmp_path, with_truth, reference):
    rng = np.random.default_rng(3)
    records = []
    for s in STRUCTURES:
        for k in range(3):
            truth = gaussian_filter(rng.normal(size=(6, 8, 24, 20)), (0, 0, 1.5, 1.5))
            tgt = truth + 0.3 * rng.normal(size=truth.shape)
            tgt[[i for i, n in enumerate(TARGETS) if n not in ("dna", "membrane", s)]] = np.nan
            records.append(dict(fov_id=f"{s}{k}", gene="G", structure=s, bf=rng.normal(size=(8, 24, 20)),
                                target=tgt, truth=truth if with_truth else None))
    processed.write_processed(tmp_path / "stage", records)
    man = processed.read_manifest(tmp_path / "stage")
    for _, r in man[man["split"] == "test"].iterrows():
        _, target, truth = processed.load_fov(r)
        ref = truth if with_truth else np.nan_to_num(target)
        write_volume(tmp_path / "sharp" / "predictions" / f"{r['fov_id']}.tif", ref)
        write_volume(tmp_path / "blur" / "predictions" / f"{r['fov_id']}.tif", gaussian_filter(ref, (0, 0, 2, 2)))
    table = sharpness_table(tmp_path / "stage", {"sharp": tmp_path / "sharp", "blur": tmp_path / "blur"})
    assert set(table["reference"]) == {reference}
    per_fov = table.groupby(["model", "fov_id"]).size()
    assert set(per_fov[["sharp", "blur"]]) == {6 if with_truth else 3}  # every channel the reference has
    means = table.groupby("model")["transfer"].mean()
    assert means["sharp"] == pytest.approx(1.0, abs=1e-6) and means["blur"] < 0.7
    if with_truth:
        assert set(per_fov["measured target"]) == {3}
        assert means["measured target"] == pytest.approx(1.0, abs=0.15)  # the noise does not count
    else:
        assert "measured target" not in means
        with pytest.raises(ValueError, match="needs the simulator's clean truth"):
            sharpness_table(tmp_path / "stage", {"sharp": tmp_path / "sharp"}, reference="truth")


def _transfer_table(n_fovs, gain):
    rng = np.random.default_rng(0)
    rows = []
    for f in range(n_fovs):
        for ch in ("dna", "nucleoli"):
            t = 0.5 + 0.05 * rng.standard_normal()
            rows += [{"model": "U-Net", "fov_id": str(f), "channel": ch, "transfer": t},
                     {"model": "WGAN", "fov_id": str(f), "channel": ch, "transfer": t + gain}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n, gain, claim", [(8, 0.2, "holds"), (8, -0.2, "does not hold"), (8, 0.0, "cannot be decided"),
                                            (3, 0.2, "cannot be decided with n = 3 FOVs")])
def test_sharper_verdict_answers_from_paired_intervals(n, gain, claim):
    from vstain.evaluate.sharpness import sharper_verdict

    text = sharper_verdict(_transfer_table(n, gain), n_resamples=999)
    assert f"on most channels **{claim}" in text
    if gain and n >= 6:
        assert ("WGAN better" if gain > 0 else "U-Net better") in text


def test_sharper_verdict_calls_a_blank_channel_a_loss_before_any_number():
    """A model that reproduces no coarse structure of a channel (transfer undefined on every FOV)
    predicts (almost) none of it: a loss for that model, not a channel "not scored"."""
    from vstain.evaluate.sharpness import blank_channels, sharper_verdict

    table = _transfer_table(8, 0.2)
    table.loc[(table["model"] == "WGAN") & (table["channel"] == "nucleoli"), "transfer"] = np.nan
    assert blank_channels(table, "WGAN") == {"nucleoli": (8, 8)} and blank_channels(table, "U-Net") == {}
    text = sharper_verdict(table, n_resamples=999)
    assert "Nucleoli: the WGAN predicts almost none (no coarse structure on 8 of 8 FOVs), U-Net better" in text
    assert "DNA: WGAN better" in text and "not scored" not in text
    assert "on most channels **does not hold**" in text  # one channel each way of two


def test_sharper_verdict_with_a_missing_channel_a_tie_and_a_small_gain():
    from vstain.evaluate.sharpness import sharper_verdict

    tie = sharper_verdict(_transfer_table(8, 0.0), n_resamples=999)
    assert tie.count("no detectable difference with n = 8 FOVs") == 2 and "**cannot be decided" in tie
    missing = _transfer_table(8, 0.2)
    missing = missing[~((missing["model"] == "WGAN") & (missing["channel"] == "nucleoli"))]
    text = sharper_verdict(missing, n_resamples=999)
    assert "DNA: WGAN better" in text and "Nucleoli: not scored on any FOV" in text
    small = sharper_verdict(_transfer_table(8, 0.01), n_resamples=999)
    assert "**holds**" in small and "The gains are small, though: the median gain is 2." in small
    large = sharper_verdict(_transfer_table(8, 0.2), n_resamples=999)
    assert "For scale: the median gain is 4" in large


def test_sharper_verdict_names_a_channel_neither_model_predicts():
    from vstain.evaluate.sharpness import sharper_verdict

    table = _transfer_table(8, 0.2)
    table.loc[table["channel"] == "nucleoli", "transfer"] = np.nan
    text = sharper_verdict(table, n_resamples=999)
    assert "Nucleoli: neither model reproduces its coarse structure on most FOVs, not compared" in text
    assert "DNA: WGAN better" in text and "**holds**" in text
    table.loc[table["channel"] == "dna", "transfer"] = np.nan
    assert sharper_verdict(table, n_resamples=999).startswith("The coherent transfer of U-Net and WGAN could not be "
                                                             "compared: no channel where both are defined (DNA: neither")


def test_blank_note_names_blank_channels_before_any_number():
    from vstain.evaluate.sharpness import blank_note

    table = _transfer_table(4, 0.1)
    assert "no channel is blank" in blank_note(table, ["U-Net", "WGAN"])
    table.loc[(table["model"] == "WGAN") & (table["channel"] == "dna"), "transfer"] = np.nan
    assert blank_note(table, ["U-Net", "WGAN"]).startswith(
        "**Before any number:** no coarse structure of the truth, so (almost) nothing predicted, for the WGAN on DNA "
        "(4 of 4 FOVs).")


# --------------------------------------------------------------------------------------------
# λ_adv = 0: the L1-only control of the fine-tune
# --------------------------------------------------------------------------------------------
class Batches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((batch[0].clone(), batch[1].clone()))


@pytest.mark.slow
def test_l1_only_control_is_plain_l1_on_each_iterations_generator_batch(stage_in, tmp_path):
    """At λ_adv = 0 the critic is skipped, the step count and the batches stay those of an
    adversarial run, and the generator equals Adam on the masked L1 of each iteration's last
    batch, the batch a λ_adv > 0 run trains its generator on; snapshots fall at generator iterations."""
    cfg = tiny_config(lambda_adv=0.0, samples=6, snapshots=2)
    seen = Batches()
    seed_everything(cfg.seed, verbose=False)
    initial = wgan.WGAN(cfg)  # the seeded initial weights, as fit_wgan builds them
    module, trainer, stopped = wgan.fit_wgan(cfg, stage_in, tmp_path, progress=False, callbacks=[seen])
    assert stopped == "" and trainer.global_step == cfg.iterations * cfg.steps_per_iteration
    for a, b in zip(module.critic.state_dict().values(), initial.critic.state_dict().values()):
        torch.testing.assert_close(a, b)  # the critic never trained
    hist = wgan.history_frame(module.history)
    assert list(hist.loc[hist["kind"] == "generator", "step"]) == [2, 5, 8, 11]
    # the same generator from a plain loop
    ref = initial.generator
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr_generator, betas=cfg.betas)
    for x, y in seen.seen[cfg.n_critic - 1::cfg.n_critic]:
        opt.zero_grad()
        masked_l1(ref(x), y).backward()
        opt.step()
    # the same function (the biases in front of an instance norm get round-off gradients only, which
    # Adam scales up to steps of any sign, but the norm removes them again)
    x = seen.seen[0][0]
    with torch.no_grad():
        torch.testing.assert_close(module.generator(x), ref(x), rtol=1e-4, atol=1e-4)
    weights = [k for k in ref.state_dict() if k.endswith("weight")]
    for k in weights:
        torch.testing.assert_close(module.generator.state_dict()[k], ref.state_dict()[k], rtol=1e-4, atol=1e-6)
    snaps = pd.read_csv(tmp_path / "snapshots.csv")
    assert snaps["step"].tolist() == [2, 4]  # generator iterations, log-spaced up to 4

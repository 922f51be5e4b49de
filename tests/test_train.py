"""Masked L1 (thesis 3.2.1) and the U-Net baseline's training: learning, checkpoints, resume."""
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from vstain.channels import TARGETS
from vstain.losses import masked_l1
from vstain.modelfiles import load_generator, read_metrics
from vstain.preprocess import processed
from vstain.training.configs import UNetConfig
from vstain.training import precision as precision_module
from vstain.training.trainer import CropDataModule, make_trainer, set_threads
from vstain.training.unet import UNetModule, run_unet_stage
from vstain.volumes import read_volume

SHAPE = (12, 24, 28)  # odd, unequal Z, Y, X


def tiny_records(n_per=3, seed=0, counts=None, shape=SHAPE, clean_truth=False):
    """FOVs per tagged structure (``counts``; default mito and envelope, ``n_per`` each); each target
    is a smooth function of the brightfield plus noise, and each FOV carries DNA, membrane and its
    own structure (NaN elsewhere). The truth is the target with NaN as 0, or with ``clean_truth``
    the noise-free function in all six channels."""
    rng = np.random.default_rng(seed)
    recs = []
    for s, n in (counts or {"mito": n_per, "envelope": n_per}).items():
        for i in range(n):
            bf = rng.normal(size=shape).astype(np.float32)
            tgt = np.full((6, *shape), np.nan, np.float32)
            for c, name in enumerate(TARGETS):
                if name in ("dna", "membrane", s):
                    tgt[c] = np.tanh(bf * (c + 1) / 3) + 0.1 * rng.normal(size=shape)
            truth = np.stack([np.tanh(bf * (c + 1) / 3) for c in range(6)]) if clean_truth else np.nan_to_num(tgt)
            recs.append(dict(fov_id=f"{s}{i}", gene="G", structure=s, bf=bf, target=tgt, truth=truth))
    return recs


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    d = tmp_path_factory.mktemp("processed")
    processed.write_processed(d, tiny_records())
    return d


def tiny_cfg(**kw):
    base = dict(base_width=4, optimizer="adam", lr=2e-3, batch_size=2, crop=(8, 16, 16), samples=6,
                val_samples=2, max_steps=8, val_every=4, ckpt_every=1)
    return UNetConfig(**{**base, **kw})


# --- masked L1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 6, 3, 5, 7), (1, 6, 9, 4, 2)])
def test_masked_l1_is_l1_over_valid_voxels(shape):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    target[:, 2:4] = float("nan")  # two channels without label
    target[0, 0, 0, 0, :2] = float("nan")  # and a few single voxels
    valid = ~torch.isnan(target)
    expected = (pred[valid] - target[valid]).abs().mean()
    assert torch.allclose(masked_l1(pred, target), expected)


def test_masked_l1_gives_no_gradient_to_missing_channels():
    pred = torch.randn(2, 6, 4, 5, 6, requires_grad=True)
    target = torch.randn(2, 6, 4, 5, 6)
    target[:, [2, 4, 5]] = float("nan")
    masked_l1(pred, target).backward()
    assert torch.all(pred.grad[:, [2, 4, 5]] == 0)
    assert torch.all(pred.grad[:, [0, 1, 3]] != 0)


def test_masked_l1_all_missing_is_an_error():
    with pytest.raises(ValueError, match="no labelled voxel"):
        masked_l1(torch.zeros(1, 6, 2, 2, 2), torch.full((1, 6, 2, 2, 2), float("nan")))


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(optimizer="sgd"), dict(crop=(4, 16, 16)), dict(lr=0), dict(batch_size=0),
                                 dict(device="tpu"), dict(precision="8-bit")])
def test_config_validation_names_the_bad_value(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueError) as err:
        UNetConfig(**bad)
    assert key in str(err.value) and repr(value).strip("()").split(",")[0] in str(err.value)


def test_config_round_trip():
    cfg = tiny_cfg()
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"width": 3})


def test_bf16_on_a_cpu_without_native_bfloat16_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without avx512_bf16 or AMX"):
        make_trainer(tmp_path / "a", 2, precision="bf16-mixed", progress=False)
    if not torch.cuda.is_available():  # "auto" picks this CPU
        with pytest.warns(UserWarning, match="without avx512_bf16 or AMX"):
            make_trainer(tmp_path / "auto", 2, device="auto", precision="bf16-mixed", progress=False)
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*avx512_bf16.*")
        make_trainer(tmp_path / "b", 2, precision="bf16-mixed", progress=False)
        make_trainer(tmp_path / "c", 2, precision="32-true", progress=False)


# --- training ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_training_lowers_the_loss_and_writes_the_stage(stage, tmp_path):
    res = run_unet_stage(stage, tmp_path, tiny_cfg(max_steps=16, val_every=8, ckpt_every=8), progress=False)
    tl = res.losses["train_l1"].to_numpy()
    vl = res.losses["val_l1"].dropna().to_numpy()
    assert len(tl) == 16 and res.global_step == 16
    assert tl[-4:].mean() < tl[:4].mean()
    assert len(vl) == 2 and vl[-1] < vl[0]
    # outputs of the stage
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert list(res.losses.columns) == ["step", "epoch", "train_l1", "val_l1"]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["config"]["base_width"] == 4 and meta["global_step"] == 16
    assert sorted(res.predictions["split"].unique()) == ["test", "val"]
    for p in res.predictions["path"]:
        pred = read_volume(tmp_path / p)
        assert pred.shape == (6, *SHAPE) and np.isfinite(pred).all()
    # the checkpoint restores the same generator, with its config
    gen = load_generator(tmp_path)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gen(x), res.generator(x), atol=1e-6)
    module = UNetModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert module.cfg == res.config


class Interrupt(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated interruption")


class Record(L.Callback):
    def __init__(self):
        self.start, self.batches = None, []

    def on_train_start(self, trainer, module):
        self.start = trainer.global_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((trainer.global_step, round(batch[0].sum().item(), 4)))


def fit(stage, out, cfg, callbacks):
    set_threads(cfg)
    trainer = make_trainer(out, cfg.max_steps, ckpt_every=cfg.ckpt_every, val_every=cfg.val_every, seed=cfg.seed,
                           progress=False, callbacks=callbacks)
    module = UNetModule(cfg)
    trainer.fit(module, datamodule=CropDataModule(stage, cfg.crop, cfg.batch_size, cfg.samples, cfg.seed, cfg.val_samples))
    return module, trainer


# 6 crops / batch 2 = 3 steps per epoch: interrupt mid-epoch (last checkpoint at step 4) and at an
# epoch's end (last checkpoint at step 3).
@pytest.mark.slow
@pytest.mark.parametrize("interrupt_at,saved", [(5, 4), (4, 3)])
def test_resume_after_interruption_continues_from_the_saved_step(stage, tmp_path, interrupt_at, saved):
    cfg = tiny_cfg(max_steps=7, val_every=3)
    full = Record()
    m_full, _ = fit(stage, tmp_path / "a", cfg, [full])
    with pytest.raises(RuntimeError, match="simulated"):
        fit(stage, tmp_path / "b", cfg, [Interrupt(interrupt_at)])
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == saved
    resumed = Record()
    m_res, tr = fit(stage, tmp_path / "b", cfg, [resumed])
    assert resumed.start == saved and tr.global_step == cfg.max_steps
    # same crops in the same order as the uninterrupted run, and the same weights at the end
    assert resumed.batches == full.batches[saved:]
    for a, b in zip(m_full.parameters(), m_res.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    steps = read_metrics(tmp_path / "b")["step"].tolist()
    assert steps == list(range(cfg.max_steps))  # one row per step across both logs


@pytest.mark.slow
def test_changed_config_starts_afresh(stage, tmp_path):
    run_unet_stage(stage, tmp_path, tiny_cfg(max_steps=2), splits=("test",), progress=False)
    with pytest.warns(UserWarning, match="base_width"):
        res = run_unet_stage(stage, tmp_path, tiny_cfg(max_steps=2, base_width=2), splits=("test",), progress=False)
    assert res.global_step == 2 and len(res.losses) == 2

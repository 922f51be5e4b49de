"""Training on several processes (Lightning DDP, gloo on two CPU processes): the U-Net (automatic
optimisation) and the WGAN-GP (manual optimisation, one network per step) keep identical weights on
every process, each process trains on its own crops, only process 0 writes the stage folder, and a
run resumed under DDP continues from its checkpoint with the next crops."""
import hashlib
import json
import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from vstain.channels import TARGETS
from vstain.modelfiles import CHECKPOINTS, LAST, read_metrics
from vstain.preprocess import processed
from vstain.training import wgan
from vstain.training.configs import UNetConfig, WGANConfig
from vstain.training.trainer import SkipSampler, error_message
from vstain.training.unet import fit_unet

SHAPE = (9, 18, 21)  # Z, Y, X: odd and unequal
WORLD = 2


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    rng = np.random.default_rng(5)
    records = []
    for s in ("mito", "nucleoli"):
        for i in range(3):
            bf = rng.normal(size=SHAPE).astype(np.float32)
            tgt = np.full((6, *SHAPE), np.nan, np.float32)
            for c, name in enumerate(TARGETS):
                if name in ("dna", "membrane", s):
                    tgt[c] = np.tanh(bf * (c + 1) / 3) + 0.1 * rng.normal(size=SHAPE)
            records.append(dict(fov_id=f"{s}{i}", gene="G", structure=s, bf=bf, target=tgt, truth=None))
    d = tmp_path_factory.mktemp("processed")
    processed.write_processed(d, records)
    return d


def weights_hash(module: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in module.state_dict().values())).hexdigest()


class RankRecord(L.Callback):
    """Each process writes ``<out>/rank<r>_<tag>.json``: the crops it trained on (step, sum of the
    brightfield crop) and a hash of its weights at the end of training."""

    def __init__(self, out, tag):
        self.out, self.tag, self.crops = str(out), tag, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.crops.append([int(trainer.global_step), round(float(batch[0].double().sum()), 3)])

    def on_train_end(self, trainer, module):
        rec = {"crops": self.crops, "weights": weights_hash(module), "step": int(trainer.global_step)}
        with open(f"{self.out}/rank{trainer.global_rank}_{self.tag}.json", "w") as f:
            json.dump(rec, f)


def read_ranks(out, tag):
    return [json.loads((out / f"rank{r}_{tag}.json").read_text()) for r in range(WORLD)]


def expected_crops(stage, crop, samples, seed, rank, batches, step=lambda b: b):
    """(step, crop sum) of the crops process ``rank`` must train on in ``batches``, batch size 1:
    index ``rank + WORLD * k`` of each epoch of ``ceil(samples / WORLD)`` batches; ``step(b)`` is
    the optimiser step at which batch ``b`` starts."""
    ds = processed.ProcessedCrops(stage, "train", crop, samples, flips=True, seed=seed)
    per_epoch = -(-samples // WORLD)
    out = []
    for b in batches:
        ds.set_epoch(b // per_epoch)
        x, _ = ds[(rank + WORLD * (b % per_epoch)) % samples]
        out.append([step(b), round(float(x.double().sum()), 3)])
    return out


# --------------------------------------------------------------------------------------------
# The crop sampler's split between processes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, replicas, expected", [
    (7, 2, [[0, 2, 4, 6], [1, 3, 5, 0]]),  # padded by wrapping round: equal batches on both
    (6, 3, [[0, 3], [1, 4], [2, 5]]),
    (5, 1, [[0, 1, 2, 3, 4]]),
])
def test_sampler_splits_the_crops_between_processes(n, replicas, expected):
    got = [list(SkipSampler(range(n), r, replicas)) for r in range(replicas)]
    assert got == expected
    s = SkipSampler(range(n), replicas - 1, replicas)
    s.start = 1  # a resumed epoch skips what this process already used, once
    assert list(s) == expected[-1][1:] and list(s) == expected[-1]


def test_sampler_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank must be in 0..replicas-1, got rank 2 of 2"):
        SkipSampler(range(4), 2, 2)


def test_divergence_in_a_spawned_process_is_recognised():
    msg = "WGAN training stopped at optimiser step 4 (generator iteration 1): non-finite gp"
    err = ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\nTraceback ...\n"
                                 f"vstain.training.wgan.TrainingDiverged: {msg}\n", 1, 4242)
    assert error_message(err, wgan.TrainingDiverged) == msg
    assert error_message(wgan.TrainingDiverged(msg), wgan.TrainingDiverged) == msg
    assert error_message(ProcessRaisedException("ValueError: other", 0, 1), wgan.TrainingDiverged) is None
    assert error_message(ValueError(msg), wgan.TrainingDiverged) is None


# --------------------------------------------------------------------------------------------
# The U-Net under DDP (forked processes): 2 steps, then resumed to 4
# --------------------------------------------------------------------------------------------
def test_unet_ddp_identical_weights_own_crops_and_resume(stage, tmp_path):
    cfg = dict(base_width=4, optimizer="adam", lr=2e-3, batch_size=1, crop=(8, 16, 16), samples=5, val_samples=2,
               val_every=3, ckpt_every=2, devices=WORLD, strategy="ddp_fork", num_threads=1)
    out = tmp_path / "unet"
    m2, t2 = fit_unet(UNetConfig(**cfg, max_steps=2), stage, out, progress=False, callbacks=[RankRecord(out, "a")])
    m4, t4 = fit_unet(UNetConfig(**cfg, max_steps=4), stage, out, progress=False, callbacks=[RankRecord(out, "b")])
    a, b = read_ranks(out, "a"), read_ranks(out, "b")
    # every process ends with the same weights, which the calling process and last.ckpt hold
    for runs, module in ((a, m2), (b, m4)):
        assert runs[0]["weights"] == runs[1]["weights"] == weights_hash(module)
    ckpt = torch.load(out / CHECKPOINTS / LAST, weights_only=False)
    assert ckpt["global_step"] == 4 and (t2.start_step, t2.end_step, t4.start_step, t4.end_step) == (0, 2, 2, 4)
    # each process trained on its own crops: indices rank, rank + 2, ... of every epoch (3 per
    # process for 5 samples), and the resumed run went on with the next ones
    for r in range(WORLD):
        assert a[r]["crops"] == expected_crops(stage, (8, 16, 16), 5, 0, r, [0, 1])
        assert b[r]["crops"] == expected_crops(stage, (8, 16, 16), 5, 0, r, [2, 3])
    assert a[0]["crops"] != a[1]["crops"]
    # one log row per step across both runs (process 0's logger), the losses finite
    losses = read_metrics(out)
    assert losses["step"].tolist() == [0, 1, 2, 3]
    assert np.isfinite(losses["train_l1"]).all() and losses["val_l1"].notna().sum() == 1
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("rank"))
    assert written == ["checkpoints", "logs", "model.json"]  # process 0's files only


# --------------------------------------------------------------------------------------------
# The WGAN-GP under DDP (forked processes): manual optimisation, 2 iterations then 3
# --------------------------------------------------------------------------------------------
def test_wgan_ddp_identical_weights_own_crops_and_resume(stage, tmp_path):
    cfg = dict(base_width=2, critic_width=2, batch_size=1, crop=(8, 16, 16), samples=5, val_samples=2, val_every=2,
               ckpt_every=1, n_critic=2, optimizer="adam", lr_generator=1e-3, lr_critic=1e-3, seed=3,
               devices=WORLD, strategy="ddp_fork", num_threads=1)
    out = tmp_path / "wgan"
    m2, t2, s2 = wgan.fit_wgan(WGANConfig(**cfg, iterations=2), stage, out, progress=False,
                               callbacks=[RankRecord(out, "a")])
    m3, t3, s3 = wgan.fit_wgan(WGANConfig(**cfg, iterations=3), stage, out, progress=False,
                               callbacks=[RankRecord(out, "b")])
    assert s2 == s3 == ""
    a, b = read_ranks(out, "a"), read_ranks(out, "b")
    for runs, module in ((a, m2), (b, m3)):
        assert runs[0]["weights"] == runs[1]["weights"] == weights_hash(module)  # generator and critic
    assert (t2.start_step, t2.end_step, t3.start_step, t3.end_step) == (0, 6, 6, 9)
    # an iteration is n_critic = 2 batches and 3 optimiser steps (two critic, one generator)
    step = lambda b: b // 2 * 3 + b % 2  # noqa: E731
    for r in range(WORLD):
        assert a[r]["crops"] == expected_crops(stage, (8, 16, 16), 5, 3, r, [0, 1, 2, 3], step)
        assert b[r]["crops"] == expected_crops(stage, (8, 16, 16), 5, 3, r, [4, 5], step)
    # the history, restored from process 0's checkpoint, continues across the resume
    hist = wgan.history_frame(m3.history)
    train = hist[hist["kind"] != "val"]
    assert list(train["kind"]) == ["critic", "critic", "generator"] * 3 and list(train["step"]) == list(range(9))
    assert hist["val_l1"].notna().sum() == 1
    num = train[["critic_loss", "wasserstein", "gp", "l1", "adv", "grad_norm_critic", "grad_norm_generator"]]
    assert all(math.isfinite(v) for v in num.to_numpy().ravel() if v == v) and num.notna().sum().min() == 3


# --------------------------------------------------------------------------------------------
# Spawned processes (what works from a notebook once CUDA is initialised): each re-imports torch
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_unet_ddp_spawn_returns_the_trained_state(stage, tmp_path):
    cfg = UNetConfig(base_width=4, optimizer="adam", lr=2e-3, batch_size=1, crop=(8, 16, 16), samples=5,
                     val_samples=2, max_steps=2, val_every=2, ckpt_every=5, devices=WORLD, strategy="ddp_spawn",
                     num_threads=1)
    module, trainer = fit_unet(cfg, stage, tmp_path, progress=False, callbacks=[RankRecord(tmp_path, "s")])
    ranks = read_ranks(tmp_path, "s")
    assert ranks[0]["weights"] == ranks[1]["weights"] == weights_hash(module)
    assert trainer.end_step == 2 and torch.load(tmp_path / CHECKPOINTS / LAST, weights_only=False)["global_step"] == 2
    assert [c for c, _ in ranks[0]["crops"]] == [0, 1] and ranks[0]["crops"] != ranks[1]["crops"]
    assert read_metrics(tmp_path)["step"].tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# The final checkpoint (one process): extending a finished run equals training that far at once
# --------------------------------------------------------------------------------------------
def test_extending_a_finished_run_equals_an_uninterrupted_one(stage, tmp_path):
    """The final last.ckpt is written at the last batch's end: an extended run continues in the
    same epoch with the next crops (written after fit, it restarted one epoch and one log step on)."""
    cfg = dict(base_width=2, critic_width=2, batch_size=1, crop=(8, 16, 16), samples=5, val_samples=2, val_every=1,
               ckpt_every=5, n_critic=2, optimizer="adam", lr_generator=1e-3, lr_critic=1e-3, num_threads=1)
    once = wgan.fit_wgan(WGANConfig(**cfg, iterations=3), stage, tmp_path / "once", progress=False)[0]
    wgan.fit_wgan(WGANConfig(**cfg, iterations=2), stage, tmp_path / "twice", progress=False)
    twice = wgan.fit_wgan(WGANConfig(**cfg, iterations=3), stage, tmp_path / "twice", progress=False)[0]
    pd.testing.assert_frame_equal(wgan.history_frame(twice.history), wgan.history_frame(once.history))
    assert weights_hash(twice) == weights_hash(once)

"""The Lightning machinery both training stages share: random crops of the processed set that a
resumed run draws again in the same order (:class:`CropDataModule`), a seeded trainer that writes
``last.ckpt`` every N steps and resumes from it (:func:`make_trainer`), and the optimisers.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Sampler

from . import dataset
from .configs import OPTIMIZERS
from .modelfiles import CHECKPOINTS, LAST, LOGS


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
class CropDataModule(L.LightningDataModule):
    """Random training crops with flips and fixed validation crops from the processed set.

    Args:
        stage_in: the ``03_denoising`` stage folder (``manifest.csv``).
        crop: crop size ``(Z, Y, X)``.
        batch_size: crops per batch.
        samples: training crops per epoch; crop ``i`` of epoch ``e`` comes from ``(seed, e, i)``,
            so a resumed run draws the same crops (the trainer's :class:`EpochCrops` callback sets
            the epoch).
        seed: base seed.
        val_samples: validation crops (fixed: epoch 0, no flips, seed ``seed + 1``).
        num_workers: DataLoader workers.
    """

    def __init__(self, stage_in, crop, batch_size, samples, seed=0, val_samples=8, num_workers=0):
        super().__init__()
        self.stage_in, self.crop, self.batch_size = Path(stage_in), tuple(crop), int(batch_size)
        self.samples, self.seed, self.val_samples, self.num_workers = int(samples), int(seed), int(val_samples), int(num_workers)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = dataset.ProcessedCrops(self.stage_in, "train", self.crop, self.samples, flips=True, seed=self.seed)
            self.val_set = dataset.ProcessedCrops(self.stage_in, "val", self.crop, self.val_samples, flips=False, seed=self.seed + 1)

    def set_epoch(self, epoch: int) -> None:
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def train_dataloader(self):
        # No shuffling: each index is already a seeded random crop; the sampler and loader record
        # the position in the epoch, so a run resumed mid-epoch continues with the next crop.
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=SkipSampler(self.train_set),
                               num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())


class SkipSampler(Sampler):
    """Indices ``0 .. len(dataset)-1`` in order; after a resume the next pass starts at ``start``
    (once). Lightning calls ``set_epoch`` at every epoch start, also on a mid-epoch resume, and
    the sampler passes it to the dataset so crops depend on ``(seed, epoch, i)``."""

    def __init__(self, dataset):
        self.dataset, self.n, self.start = dataset, len(dataset), 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(range(start, self.n))


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch (batches yielded) is saved in Lightning
    checkpoints (``state_dict``/``load_state_dict``), so a mid-epoch resume skips the crops the
    interrupted run already used instead of repeating them."""

    _yielded = 0

    def __iter__(self):
        skip = self.sampler.start if isinstance(self.sampler, SkipSampler) else 0
        self._yielded = -(-skip // self.batch_size)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": int(self._yielded)}

    def load_state_dict(self, state: dict) -> None:
        done = int(state.get("batches", 0))
        if isinstance(self.sampler, SkipSampler) and done < len(self):  # a finished epoch restarts at 0
            self.sampler.start = done * self.batch_size


class EpochCrops(Callback):
    """Tells the datamodule which epoch starts, so crops depend on ``(seed, epoch, i)``, and
    records the step training (re)started from as ``trainer.start_step``."""

    def on_train_start(self, trainer, pl_module):
        trainer.start_step = int(trainer.global_step)

    def on_train_epoch_start(self, trainer, pl_module):
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(trainer.current_epoch)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class ResumingTrainer(L.Trainer):
    """A Lightning ``Trainer`` whose ``fit`` resumes from ``<out_dir>/checkpoints/last.ckpt`` when
    it exists (unless ``ckpt_path`` is given) and always leaves ``last.ckpt`` at the final step.
    After ``fit``, ``start_step`` is the step training started from (0, or the resumed one)."""

    start_step = 0

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = Path(out_dir)

    @property
    def last_ckpt(self) -> Path:
        return self.out_dir / CHECKPOINTS / LAST

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, **kw):
        if ckpt_path is None and self.last_ckpt.exists():
            ckpt_path = str(self.last_ckpt)
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=ckpt_path, **kw)
        if not self.interrupted:
            save_last(self, self.last_ckpt)


def save_last(trainer: L.Trainer, path: Path) -> None:
    """Write a full checkpoint (weights, optimisers, loops, data position) atomically: to a
    temporary file first, then renamed, so an interruption never leaves a broken ``last.ckpt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckpt.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("save_last")


class LastCheckpoint(Callback):
    """Saves ``last.ckpt`` each time ``global_step`` passes a multiple of ``every`` steps. Unlike
    ``ModelCheckpoint(every_n_train_steps=...)`` this also works under manual optimisation, where
    one batch advances ``global_step`` by several optimiser steps (a WGAN iteration)."""

    def __init__(self, path, every: int):
        self.path, self.every, self._saved = Path(path), int(every), 0

    def on_train_start(self, trainer, pl_module):
        self._saved = trainer.global_step // self.every

    def on_train_batch_end(self, trainer, *args):
        k = trainer.global_step // self.every
        if k > self._saved:
            self._saved = k
            save_last(trainer, self.path)


class TrainingBar(TQDMProgressBar):
    """Lightning's TQDM bar for training only (about 20 refreshes per run, no validation bar),
    which keeps a notebook's output short."""

    def init_validation_tqdm(self):
        return Tqdm(disable=True)


def make_trainer(
    out_dir,
    max_steps: int,
    device: str = "cpu",
    precision: str = "32-true",
    devices: int | str = 1,
    strategy: str = "auto",
    ckpt_every: int = 100,
    val_every: int | None = None,
    seed: int | None = 0,
    log_every: int = 1,
    progress: bool = True,
    callbacks: list | None = None,
) -> ResumingTrainer:
    """A seeded Lightning trainer that writes into the stage folder ``out_dir``.

    Args:
        out_dir: the stage folder; checkpoints go to ``out_dir/checkpoints`` (``last.ckpt`` every
            ``ckpt_every`` steps and at the end), the CSV log to ``out_dir/logs/version_*/``.
        max_steps: optimiser steps (for manual optimisation: ``global_step`` counts every
            optimiser step, so a WGAN with ``n_critic`` critic steps counts ``n_critic + 1`` per
            generator iteration).
        device, precision, devices, strategy: passed to Lightning as ``accelerator``,
            ``precision``, ``devices``, ``strategy``.
        ckpt_every: steps between checkpoints (``global_step`` passing a multiple of it).
        val_every: training batches between validation runs (None: no validation); under
            automatic optimisation a batch is a step.
        seed: ``lightning.seed_everything(seed)`` before anything else (None: do not seed).
        log_every: steps between logged training rows.
        progress: show a TQDM progress bar.
        callbacks: extra callbacks.

    ``trainer.fit(module, datamodule=dm)`` resumes from ``last.ckpt`` automatically when present.
    """
    if seed is not None:
        L.seed_everything(int(seed), workers=True, verbose=False)
    quiet_lightning()
    out_dir = Path(out_dir)
    cbs = [EpochCrops(), *(callbacks or [])]
    if progress:
        cbs.append(TrainingBar(refresh_rate=max(1, int(max_steps) // 20)))
    cbs.append(LastCheckpoint(out_dir / CHECKPOINTS / LAST, ckpt_every))  # last: sees the other callbacks' state
    accelerator = "gpu" if device == "cuda" else device
    val_kw = (dict(val_check_interval=int(val_every), check_val_every_n_epoch=None) if val_every
              else dict(limit_val_batches=0))
    return ResumingTrainer(
        out_dir,
        default_root_dir=str(out_dir),
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_steps=int(max_steps),
        max_epochs=-1,
        logger=CSVLogger(save_dir=str(out_dir), name=LOGS),
        callbacks=cbs,
        log_every_n_steps=int(log_every),
        num_sanity_val_steps=0,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,  # LastCheckpoint writes last.ckpt
        deterministic=False,
        **val_kw,
    )


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator lines, tips) and a deprecation notice raised
    inside Lightning itself out of notebook outputs; warnings about our own usage still show."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def set_threads(cfg) -> None:
    """On CPU, use ``cfg.num_threads`` intra-op threads (0 keeps torch's default: physical cores)."""
    if cfg.device == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(int(cfg.num_threads))


def make_optimizer(params, name: str, lr: float, betas=(0.5, 0.9)):
    """RMSprop (thesis 3.2.2, constant learning rate) or Adam with ``betas``.

    Both update all parameters in a few multi-tensor kernels (``foreach``; Adam ``fused``) instead
    of a loop over the 40-odd parameter tensors: at CPU widths the per-tensor loop cost about a
    tenth of a training step in a profile.
    """
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

"""The Lightning machinery both training stages share: random crops of the processed set that a
resumed run draws again in the same order (:class:`CropDataModule`), a seeded trainer that writes
``last.ckpt`` every N steps and resumes from it (:func:`make_trainer`), and the optimisers.

Several devices (Lightning DDP, ``strategy="ddp"`` on GPUs, ``"ddp_spawn"``/``"ddp_fork"`` from a
notebook or on CPUs with the gloo backend): every process trains on its own crops (the crop sampler
splits each epoch's crop indices between the processes), Lightning averages the gradients, and
process 0 alone writes ``last.ckpt`` and the logs. With spawned or forked processes the calling
process gets the trained weights and the final checkpoint's state back (:class:`ResumingTrainer`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from torch import nn
from torch.multiprocessing import ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from vstain.modelfiles import CHECKPOINTS, LAST, LOGS
from vstain.preprocess import processed

from .configs import OPTIMIZERS
from .precision import warn_if_emulated_bf16


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
            the epoch). With ``W`` processes, process ``r`` takes crops ``r, r + W, ...`` (see
            :class:`SkipSampler`): a step of ``W`` processes uses the crops of one step of a single
            process with ``W * batch_size``.
        seed: base seed.
        val_samples: validation crops (fixed: epoch 0, no flips, seed ``seed + 1``).
        num_workers: DataLoader workers.
        sampling: how training crops pick their FOV (``"uniform"`` or ``"balanced"``; validation
            crops are always uniform).
        channels: target channels returned (default: all six); see :class:`vstain.preprocess.processed.ProcessedCrops`.
    """

    def __init__(self, stage_in, crop, batch_size, samples, seed=0, val_samples=8, num_workers=0,
                 sampling: str = "uniform", channels: tuple[str, ...] = ()):
        super().__init__()
        self.stage_in, self.crop, self.batch_size = Path(stage_in), tuple(crop), int(batch_size)
        self.samples, self.seed, self.val_samples, self.num_workers = int(samples), int(seed), int(val_samples), int(num_workers)
        self.sampling, self.channels = sampling, tuple(channels)
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = processed.ProcessedCrops(self.stage_in, "train", self.crop, self.samples, flips=True,
                                                    seed=self.seed, sampling=self.sampling, channels=self.channels)
            self.val_set = processed.ProcessedCrops(self.stage_in, "val", self.crop, self.val_samples, flips=False,
                                                  seed=self.seed + 1, channels=self.channels)

    def set_epoch(self, epoch: int) -> None:
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def train_dataloader(self):
        # No shuffling: each index is already a seeded random crop; the sampler and loader record
        # the position in the epoch, so a run resumed mid-epoch continues with the next crop. The
        # trainer does not wrap the sampler in a DistributedSampler (use_distributed_sampler=False):
        # SkipSampler splits the crops between the processes itself.
        rank, replicas = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return ResumableLoader(self.train_set, batch_size=self.batch_size,
                               sampler=SkipSampler(self.train_set, rank, replicas),
                               num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self):
        # Every process validates on all the fixed crops (same weights: the same number everywhere).
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())


class SkipSampler(Sampler):
    """This process's share of the indices ``0 .. len(dataset)-1``, in order; after a resume the
    next pass starts at position ``start`` (once). Lightning calls ``set_epoch`` at every epoch
    start, also on a mid-epoch resume, and the sampler passes it to the dataset so crops depend on
    ``(seed, epoch, i)``.

    Args:
        dataset: the crops (with ``set_epoch``).
        rank, replicas: this process and the number of processes. Process ``rank`` takes indices
            ``rank, rank + replicas, ...``, ``ceil(len / replicas)`` of them (wrapping round to the
            first indices, as torch's ``DistributedSampler`` pads), so every process has the same
            number of batches per epoch and the processes see different crops.
    """

    def __init__(self, dataset, rank: int = 0, replicas: int = 1):
        if not 0 <= int(rank) < int(replicas):
            raise ValueError(f"rank must be in 0..replicas-1, got rank {rank} of {replicas}")
        self.dataset, self.rank, self.replicas, self.start = dataset, int(rank), int(replicas), 0
        self.n = -(-len(dataset) // self.replicas)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self.start = self.start, 0
        total = len(self.dataset)
        return iter((self.rank + k * self.replicas) % total for k in range(start, self.n))


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
    """Tells the datamodule which epoch starts, so crops depend on ``(seed, epoch, i)``."""

    def on_train_epoch_start(self, trainer, pl_module):
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(trainer.current_epoch)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class ResumingTrainer(L.Trainer):
    """A Lightning ``Trainer`` whose ``fit`` resumes from ``<out_dir>/checkpoints/last.ckpt`` when
    it exists (unless ``ckpt_path`` is given); :class:`LastCheckpoint` leaves ``last.ckpt`` at the
    final step. After ``fit``, ``start_step`` is the step training started from (0, or the resumed
    one) and ``end_step`` the step it reached.

    When the processes were spawned or forked (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``), the
    training ran in child processes: Lightning copies process 0's weights back into the module, and
    ``fit`` restores the rest of its state from the final ``last.ckpt`` (``on_load_checkpoint``:
    the WGAN's loss history).
    """

    start_step = end_step = 0

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = Path(out_dir)

    @property
    def last_ckpt(self) -> Path:
        return self.out_dir / CHECKPOINTS / LAST

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None, **kw):
        if ckpt_path is None and self.last_ckpt.exists():
            ckpt_path = str(self.last_ckpt)
        self.start_step = checkpoint_step(ckpt_path) if ckpt_path else 0
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=ckpt_path, **kw)
        self.end_step = int(self.global_step)
        if isinstance(self.strategy.launcher, _MultiProcessingLauncher) and self.last_ckpt.exists():
            ckpt = torch.load(self.last_ckpt, map_location="cpu", weights_only=False)
            model.load_state_dict(ckpt["state_dict"])
            model.on_load_checkpoint(ckpt)
            self.end_step = int(ckpt["global_step"])


def checkpoint_step(path) -> int:
    """The ``global_step`` stored in a Lightning checkpoint (memory-mapped: the weights are not read)."""
    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


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
    """Saves ``last.ckpt`` each time ``global_step`` passes a multiple of ``every`` steps and at
    the batch that reaches ``max_steps`` (not after an exception: the last good state stays).
    Unlike ``ModelCheckpoint(every_n_train_steps=...)`` this also works under manual optimisation,
    where one batch advances ``global_step`` by several optimiser steps (a WGAN iteration).

    The final checkpoint is written at the end of the last batch, as the periodic ones are: a
    checkpoint written after ``fit`` returns holds Lightning's loop state after the epoch was
    closed, and a run extended from it (a larger ``max_steps``) would start the next epoch's crops
    and log its steps one too high. It is written here, in the training processes, so it also
    exists when they were spawned; ``on_train_end`` covers a run that stopped before ``max_steps``.
    """

    def __init__(self, path, every: int):
        self.path, self.every, self._saved, self._saved_step = Path(path), int(every), 0, -1

    def on_train_start(self, trainer, pl_module):
        self._saved = trainer.global_step // self.every

    def on_train_batch_end(self, trainer, *args):
        k = trainer.global_step // self.every
        if k > self._saved or trainer.global_step >= trainer.max_steps:
            self._saved = k
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer) -> None:
        save_last(trainer, self.path)
        self._saved_step = trainer.global_step


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
            ``precision``, ``devices``, ``strategy`` (several processes: ``"ddp"`` from a script,
            ``"ddp_spawn"`` or ``"ddp_fork"``/``"ddp_notebook"`` from a notebook or pytest; on
            CPUs they use the gloo backend).
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
    warn_if_emulated_bf16(device, precision)
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
        use_distributed_sampler=False,  # SkipSampler splits the crops between processes
        deterministic=False,
        **val_kw,
    )


# --------------------------------------------------------------------------------------------
# Several processes under manual optimisation
# --------------------------------------------------------------------------------------------
def backward_and_average(module: L.LightningModule, loss: torch.Tensor, network: torch.nn.Module) -> None:
    """``module.manual_backward(loss)``, then the gradients of ``network`` averaged over the
    processes in one all-reduce. DDP's own reduction is switched off (``no_sync``): it expects
    every parameter of the module to get a gradient, but a WGAN critic step reaches only the critic
    and a generator step only the generator (``find_unused_parameters`` would also work, at the cost
    of a graph search and an all-reduce of the other network's zero gradients every step)."""
    ddp = module.trainer.model
    with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext():
        module.manual_backward(loss)
    if module.trainer.world_size > 1:
        grads = [p.grad for p in network.parameters() if p.grad is not None]
        flat = module.trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def mean_over_processes(module: L.LightningModule, values: dict) -> dict:
    """``values`` (floats) averaged over the processes of ``module``'s trainer; unchanged in a
    single process or without a trainer."""
    if module._trainer is None or module.trainer.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=module.device)
    return dict(zip(values, module.trainer.strategy.reduce(t, reduce_op="mean").tolist()))


# --------------------------------------------------------------------------------------------
# Gradients and random draws of one network among several
# --------------------------------------------------------------------------------------------
def grad_norm(module: nn.Module) -> float:
    """L2 norm of all parameter gradients of ``module`` (0 when none)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Run the block with the global RNG of ``device`` seeded by ``seed``, restoring it afterwards,
    so draws inside (the gradient penalty's ``ε``) depend on ``seed`` only."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], enabled=True):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` do not require grad inside the block (no weight gradients are
    computed or stored for them), as for the critic during a generator step."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def error_message(error: BaseException, kind: type[BaseException]) -> str | None:
    """The message of ``error`` if it is a ``kind``, raised here or in a spawned or forked training
    process (which reaches the caller as torch's ``ProcessRaisedException`` holding its
    traceback); None for any other error."""
    if isinstance(error, kind):
        return str(error)
    found = (re.search(rf"\b{kind.__name__}: (.+)", str(error)) if isinstance(error, ProcessRaisedException)
             else None)
    return found.group(1).strip() if found else None


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

"""Training the U-Net baseline with the masked L1 loss (thesis 3.2), and the Lightning plumbing the
WGAN-GP stage reuses.

Shared pieces (imported by :mod:`vstain.wgan`): :class:`CropDataModule` (random crops of the
processed set, deterministic per ``(seed, epoch, i)``), :func:`make_trainer` (checkpoints into
``out_dir/checkpoints`` with ``last.ckpt``, CSV log, progress bar, automatic resume),
:func:`write_losses`, :func:`write_predictions`, :func:`save_model_json`, :func:`prepare_out_dir`,
:func:`load_generator`. The baseline itself: :class:`UNetConfig`, :class:`UNetModule`,
:func:`fit_unet` and the notebook's one call :func:`run_unet_stage`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Sampler

from . import dataset
from .data import TARGETS
from .infer import default_max_voxels, plan, predict_volume
from .losses import masked_l1
from .models import Generator, GeneratorConfig, num_params
from .rundir import sha256

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
LOGS = "logs"
LOSSES_CSV = "losses.csv"
MODEL_JSON = "model.json"
OPTIMIZERS = ("rmsprop", "adam")
DEVICES = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
class DictConfig:
    """Round trip of a config dataclass through JSON/YAML (the checkpoint's ``hyper_parameters``,
    ``model.json``)."""

    def to_dict(self) -> dict:
        """JSON/YAML-friendly (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)

    def check_run_fields(self, positive_ints) -> None:
        """The checks every training config shares: counts are positive integers, and the
        Lightning ``device`` and ``precision`` are ones this study supports."""
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class UNetConfig(DictConfig):
    """Everything that defines a U-Net baseline run; saved in every checkpoint and ``model.json``.

    Args:
        base_width: generator width (thesis 64; CPU profiles 8-16).
        negative_slope: LeakyReLU slope (thesis 0.05).
        optimizer: ``"rmsprop"`` (thesis) or ``"adam"`` (betas below; learns far faster on a
            CPU budget, see the pilot).
        lr: learning rate (thesis 5e-5 with RMSprop; 2e-4 with Adam on CPU).
        betas: Adam's betas (ignored by RMSprop).
        batch_size: crops per step (thesis 16).
        crop: crop size ``(Z, Y, X)``, each >= 8 and fitting every FOV.
        samples: training crops per epoch (crops are drawn from ``(seed, epoch, i)``).
        val_samples: fixed validation crops evaluated every ``val_every`` steps.
        max_steps: optimiser steps in total (a resumed run continues up to this number).
        val_every: steps between validations.
        ckpt_every: steps between checkpoints (``last.ckpt`` is also written at the end).
        seed: seeds weights, crops and flips.
        device: Lightning accelerator: ``"cpu"``, ``"gpu"`` (or ``"cuda"``), ``"auto"``.
        precision: Lightning precision: ``"32-true"`` on CPU, ``"bf16-mixed"`` on a GPU.
        devices: number of devices (several GPUs: e.g. 4 with ``strategy="ddp"``).
        strategy: Lightning strategy (``"auto"``, ``"ddp"``, ...).
        num_threads: CPU threads for torch (0: leave torch's default, the physical cores).
        channels_last: store activations as ``channels_last_3d`` (may speed up CPU convolutions).
        torch_compile: ``torch.compile`` the generator (fuses instance norm and LeakyReLU; costs a
            minute or so of compilation at the start).
        num_workers: DataLoader worker processes (0: load in the training process).
    """

    base_width: int = 64  # thesis 3.1.1
    negative_slope: float = 0.05  # thesis 3.2.2
    optimizer: str = "rmsprop"  # thesis 3.2.2; "adam" for CPU budgets (PILOT.md)
    lr: float = 5e-5  # thesis 3.2.2 (constant)
    betas: tuple[float, float] = (0.5, 0.9)  # Adam only (WGAN-GP practice, Gulrajani et al. 2017)
    batch_size: int = 16  # thesis 3.2.2: 16 z-stacks
    crop: tuple[int, int, int] = (32, 384, 384)  # thesis-scale crops (Z, Y, X)
    samples: int = 1024  # training crops per epoch
    val_samples: int = 16  # fixed validation crops
    max_steps: int = 20000
    val_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    device: str = "cpu"
    precision: str = "32-true"
    devices: int = 1
    strategy: str = "auto"
    num_threads: int = 0
    channels_last: bool = False
    torch_compile: bool = False
    num_workers: int = 0

    def __post_init__(self):
        self.crop = tuple(int(c) for c in self.crop)
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.crop) != 3 or min(self.crop) < 8:
            raise ValueError(f"crop must be 3 sizes (Z, Y, X), each >= 8, got {self.crop}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.check_run_fields(("base_width", "batch_size", "samples", "val_samples", "max_steps", "val_every",
                               "ckpt_every", "devices"))

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(base_width=self.base_width, negative_slope=self.negative_slope)



# Keys that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = ("max_steps", "val_every", "ckpt_every", "device", "precision", "devices", "strategy",
                  "num_threads", "num_workers", "channels_last", "torch_compile")


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


def set_threads(cfg: UNetConfig) -> None:
    """On CPU, use ``cfg.num_threads`` intra-op threads (0 keeps torch's default: physical cores)."""
    if cfg.device == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(int(cfg.num_threads))


# --------------------------------------------------------------------------------------------
# The U-Net baseline
# --------------------------------------------------------------------------------------------
class UNetModule(L.LightningModule):
    """The generator trained with the masked L1 loss alone (the thesis' U-Net baseline).

    Args:
        config: a :class:`UNetConfig` or its dict (as stored in checkpoints).

    Logs ``train_l1`` every step and ``val_l1`` (mean over the validation crops) at each validation.
    """

    def __init__(self, config: UNetConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config or {})
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.generator = Generator(cfg.generator_config())
        if cfg.channels_last:
            self.generator.to(memory_format=torch.channels_last_3d)
        if cfg.torch_compile:
            self.generator.compile()  # in place: the state dict keeps its keys

    def forward(self, x):
        return self.generator(x)

    def _prep(self, x):
        return x.contiguous(memory_format=torch.channels_last_3d) if self.cfg.channels_last else x

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = masked_l1(self.generator(self._prep(x)), y)
        self.log("train_l1", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = masked_l1(self.generator(self._prep(x)), y)
        self.log("val_l1", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])

    def configure_optimizers(self):
        return make_optimizer(self.generator.parameters(), self.cfg.optimizer, self.cfg.lr, self.cfg.betas)


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


# --------------------------------------------------------------------------------------------
# Stage folder: config, losses, predictions
# --------------------------------------------------------------------------------------------
def prepare_out_dir(out_dir, config: dict, resumable_keys=RESUMABLE_KEYS) -> bool:
    """Decide whether ``out_dir`` holds a run to resume. If its ``model.json`` records a config
    that differs from ``config`` in anything but ``resumable_keys``, the old checkpoints and logs
    are removed (with a warning) and training starts afresh. Returns True when a ``last.ckpt``
    will be resumed."""
    out_dir = Path(out_dir)
    mj = out_dir / MODEL_JSON
    last = out_dir / CHECKPOINTS / LAST
    if mj.exists():
        old = json.loads(mj.read_text()).get("config", {})
        diff = sorted(k for k in set(old) | set(config) if k not in resumable_keys and old.get(k) != config.get(k))
        if diff:
            warnings.warn(f"{out_dir}: configuration changed in {diff}; discarding the old checkpoints and logs")
            for sub in (CHECKPOINTS, LOGS):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
            for f in (LOSSES_CSV, MODEL_JSON):
                (out_dir / f).unlink(missing_ok=True)
    return last.exists()


def run_config(config: dict, stage_in, *files) -> dict:
    """``config`` plus the SHA-256 of the processed set (its stage manifest, else its
    ``manifest.csv``) and of any other input ``files`` (e.g. an initial checkpoint), so a run is
    only resumed on the same data: new data or a new split starts training afresh."""
    stage_in = Path(stage_in)
    ref = stage_in / "manifest.json"
    ref = ref if ref.exists() else stage_in / "manifest.csv"
    inputs = {"processed_set": sha256(ref) if ref.exists() else None}
    for f in files:
        if f and Path(f).is_file():
            inputs[str(f)] = sha256(f)
    return {**config, "inputs_sha256": inputs}


def save_model_json(out_dir, config: dict, **extra) -> Path:
    """Write ``out_dir/model.json``: ``{"config": ..., **extra}``."""
    p = Path(out_dir) / MODEL_JSON
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"config": config, **extra}, indent=2, default=str))
    return p


def read_metrics(out_dir) -> pd.DataFrame:
    """All CSV-logger rows of ``out_dir/logs/version_*/metrics.csv``; where a resumed run repeats a
    step, its later version wins. One row per step, sorted."""
    frames = []
    for i, f in enumerate(sorted((Path(out_dir) / LOGS).glob("version_*/metrics.csv"),
                                 key=lambda p: int(p.parent.name.split("_")[1]))):
        df = pd.read_csv(f)
        df["_version"] = i
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["step", "epoch"])
    df = pd.concat(frames, ignore_index=True)
    cols = [c for c in df.columns if c not in ("step", "_version")]
    # per (version, step): first non-null of each column; then the latest version per step
    per = df.groupby(["_version", "step"], as_index=False)[cols].first()
    per = per.sort_values(["step", "_version"])
    out = per.groupby("step", as_index=False)[cols].last()
    return out.sort_values("step").reset_index(drop=True)


def write_losses(out_dir, columns=None) -> pd.DataFrame:
    """Write ``out_dir/losses.csv`` (``step, epoch`` and the logged losses, one row per step) from
    the CSV log, and return it. ``columns`` restricts and orders the loss columns."""
    df = read_metrics(out_dir)
    if columns is not None:
        df = df.reindex(columns=["step", "epoch", *columns])
    else:
        rest = sorted(c for c in df.columns if c not in ("step", "epoch"))
        df = df[["step", "epoch", *rest]]
    df.to_csv(Path(out_dir) / LOSSES_CSV, index=False)
    return df


def write_predictions(generator, stage_in, out_dir, splits=("val", "test"), max_voxels=None,
                      roi_size=None, overlap=0.25) -> pd.DataFrame:
    """Predict every FOV of ``splits`` of the processed set with :func:`vstain.infer.predict_volume`
    and write ``out_dir/predictions/<fov_id>.tif`` (float32 ``[6, Z, Y, X]``).

    Returns a table ``fov_id, split, structure, path`` (relative to ``out_dir``), ``mode``
    (``whole``/``tiled``) and ``seconds``.
    """
    out_dir = Path(out_dir)
    df = dataset.read_manifest(stage_in)
    df = df[df["split"].isin(splits)]
    if max_voxels is None:
        max_voxels = default_max_voxels(generator)
    rows = []
    for _, r in df.iterrows():
        x, _, _ = dataset.load_fov(r)
        t = time.perf_counter()
        pred = predict_volume(generator, x, max_voxels=max_voxels, roi_size=roi_size, overlap=overlap)
        rel = f"predictions/{r['fov_id']}.tif"
        dataset.write_volume(out_dir / rel, pred, list(TARGETS))
        rows.append({"fov_id": r["fov_id"], "split": r["split"], "structure": r["structure"], "path": rel,
                     "mode": plan(x.shape[1:], max_voxels), "seconds": round(time.perf_counter() - t, 3)})
    return pd.DataFrame(rows)


def load_generator(stage_path, map_location="cpu") -> Generator:
    """The generator of a finished model stage (``04_unet`` or ``05_wgan``): its config from
    ``model.json`` (``generator`` entry) and weights from ``checkpoints/last.ckpt`` (the
    ``generator.*`` entries of the Lightning state dict). Returned in eval mode."""
    stage_path = Path(stage_path)
    meta = json.loads((stage_path / MODEL_JSON).read_text())
    gen = Generator(GeneratorConfig(**meta["generator"]))
    ckpt = torch.load(stage_path / CHECKPOINTS / LAST, map_location=map_location, weights_only=True)
    state = {k.removeprefix("generator."): v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    gen.load_state_dict(state)
    return gen.eval()


# --------------------------------------------------------------------------------------------
# One call per stage
# --------------------------------------------------------------------------------------------
def fit_unet(cfg: UNetConfig, stage_in, out_dir, progress: bool = True) -> tuple[UNetModule, ResumingTrainer]:
    """Train (or resume) the U-Net baseline on the processed set in ``stage_in``, writing
    checkpoints and logs into ``out_dir``. Returns the module and its trainer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_out_dir(out_dir, run_config(cfg.to_dict(), stage_in))
    save_model_json(out_dir, run_config(cfg.to_dict(), stage_in), model="unet", generator=asdict(cfg.generator_config()))
    set_threads(cfg)
    trainer = make_trainer(out_dir, cfg.max_steps, cfg.device, cfg.precision, cfg.devices, cfg.strategy,
                           ckpt_every=cfg.ckpt_every, val_every=cfg.val_every, seed=cfg.seed, progress=progress)
    module = UNetModule(cfg)  # built after seeding: the initial weights depend on cfg.seed only
    dm = CropDataModule(stage_in, cfg.crop, cfg.batch_size, cfg.samples, cfg.seed, cfg.val_samples, cfg.num_workers)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@dataclass
class StageResult:
    """What :func:`run_unet_stage` returns to the notebook."""

    losses: pd.DataFrame  # step, epoch, train_l1, val_l1
    predictions: pd.DataFrame  # fov_id, split, structure, path, mode, seconds
    generator: Generator  # trained, eval mode, on the CPU
    config: UNetConfig
    global_step: int  # steps done in total (a resumed run includes the earlier ones)
    start_step: int  # where this call started (0, or the step resumed from)
    train_seconds: float  # wall time of this call's training


def run_unet_stage(stage_in, out_dir, cfg: UNetConfig, splits=("val", "test"), max_voxels=None,
                   progress: bool = True) -> StageResult:
    """The ``04_unet`` stage in one call: train (resuming if interrupted), write ``losses.csv``,
    the whole-volume predictions of ``splits`` and ``model.json``."""
    t = time.perf_counter()
    module, trainer = fit_unet(cfg, stage_in, out_dir, progress=progress)
    train_s = time.perf_counter() - t
    start = int(getattr(trainer, "start_step", 0))
    losses = write_losses(out_dir, columns=["train_l1", "val_l1"])
    # predict on the training accelerator when it is a GPU (whole FOVs are slow on a CPU at width 64)
    on_gpu = cfg.device in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    gen = module.generator.to("cuda" if on_gpu else "cpu").to(memory_format=torch.contiguous_format).eval()
    preds = write_predictions(gen, stage_in, out_dir, splits=splits, max_voxels=max_voxels)
    gen = gen.to("cpu")
    save_model_json(out_dir, run_config(cfg.to_dict(), stage_in), model="unet",
                    generator=asdict(cfg.generator_config()), num_params=num_params(gen), global_step=int(trainer.global_step),
                    train_seconds=round(train_s, 2), threads=torch.get_num_threads(),
                    prediction_modes=sorted(set(preds["mode"])) if len(preds) else [])
    return StageResult(losses, preds, gen, cfg, int(trainer.global_step), start, train_s)

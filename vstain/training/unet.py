"""Training the U-Net baseline with the masked L1 loss alone (thesis 3.2): :class:`UNetModule`,
:func:`fit_unet` and the notebook's one call :func:`run_unet_stage`. The config is
:class:`vstain.training.configs.UNetConfig`; the Lightning machinery is in :mod:`vstain.training.trainer` and the stage
folder's files in :mod:`vstain.modelfiles`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only

from vstain.inference.infer import write_predictions
from vstain.losses import PIXEL_LOSSES, masked_l1
from vstain.modelfiles import prepare_out_dir, run_config, save_model_json, write_losses
from vstain.models import Generator, num_params

from .configs import UNetConfig
from .snapshots import Snapshots, log_steps
from .trainer import CropDataModule, ResumingTrainer, make_optimizer, make_trainer, set_threads


# --------------------------------------------------------------------------------------------
# The U-Net baseline
# --------------------------------------------------------------------------------------------
class UNetModule(L.LightningModule):
    """The generator trained with the masked L1 loss alone (the thesis' U-Net baseline).

    Args:
        config: a :class:`UNetConfig` or its dict (as stored in checkpoints).

    Logs ``train_l1`` every step and ``val_l1`` (mean over the validation crops) at each validation;
    with several processes both are means over the processes (``sync_dist``). With a loss other than
    the masked L1 (``config.loss``) the loss trained on is logged as ``train_loss`` and ``train_l1``
    stays the masked L1 of the same batch, so the curves of all losses compare.
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
        pred = self.generator(self._prep(x))
        loss = PIXEL_LOSSES[self.cfg.loss](pred, y)
        l1 = loss if self.cfg.loss == "l1" else masked_l1(pred.detach(), y)
        self.log("train_l1", l1, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0],
                 sync_dist=True)
        if self.cfg.loss != "l1":
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = masked_l1(self.generator(self._prep(x)), y)
        self.log("val_l1", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return make_optimizer(self.generator.parameters(), self.cfg.optimizer, self.cfg.lr, self.cfg.betas)


# --------------------------------------------------------------------------------------------
# One call per stage
# --------------------------------------------------------------------------------------------
def fit_unet(cfg: UNetConfig, stage_in, out_dir, progress: bool = True, callbacks=None,
             module_cls=UNetModule, model: str = "unet") -> tuple[UNetModule, ResumingTrainer]:
    """Train (or resume) the U-Net baseline on the processed set in ``stage_in``, writing
    checkpoints and logs into ``out_dir``. Returns the module and its trainer (``callbacks``: extra
    Lightning callbacks). ``module_cls`` and ``model`` (the name in ``model.json``) train another
    module of a :class:`UNetConfig` the same way (the flow of :mod:`vstain.training.flow`).

    With ``cfg.devices > 1`` and a DDP ``cfg.strategy`` each process trains on its own crops
    (``batch_size`` per process); the files are written by process 0 only (``strategy="ddp"``
    runs this function in every process)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        prepare_out_dir(out_dir, cfg, run_config(cfg.to_dict(), stage_in))
        save_model_json(out_dir, run_config(cfg.to_dict(), stage_in), model=model,
                        generator=asdict(cfg.generator_config()))
    set_threads(cfg)
    if cfg.snapshots:
        callbacks = [*(callbacks or []), Snapshots(out_dir, log_steps(cfg.max_steps, cfg.snapshots))]
    trainer = make_trainer(out_dir, cfg.max_steps, cfg.device, cfg.precision, cfg.devices, cfg.strategy,
                           ckpt_every=cfg.ckpt_every, val_every=cfg.val_every, seed=cfg.seed, progress=progress,
                           callbacks=callbacks)
    module = module_cls(cfg)  # built after seeding: the initial weights depend on cfg.seed only
    dm = CropDataModule(stage_in, cfg.crop, cfg.batch_size, cfg.samples, cfg.seed, cfg.val_samples, cfg.num_workers,
                        cfg.sampling, cfg.channels)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@dataclass
class UNetResult:
    """What :func:`run_unet_stage` returns to the notebook."""

    losses: pd.DataFrame  # step, epoch, train_l1, val_l1
    predictions: pd.DataFrame  # fov_id, split, structure, path, mode, seconds
    generator: Generator  # trained, eval mode, on the CPU
    config: UNetConfig
    global_step: int  # steps done in total (a resumed run includes the earlier ones)
    start_step: int  # where this call started (0, or the step resumed from)
    train_seconds: float  # wall time of this call's training


def run_unet_stage(stage_in, out_dir, cfg: UNetConfig, splits=("val", "test"), max_voxels=None,
                   progress: bool = True) -> UNetResult:
    """The ``04_unet`` stage in one call: train (resuming if interrupted), write ``losses.csv``,
    the whole-volume predictions of ``splits`` and ``model.json``. Under ``strategy="ddp"`` the
    other processes return after training with no predictions (process 0 writes the files)."""
    t = time.perf_counter()
    module, trainer = fit_unet(cfg, stage_in, out_dir, progress=progress)
    train_s = time.perf_counter() - t
    start, end = trainer.start_step, trainer.end_step
    if not trainer.is_global_zero:
        return UNetResult(pd.DataFrame(), pd.DataFrame(), module.generator.eval(), cfg, end, start, train_s)
    losses = write_losses(out_dir, columns=["train_l1", "val_l1"] + (["train_loss"] if cfg.loss != "l1" else []))
    # predict on the training accelerator when it is a GPU (whole FOVs are slow on a CPU at width 64)
    on_gpu = cfg.device in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    gen = module.generator.to("cuda" if on_gpu else "cpu").to(memory_format=torch.contiguous_format).eval()
    preds = write_predictions(gen, stage_in, out_dir, splits=splits, max_voxels=max_voxels, channel_names=cfg.targets)
    gen = gen.to("cpu")
    save_model_json(out_dir, run_config(cfg.to_dict(), stage_in), complete=True, model="unet",
                    generator=asdict(cfg.generator_config()), num_params=num_params(gen), global_step=end,
                    train_seconds=round(train_s, 2), threads=torch.get_num_threads(),
                    prediction_modes=sorted(set(preds["mode"])) if len(preds) else [])
    return UNetResult(losses, preds, gen, cfg, end, start, train_s)

"""Training and sampling the conditional flow-matching model (Lipman et al. 2023; Liu et al. 2023):
:class:`FlowModule`, :func:`load_velocity` and the study's one call :func:`run_flow_stage`.

The model learns the velocity that carries Gaussian noise to the fluorescence targets along the
straight (conditional optimal-transport) path, given the brightfield
(:class:`vstain.models.VelocityNet`, which predicts the clean targets). A FOV carries three of the
six targets: the loss is the masked squared error of the predicted clean targets on the channels it
carries, and the noisy targets of the absent channels enter the network as zeros. That loss is the
velocity's squared error weighted by ``(1 - t)^2``: every time counts alike in the targets' units.
Unweighted, the velocity loss puts up to 400 times more weight on times near 1, where the noisy
input nearly is the answer; in a 1500-step run the network then learned to copy its noisy input and
ignored the brightfield (PCC 0.05 against the truth from pure noise at t = 0). A sample integrates
the learned ODE from noise with a fixed-step solver (:mod:`vstain.inference.flow`), showing the
network the channels together as training did; the mean of ``K`` samples estimates the conditional
mean, their spread the uncertainty.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from tqdm.auto import tqdm

from vstain.channels import TARGETS
from vstain.inference.flow import METHODS, channel_groups, path_sample, sample_fov
from vstain.losses import masked_mse
from vstain.modelfiles import CHECKPOINTS, LAST, MODEL_JSON, PREDICTIONS, run_config, save_model_json, write_losses
from vstain.models import VelocityConfig, VelocityNet, num_params
from vstain.preprocess import processed
from vstain.volumes import write_volume

from .configs import FlowConfig
from .trainer import make_optimizer
from .unet import fit_unet

ONE_SAMPLE = "one_sample"  # subfolder with the first sample of every FOV (its predictions/)
SPREAD = "spread"  # subfolder with the samples' standard deviation per FOV
SAMPLING_JSON = "sampling.json"
SAMPLING_CSV = "sampling.csv"  # fov_id, split, structure, seconds, passes


class FlowModule(L.LightningModule):
    """The velocity network trained by conditional flow matching with the masked MSE.

    Args:
        config: a :class:`vstain.training.configs.FlowConfig` or its dict.

    Logs ``train_loss`` every step and ``val_loss`` at each validation; the validation draws its
    noise and times from a generator seeded by the batch index, so every validation scores the
    same problems.
    """

    def __init__(self, config: FlowConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, FlowConfig) else FlowConfig.from_dict(config or {})
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.velocity = VelocityNet(cfg.velocity_config())

    def flow_loss(self, x, y, generator: torch.Generator | None = None):
        """The masked flow-matching loss of one batch (``y`` with NaN in the absent channels): the
        squared error of the predicted clean targets, which is the velocity's squared error weighted
        by ``(1 - t)^2`` (same minimiser at every time, the conditional mean)."""
        present = ~torch.isnan(y)
        y1 = torch.nan_to_num(y, nan=0.0)
        y0 = torch.randn(y1.shape, generator=generator, device="cpu").to(y1)
        t = torch.rand(y1.shape[0], generator=generator, device="cpu").to(y1)
        y_t, _ = path_sample(y0, y1, t)
        y1_hat = self.velocity(x, y_t * present, t)  # absent channels enter as zeros
        return masked_mse(y1_hat, y)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.flow_loss(x, y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0],
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = self.flow_loss(x, y, torch.Generator().manual_seed(1000 + batch_idx))
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)

    def configure_optimizers(self):
        return make_optimizer(self.velocity.parameters(), self.cfg.optimizer, self.cfg.lr, self.cfg.betas)


def load_velocity(stage_path, map_location="cpu") -> VelocityNet:
    """The velocity network of a finished flow folder (``model.json``'s ``velocity`` entry and the
    ``velocity.*`` weights of ``checkpoints/last.ckpt``), in eval mode."""
    stage_path = Path(stage_path)
    meta = json.loads((stage_path / MODEL_JSON).read_text())
    net = VelocityNet(VelocityConfig(**meta["velocity"]))
    ckpt = torch.load(stage_path / CHECKPOINTS / LAST, map_location=map_location, weights_only=True)
    net.load_state_dict({k.removeprefix("velocity."): v for k, v in ckpt["state_dict"].items()
                         if k.startswith("velocity.")})
    return net.eval()


@dataclass
class FlowSampling:
    """How each FOV is sampled: ``k`` samples of ``steps`` solver steps of ``method`` (a key of
    :data:`vstain.inference.flow.METHODS`), sample ``j`` seeded from ``(seed, j)``."""

    k: int = 4
    steps: int = 8
    method: str = "euler"
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.k, int) and self.k >= 1 and isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"k and steps must be positive integers, got k={self.k!r}, steps={self.steps!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")

    @property
    def passes(self) -> int:
        """Network passes per FOV: one per channel group (:func:`vstain.inference.flow.channel_groups`)
        per velocity evaluation."""
        return self.k * self.steps * METHODS[self.method] * len(channel_groups())


@dataclass
class FlowResult:
    """What :func:`run_flow_stage` returns to the notebook."""

    losses: pd.DataFrame  # step, epoch, train_loss, val_loss
    sampling: pd.DataFrame  # fov_id, split, structure, seconds, passes
    velocity: VelocityNet
    config: FlowConfig
    train_seconds: float


def run_flow_stage(stage_in, out_dir, cfg: FlowConfig, sampling: FlowSampling, splits=("test",),
                   max_voxels=None, progress: bool = True) -> FlowResult:
    """Train the flow (resuming if interrupted; :func:`vstain.training.unet.fit_unet`'s machinery),
    write ``losses.csv``, then sample every FOV of ``splits``: the mean of the samples to
    ``out_dir/predictions/``, the first sample to ``out_dir/one_sample/predictions/`` and the
    samples' standard deviation to ``out_dir/spread/`` (``<fov_id>.tif``, float32 ``[6, Z, Y, X]``).

    A FOV whose three files exist is not sampled again (an interrupted sampling resumes), unless
    ``sampling`` or the weights changed. ``model.json`` records the config, the sampling and the
    times; it is marked complete last."""
    out_dir = Path(out_dir)
    t = time.perf_counter()
    module, trainer = fit_unet(cfg, stage_in, out_dir, progress=progress, module_cls=FlowModule, model="flow")
    train_s = time.perf_counter() - t
    losses = write_losses(out_dir, columns=["train_loss", "val_loss"])
    net = module.velocity.to("cpu").eval()
    record = {"sampling": asdict(sampling), "global_step": trainer.end_step}
    stamp = out_dir / SAMPLING_JSON
    if not stamp.exists() or json.loads(stamp.read_text()) != record or trainer.start_step != trainer.end_step:
        for sub in (PREDICTIONS, f"{ONE_SAMPLE}/{PREDICTIONS}", SPREAD):
            for f in (out_dir / sub).glob("*.tif"):
                f.unlink()
    stamp.write_text(json.dumps(record))
    df = processed.read_manifest(stage_in)
    df = df[df["split"].isin(splits)]
    times = out_dir / SAMPLING_CSV  # the seconds of FOVs sampled before an interruption
    before = pd.read_csv(times, dtype={"fov_id": str}).set_index("fov_id")["seconds"] if times.exists() else {}
    rows = []
    for _, r in tqdm(list(df.iterrows()), desc="sampling FOVs", disable=not progress):
        name = f"{r['fov_id']}.tif"
        files = [out_dir / PREDICTIONS / name, out_dir / ONE_SAMPLE / PREDICTIONS / name, out_dir / SPREAD / name]
        seconds = float(before.get(str(r["fov_id"]), float("nan")))
        if not all(f.exists() for f in files):
            x, _, _ = processed.load_fov(r)
            s = time.perf_counter()
            first, mean, sd = sample_fov(net, x, sampling.k, sampling.steps, sampling.method, sampling.seed, max_voxels)
            seconds = time.perf_counter() - s
            for f, v in zip(files, (mean, first, sd)):
                write_volume(f, v, list(TARGETS))
        rows.append({"fov_id": r["fov_id"], "split": r["split"], "structure": r["structure"],
                     "seconds": round(seconds, 3), "passes": sampling.passes})
    table = pd.DataFrame(rows)
    table.to_csv(times, index=False)
    save_model_json(out_dir, run_config(cfg.to_dict(), stage_in), complete=True, model="flow",
                    generator=asdict(cfg.generator_config()), velocity=asdict(cfg.velocity_config()),
                    sampling=asdict(sampling), num_params=num_params(net), global_step=trainer.end_step,
                    train_seconds=round(train_s, 2), threads=torch.get_num_threads())
    return FlowResult(losses, table, net, cfg, train_s)

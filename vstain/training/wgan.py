"""The conditional WGAN-GP of the thesis (3.2.3, Algorithm 1; Gulrajani et al. 2017).

Read top to bottom: :class:`WGANConfig` (the thesis' numbers as defaults), the Lightning module
:class:`WGAN` whose :meth:`WGAN.critic_step` / :meth:`WGAN.generator_step` follow Algorithm 1 line
by line (the shape of pix2pix's ``backward_D`` / ``backward_G``), then the stage entry
:func:`run_wgan_stage`. Evaluation (sharpness included) lives in :mod:`vstain.evaluate`.

How ``n_critic`` fresh batches reach each generator step under Lightning: every ``training_step``
receives one batch of the (resumable) crop loader. Batches ``1 .. n_critic - 1`` of an iteration
each make one critic step; the iteration's last batch makes the last critic step *and* the
generator step, sharing one generator forward: Algorithm 1's line 13 uses the ``(x, y, ỹ)`` of the
inner loop's last sample, and pix2pix's ``optimize_parameters`` runs ``backward_D`` and
``backward_G`` on the same forward likewise. This saves one generator forward per iteration (the
critic steps otherwise run the generator without a graph). ``trainer.global_step`` counts optimiser
steps, ``n_critic + 1`` per iteration, so the phase is a function of it; checkpoints store it, the
crops are a function of ``(seed, epoch, i)`` with the loader's position saved, and the
gradient-penalty ``ε`` is drawn from a generator seeded by ``(seed, step)``. So a run resumed from
any checkpoint repeats exactly the losses of an uninterrupted run (on CPU; GPU kernels may differ
in the last bits).

Several processes (Lightning DDP): each process takes its own batch; a step averages the gradients
of the one network it updates (:func:`vstain.training.trainer.backward_and_average`) and the logged numbers
(:func:`vstain.training.trainer.mean_over_processes`), so every process takes the same divergence decision;
the penalty's ``ε`` is seeded by ``(seed, step, rank)``.

Tensors are ``N C Z Y X``; targets hold NaN in the channels a FOV does not carry.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.multiprocessing import ProcessRaisedException

from vstain.inference.infer import write_predictions
from vstain.losses import gradient_penalty, mask_pair, masked_l1, wasserstein_estimate
from vstain.modelfiles import (CHECKPOINTS, LAST, LOSSES_CSV, init_checkpoint, init_generator, prepare_out_dir,
    run_config, save_model_json)
from vstain.models import Critic, Generator, num_params

from .configs import WGANConfig
from .snapshots import Snapshots, log_steps
from .trainer import (CropDataModule, backward_and_average, error_message, frozen, grad_norm, make_optimizer,
    make_trainer, mean_over_processes, seeded_rng)

log = logging.getLogger(__name__)

CHANNELS_LAST = torch.channels_last_3d
# Columns of losses.csv, one row per optimiser step (critic or generator) or validation.
LOSS_COLUMNS = ("step", "iteration", "epoch", "kind", "critic_loss", "wasserstein", "gp", "d_real", "d_fake",
                "l1", "adv", "lambda_adv", "generator_loss", "grad_ratio", "grad_norm_critic",
                "grad_norm_generator", "val_l1")


class TrainingDiverged(RuntimeError):
    """Raised (before the offending optimiser step) when a loss is NaN/inf or the Wasserstein
    estimate explodes; the last checkpoint written before it is the last good state."""


def _f(t: Tensor) -> float:
    return float(t.detach())


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345 + int(rank) * 104_729) % (2**63 - 1)


# --------------------------------------------------------------------------------------------
# The Lightning module: Algorithm 1
# --------------------------------------------------------------------------------------------
class WGAN(L.LightningModule):
    """Conditional WGAN-GP with a U-Net generator and a PatchGAN critic (thesis 3.2.3).

    Manual optimisation: each ``training_step`` gets one batch ``(x [N,1,Z,Y,X], y [N,6,Z,Y,X])``
    and runs :meth:`critic_step`, or on an iteration's last batch :meth:`critic_step` then
    :meth:`generator_step` on one shared generator forward (see the module docstring). Every step
    appends a row to :attr:`history` (saved in checkpoints) and logs it; every ``val_every``
    iterations a ``val`` row holds the masked L1 on the fixed validation crops. The two step
    methods also work without a trainer (plain optimisers; tests and the benchmark call them).

    Args:
        config: a :class:`WGANConfig` or its dict (as stored in checkpoints).
    """

    def __init__(self, config: WGANConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, WGANConfig) else WGANConfig.from_dict(config or {})
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.automatic_optimization = False
        self.generator = Generator(cfg.generator_config())
        self.critic = Critic(cfg.critic_config())
        if cfg.channels_last:
            self.generator.to(memory_format=CHANNELS_LAST)
        if cfg.critic_channels_last:
            self.critic.to(memory_format=CHANNELS_LAST)
        self.history: list[dict] = []
        self._plain_optimizers = None

    def forward(self, x: Tensor) -> Tensor:
        return self.generator(x)

    def configure_optimizers(self):
        # Algorithm 1 lines 11 and 13: one RMSprop per network, constant learning rate.
        c = self.cfg
        opt_c = make_optimizer(self.critic.parameters(), c.optimizer, c.lr_critic, c.betas)
        opt_g = make_optimizer(self.generator.parameters(), c.optimizer, c.lr_generator, c.betas)
        return [opt_c, opt_g]

    def _optimizers(self):
        """(critic, generator) optimisers: Lightning's under a trainer, else plain ones (tests,
        benchmarks call the steps directly)."""
        if self._trainer is not None:
            return self.optimizers()
        if self._plain_optimizers is None:
            self._plain_optimizers = self.configure_optimizers()
        return self._plain_optimizers

    def _g(self, t: Tensor) -> Tensor:
        """A generator input in the generator's memory layout."""
        return t.contiguous(memory_format=CHANNELS_LAST) if self.cfg.channels_last else t

    def _c(self, *ts: Tensor) -> list[Tensor]:
        """Critic inputs in the critic's memory layout."""
        return [t.contiguous(memory_format=CHANNELS_LAST) for t in ts] if self.cfg.critic_channels_last else list(ts)

    def _backward(self, loss: Tensor, network: nn.Module) -> None:
        """Backward of ``loss``, then (several processes) ``network``'s gradients averaged."""
        if self._trainer is None:
            loss.backward()
        else:
            backward_and_average(self, loss, network)

    # ---- schedule -----------------------------------------------------------------------
    def epoch_number(self) -> int:
        """Epochs counted from 1 (for λ_e = 1/epoch)."""
        return int(self.trainer.current_epoch) + 1 if self._trainer is not None else 1

    def training_step(self, batch, batch_idx):
        x, y = batch
        step = int(self.global_step)  # optimiser steps so far
        if self.cfg.lambda_adv == 0:
            self._l1_only_step(x, y, step)
            return
        if step % self.cfg.steps_per_iteration < self.cfg.n_critic - 1:
            self._record(step, "critic", self.critic_step(x, y, step), x.shape[0])
            return
        # The iteration's last batch: one generator forward with a graph serves the last critic
        # step (detached) and then the generator step (Algorithm 1 line 13 uses this sample's ỹ).
        pred = self.generator(self._g(x))
        self._record(step, "critic", self.critic_step(x, y, step, pred=pred.detach()), x.shape[0])
        self._record(step + 1, "generator", self.generator_step(x, y, step + 1, pred=pred), x.shape[0])
        iteration = (step + 2) // self.cfg.steps_per_iteration  # iterations completed
        if iteration % self.cfg.val_every == 0:
            self._record(step + 2, "val", {"val_l1": self.validate()}, x.shape[0])

    def _l1_only_step(self, x: Tensor, y: Tensor, step: int) -> None:
        """λ_adv = 0, the L1-only control: the critic cannot reach the generator, so its steps are
        skipped. Their batches are still drawn and each still counts as an optimiser step (an
        update without gradients changes no weight), so the generator trains on exactly the
        batches, at exactly the steps, of a run with λ_adv > 0 and the same seed."""
        opt_c, _ = self._optimizers()
        opt_c.zero_grad(set_to_none=True)
        opt_c.step()  # no gradients: no update, one step counted
        if step % self.cfg.steps_per_iteration < self.cfg.n_critic - 1:
            return
        self._record(step + 1, "generator", self.generator_step(x, y, step + 1), x.shape[0])
        iteration = (step + 2) // self.cfg.steps_per_iteration
        if iteration % self.cfg.val_every == 0:
            self._record(step + 2, "val", {"val_l1": self.validate()}, x.shape[0])

    def _record(self, step: int, kind: str, values: dict, batch_size: int) -> None:
        row = {"step": step, "iteration": step // self.cfg.steps_per_iteration, "epoch": self.epoch_number(),
               "kind": kind, **values}
        self.history.append(row)
        self._log_row(row, batch_size)

    # ---- Algorithm 1, lines 2-12 -------------------------------------------------------
    def critic_step(self, x: Tensor, y: Tensor, step: int = 0, pred: Tensor | None = None) -> dict:
        """One critic update on a fresh real batch (Algorithm 1, one pass of the ``t`` loop).

        Args:
            x: brightfield ``[N,1,Z,Y,X]``; y: targets ``[N,6,Z,Y,X]`` (NaN = no label).
            step: the optimiser step, which seeds the penalty's ``ε``.
            pred: ``G(x)`` already computed (detached), else computed here without a graph.

        Returns the logged numbers: ``critic_loss``, ``wasserstein``, ``gp``, ``d_real``,
        ``d_fake``, ``grad_norm_critic``.
        """
        opt_c, _ = self._optimizers()
        # l.3-4: sample a batch of m real pairs (x, y) ~ P_r: this step's own batch (no other
        # critic step sees it; the generator step reuses the iteration's last one).
        # l.5: ỹ <- G_θ(x). The critic step does not train G: no graph through the generator.
        if pred is None:
            with torch.no_grad():
                pred = self.generator(self._g(x))
        # l.6: ỹ <- mask(ỹ): zero where y has no label; y's NaN become 0. Real and fake now carry
        # the same empty channels, so the critic cannot count them.
        fake, real = mask_pair(pred.detach(), y)
        x, real, fake = self._c(x, real, fake)
        # l.9, first two terms: D_w(x, ỹ) - D_w(x, y), averaged over patches and the batch
        # (real and fake share one forward pass; InstanceNorm keeps samples independent).
        scores = self.critic(torch.cat([x, x]), torch.cat([real, fake]))
        d_real, d_fake = scores[: x.shape[0]].mean(), scores[x.shape[0]:].mean()
        # l.7-9: ε ~ U[0,1] per sample, ŷ = ε·y + (1-ε)·ỹ (Gulrajani et al.; the thesis' ε·x is a
        # typo), penalty (||∇_ŷ D_w(x, ŷ)||₂ - 1)². ε is seeded by (seed, step, rank) for exact resume.
        with seeded_rng(_step_seed(self.cfg.seed, step, self.global_rank), real.device):
            gp = gradient_penalty(self.critic, x, real, fake)
        loss = d_fake - d_real + self.cfg.lambda_gp * gp
        w = wasserstein_estimate(d_real, d_fake)
        out = mean_over_processes(self, {"critic_loss": _f(loss), "wasserstein": _f(w), "gp": _f(gp),
                                         "d_real": _f(d_real), "d_fake": _f(d_fake)})
        self._check(out, step)
        # l.11: w <- RMSProp(∇_w (1/m) Σ L^i, w, lr)
        opt_c.zero_grad(set_to_none=True)
        self._backward(loss, self.critic)
        out["grad_norm_critic"] = grad_norm(self.critic)
        opt_c.step()
        return out

    # ---- Algorithm 1, line 13 ----------------------------------------------------------
    def generator_step(self, x: Tensor, y: Tensor, step: int = 0, pred: Tensor | None = None) -> dict:
        """One generator update (Algorithm 1 line 13):
        ``θ <- RMSProp(∇_θ [masked L1(y, ỹ) - λ_adv · mean D_w(x, ỹ)])``.

        Args:
            x, y: the batch (in training: the last critic step's).
            step: the optimiser step (for the record).
            pred: ``G(x)`` with its graph, when the last critic step already computed it.

        The two gradients are taken at the generator's output first (cheap: the critic's weight
        gradients are never computed), their ratio is logged, and one backward pass through the
        generator carries their weighted sum. Returns ``l1``, ``adv`` (= -mean D(x, ỹ)),
        ``lambda_adv`` (the weight used), ``generator_loss``, ``grad_ratio`` (|λ·∇adv| / |∇L1| at
        the output) and ``grad_norm_generator``.
        """
        _, opt_g = self._optimizers()
        # l.5-6 with a graph through G: ỹ <- mask(G_θ(x)) (θ has not changed since l.5).
        if pred is None:
            pred = self.generator(self._g(x))
        fake, _ = mask_pair(pred, y)
        l1 = masked_l1(pred, y)  # thesis 3.2.1: mean |y - ỹ| over the labelled voxels only
        if self.cfg.lambda_adv == 0:  # the L1-only control: no critic term at all
            opt_g.zero_grad(set_to_none=True)
            self._backward(l1, self.generator)
            m = mean_over_processes(self, {"l1": _f(l1)})
            out = {"l1": m["l1"], "lambda_adv": 0.0, "generator_loss": m["l1"], "grad_ratio": 0.0}
            self._check(out, step)
            out["grad_norm_generator"] = grad_norm(self.generator)
            opt_g.step()
            return out
        with frozen(self.critic):  # the critic is a fixed loss here
            adv = -self.critic(*self._c(x, fake)).mean()  # -mean D_w(x, ỹ)
        g_l1, = torch.autograd.grad(l1, pred, retain_graph=True)
        g_adv, = torch.autograd.grad(adv, pred)
        n_l1, n_adv = mean_over_processes(self, {"l1": float(g_l1.norm()), "adv": float(g_adv.norm())}).values()
        lam = self.adv_weight(n_l1, n_adv)
        loss = l1 + lam * adv
        m = mean_over_processes(self, {"l1": _f(l1), "adv": _f(adv), "generator_loss": _f(loss)})
        out = {"l1": m["l1"], "adv": m["adv"], "lambda_adv": lam, "generator_loss": m["generator_loss"],
               "grad_ratio": lam * n_adv / n_l1 if n_l1 > 0 else float("nan")}
        self._check(out, step)
        # l.13: θ <- RMSProp(∇_θ (1/m) Σ (||y - ỹ||_1 - λ_adv D_w(x, ỹ)), θ, lr): the chain rule
        # from the output gradient (a scalar surrogate so Lightning's precision plugin applies).
        opt_g.zero_grad(set_to_none=True)
        self._backward((pred * (g_l1 + lam * g_adv).detach()).sum(), self.generator)
        out["grad_norm_generator"] = grad_norm(self.generator)
        opt_g.step()
        return out

    def adv_weight(self, norm_l1: float, norm_adv: float) -> float:
        """The adversarial weight of this generator step (see ``WGANConfig.adv_weighting``)."""
        c = self.cfg
        if c.adv_weighting == "inverse_epoch":
            return c.lambda_adv / self.epoch_number()
        if c.adv_weighting == "balanced":
            return c.lambda_adv * norm_l1 / norm_adv if norm_adv > 0 else 0.0
        return c.lambda_adv

    # ---- validation, guards, logging, checkpoints --------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """Masked L1 of the generator over the datamodule's fixed validation crops.

        Run inside the training step (after every ``val_every``-th generator step), not by
        Lightning's validation loop, so the row is in the history before the checkpoint of the
        same step is written and a resumed run repeats it exactly.
        """
        total, n = 0.0, 0
        for x, y in self.trainer.datamodule.val_dataloader():
            x, y = x.to(self.device), y.to(self.device)
            total += float(masked_l1(self.generator(self._g(x)), y)) * x.shape[0]
            n += x.shape[0]
        return total / n

    def _check(self, out: dict, step: int) -> None:
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        w = out.get("wasserstein", 0.0)
        if bad or abs(w) > self.cfg.max_wasserstein:
            self.history.append({"step": step, "iteration": step // self.cfg.steps_per_iteration,
                                 "epoch": self.epoch_number(), "kind": "diverged", **out})
            why = (f"non-finite {', '.join(bad)}" if bad
                   else f"|Wasserstein estimate| {abs(w):.3g} > max_wasserstein {self.cfg.max_wasserstein:g}")
            raise TrainingDiverged(
                f"WGAN training stopped at optimiser step {step} (generator iteration "
                f"{step // self.cfg.steps_per_iteration}): {why}; values {out}. The last checkpoint "
                f"(saved every {self.cfg.ckpt_every} iterations) is the last good state.")

    def _log_row(self, row: dict, batch_size: int) -> None:
        if self._trainer is None:
            return
        prog = {"critic_loss", "wasserstein", "l1", "val_l1"}
        for k, v in row.items():
            if k in ("step", "iteration", "epoch", "kind"):
                continue
            self.log(k, v, on_step=True, on_epoch=False, prog_bar=k in prog, batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["wgan_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("wgan_history", []))


# --------------------------------------------------------------------------------------------
# The stage: train (resuming), losses, predictions, model.json
# --------------------------------------------------------------------------------------------
@dataclass
class WGANResult:
    """What :func:`run_wgan_stage` returns to the notebook."""

    losses: pd.DataFrame  # LOSS_COLUMNS, one row per optimiser step or validation
    predictions: pd.DataFrame  # fov_id, split, structure, path, mode, seconds
    generator: Generator  # trained (or last good), eval mode, on the CPU
    config: WGANConfig
    global_step: int  # optimiser steps in total (n_critic + 1 per iteration)
    iterations: int  # generator iterations in total
    start_step: int  # where this call started (0, or the step resumed from)
    train_seconds: float  # wall time of this call's training
    stopped: str  # "" or the divergence message


def history_frame(history: list[dict]) -> pd.DataFrame:
    """The module's history as a table with :data:`LOSS_COLUMNS`."""
    return pd.DataFrame(history).reindex(columns=list(LOSS_COLUMNS))


def fit_wgan(cfg: WGANConfig, stage_in, out_dir, progress: bool = True, callbacks=None):
    """Train (or resume from ``out_dir/checkpoints/last.ckpt``) on the processed set in
    ``stage_in``. Returns ``(module, trainer, stopped)``; ``stopped`` is ``""`` or the message of a
    :class:`TrainingDiverged`, in which case the module holds the last good checkpoint's weights
    (those of optimiser step ``module.restored_step``). Under DDP process 0 writes the files; after
    a divergence in spawned processes the history ends at the last checkpoint.

    Args:
        cfg: the run's configuration (``init_from`` is used only when no checkpoint exists yet).
        stage_in: the ``03_denoising`` stage folder.
        out_dir: the stage folder (``checkpoints/``, ``logs/``, ``model.json``).
        progress: show Lightning's progress bar.
        callbacks: extra Lightning callbacks.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(cfg.to_dict(), stage_in, init_checkpoint(cfg.init_from))
    if rank_zero_only.rank == 0:
        prepare_out_dir(out_dir, cfg, config)
        save_model_json(out_dir, config, model="wgan", generator=asdict(cfg.generator_config()),
                        critic=asdict(cfg.critic_config()))
    if cfg.device == "cpu" and cfg.num_threads > 0:
        torch.set_num_threads(int(cfg.num_threads))
    spi = cfg.steps_per_iteration
    if cfg.snapshots:  # at generator iterations
        callbacks = [*(callbacks or []), Snapshots(out_dir, log_steps(cfg.iterations, cfg.snapshots),
                                                   step_of=lambda trainer: int(trainer.global_step) // spi)]
    trainer = make_trainer(out_dir, cfg.iterations * spi, cfg.device, cfg.precision, cfg.devices, cfg.strategy,
                           ckpt_every=cfg.ckpt_every * spi, val_every=None, seed=cfg.seed,
                           progress=progress, callbacks=callbacks)
    module = WGAN(cfg)  # built after seeding: the initial weights depend on cfg.seed only
    last = out_dir / CHECKPOINTS / LAST
    if cfg.init_from and not last.exists():
        init_generator(module.generator, cfg.init_from)
    dm = CropDataModule(stage_in, cfg.crop, cfg.batch_size, cfg.samples, cfg.seed, cfg.val_samples, cfg.num_workers)
    # Lightning notes that manual-optimisation checkpoints hold the state after the step (intended)
    # and that the datamodule's validation loader is unused (the module validates in its step).
    warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=r".*val_dataloader.* but have no .validation_step.*")
    stopped = ""
    try:
        trainer.fit(module, datamodule=dm)
    except (TrainingDiverged, ProcessRaisedException) as e:
        stopped = error_message(e, TrainingDiverged)
        if stopped is None:
            raise
        log.warning(stopped)
        history = module.history
        module.restored_step = int(trainer.global_step)  # the failing step was not applied
        if last.exists():
            ckpt = torch.load(last, map_location="cpu", weights_only=False)
            module.load_state_dict(ckpt["state_dict"])
            module.restored_step = int(ckpt["global_step"])
            history = history or list(ckpt.get("wgan_history", []))
        module.history = history  # keep the rows up to the failure, for the record
    return module, trainer, stopped


def run_wgan_stage(stage_in, out_dir, cfg: WGANConfig, splits=("val", "test"), max_voxels=None,
                   progress: bool = True) -> WGANResult:
    """The ``05_wgan`` stage in one call: train (resuming if interrupted, optionally from the U-Net
    baseline), write ``losses.csv`` (:data:`LOSS_COLUMNS`), the whole-volume predictions of
    ``splits`` and ``model.json``. Under ``strategy="ddp"`` the other processes return after
    training with no predictions (process 0 writes the files)."""
    t = time.perf_counter()
    module, trainer, stopped = fit_wgan(cfg, stage_in, out_dir, progress=progress)
    train_s = time.perf_counter() - t
    losses = history_frame(module.history)
    step, start = int(getattr(module, "restored_step", trainer.end_step)), trainer.start_step
    spi = cfg.steps_per_iteration
    if not trainer.is_global_zero:
        return WGANResult(losses, pd.DataFrame(), module.generator.eval(), cfg, step, step // spi, start, train_s,
                          stopped)
    losses.to_csv(Path(out_dir) / LOSSES_CSV, index=False)
    # predict on the training accelerator when it is a GPU (whole FOVs are slow on a CPU at width 64)
    on_gpu = cfg.device in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    gen = module.generator.to("cuda" if on_gpu else "cpu").to(memory_format=torch.contiguous_format).eval()
    preds = write_predictions(gen, stage_in, out_dir, splits=splits, max_voxels=max_voxels)
    gen = gen.to("cpu")
    save_model_json(out_dir, run_config(cfg.to_dict(), stage_in, init_checkpoint(cfg.init_from)), complete=True,
                    model="wgan", generator=asdict(cfg.generator_config()),
                    critic=asdict(cfg.critic_config()), num_params=num_params(gen),
                    critic_params=num_params(module.critic), global_step=step,
                    iterations=step // spi, train_seconds=round(train_s, 2),
                    threads=torch.get_num_threads(), stopped=stopped,
                    prediction_modes=sorted(set(preds["mode"])) if len(preds) else [])
    return WGANResult(losses, preds, gen, cfg, step, step // spi, start, train_s, stopped)

"""One typed config per training stage (careamics-style: saved with every checkpoint and in the
stage's ``model.json``): :class:`UNetConfig` for the masked-L1 U-Net baseline (thesis 3.2) and
:class:`WGANConfig` for the conditional WGAN-GP (thesis 3.2.3, Algorithm 1). Defaults are the
thesis' numbers; a validation error shows the bad value and the allowed ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from vstain.channels import TARGETS
from vstain.losses import PIXEL_LOSSES
from vstain.models import NORMS, CriticConfig, GeneratorConfig, VelocityConfig
from vstain.preprocess.processed import SAMPLINGS, check_channels

OPTIMIZERS = ("rmsprop", "adam")
DEVICES = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
ADV_WEIGHTINGS = ("constant", "inverse_epoch", "balanced")


class DictConfig:
    """Round trip of a config dataclass through JSON/YAML (the checkpoint's ``hyper_parameters``,
    ``model.json``), and what :func:`vstain.modelfiles.is_finished` asks of a training config: the
    keys an interrupted run may change on resumption (``RESUMABLE_KEYS``) and the optimiser steps
    a finished run has taken (``optimiser_steps``)."""

    RESUMABLE_KEYS: ClassVar[tuple[str, ...]] = ()

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

    @classmethod
    def from_namespace(cls, namespace, **overrides):
        """The config from a notebook's ``globals()``: every field that the namespace holds (the
        notebooks' parameters carry the configs' names), then ``overrides``."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in namespace.items() if k in names}, **overrides})

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


def check_snapshots(n) -> None:
    """``snapshots`` is 0 (none) or a count of at least 2 (a curve needs two points)."""
    if not isinstance(n, int) or n < 0 or n == 1:
        raise ValueError(f"snapshots must be 0 (none) or an integer >= 2, got {n!r}")


@dataclass
class UNetConfig(DictConfig):
    """Everything that defines a U-Net baseline run; saved in every checkpoint and ``model.json``.

    Args:
        base_width: generator width (thesis 64; CPU profiles 8-16).
        negative_slope: LeakyReLU slope (thesis 0.05).
        optimizer: ``"rmsprop"`` (thesis) or ``"adam"`` (betas below; on a CPU budget a U-Net at
            RMSprop 5e-5 gave an almost blank output after 5 minutes where Adam 2e-4 learned).
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
        precision: Lightning precision: ``"32-true"`` or ``"bf16-mixed"`` (a GPU, or a CPU with
            hardware bfloat16, :mod:`vstain.training.precision`).
        devices: number of devices (several GPUs: e.g. 4 with ``strategy="ddp_spawn"``, or
            ``"ddp_notebook"`` in a notebook; plain ``"ddp"`` re-runs the calling script).
        strategy: Lightning strategy (``"auto"``, ``"ddp_spawn"``, ``"ddp_notebook"``, ...).
        num_threads: CPU threads for torch (0: leave torch's default, the physical cores).
        channels_last: store activations as ``channels_last_3d`` (may speed up CPU convolutions).
        torch_compile: ``torch.compile`` the generator (fuses instance norm and LeakyReLU; costs a
            minute or so of compilation at the start).
        num_workers: DataLoader worker processes (0: load in the training process).
        loss: the masked pixel loss, a key of :data:`vstain.losses.PIXEL_LOSSES`: ``"l1"``
            (thesis 3.2.1), ``"mse"`` or ``"l1+mse"``.
        norm: the generator's normalisation, ``"instance"`` (thesis 3.1.1) or ``"batch"``.
        sampling: how training crops pick their FOV, ``"uniform"`` or ``"balanced"`` (each tagged
            structure equally often, :class:`vstain.preprocess.processed.ProcessedCrops`).
        channels: the target channels the model predicts and trains on, as
            :data:`vstain.channels.TARGETS` names (default empty: all six, one joint model). A
            subset trains only on the FOVs that carry every one of them (one model per structure,
            as Ounkomol et al. 2018).
        snapshots: generator snapshots kept at log-spaced steps for the test-set learning curves
            (:func:`vstain.training.snapshots.log_steps`; 0: none).
    """

    base_width: int = 64  # thesis 3.1.1
    negative_slope: float = 0.05  # thesis 3.2.2
    optimizer: str = "rmsprop"  # thesis 3.2.2; "adam" for CPU budgets (RMSprop 5e-5 barely learns in minutes)
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
    loss: str = "l1"  # thesis 3.2.1: masked L1
    norm: str = "instance"  # thesis 3.1.1: InstanceNorm3d
    sampling: str = "uniform"  # every training FOV equally often
    channels: tuple[str, ...] = ()  # all six targets: one joint model (thesis)
    snapshots: int = 0  # log-spaced generator snapshots for learning curves (0: none)
    RESUMABLE_KEYS: ClassVar[tuple[str, ...]] = (  # may change between an interrupted run and its resumption
        "max_steps", "val_every", "ckpt_every", "device", "precision", "devices", "strategy", "num_threads",
        "num_workers", "channels_last", "torch_compile")

    def __post_init__(self):
        self.crop = tuple(int(c) for c in self.crop)
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.crop) != 3 or min(self.crop) < 8:
            raise ValueError(f"crop must be 3 sizes (Z, Y, X), each >= 8, got {self.crop}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss not in PIXEL_LOSSES:
            raise ValueError(f"loss must be one of {tuple(PIXEL_LOSSES)}, got {self.loss!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)}, got {self.norm!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        self.channels = check_channels(self.channels)
        check_snapshots(self.snapshots)
        self.check_run_fields(("base_width", "batch_size", "samples", "val_samples", "max_steps", "val_every",
                               "ckpt_every", "devices"))

    @property
    def targets(self) -> tuple[str, ...]:
        """The channels the model predicts, in its output order."""
        return self.channels or TARGETS

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(base_width=self.base_width, negative_slope=self.negative_slope,
                               out_channels=len(self.targets), norm=self.norm)

    @property
    def optimiser_steps(self) -> int:
        return self.max_steps



@dataclass
class FlowConfig(UNetConfig):
    """A conditional flow-matching run (Lipman et al. 2023): the U-Net's recipe (optimiser, rate,
    crops, steps) with the velocity network (:class:`vstain.models.VelocityNet`) in place of the
    generator, regressing the path's velocity with the masked MSE.

    Args:
        time_features: sinusoidal features of the time ``t`` (even).
        (others): as :class:`UNetConfig`; ``loss`` must be ``"mse"`` (the flow-matching loss: its
            minimiser is the conditional mean velocity), ``norm`` ``"instance"`` and ``channels``
            empty (one joint model of all six targets).
    """

    loss: str = "mse"  # flow matching regresses E[y_1 - y_0 | y_t, t, brightfield]
    time_features: int = 32  # sin/cos features of t

    def __post_init__(self):
        super().__post_init__()
        if self.loss != "mse" or self.norm != "instance" or self.channels:
            raise ValueError(f"a flow trains all six channels with loss 'mse' and norm 'instance', got loss "
                             f"{self.loss!r}, norm {self.norm!r}, channels {self.channels}")
        self.velocity_config()  # validates time_features

    def velocity_config(self) -> VelocityConfig:
        return VelocityConfig(base_width=self.base_width, out_channels=len(TARGETS),
                              negative_slope=self.negative_slope, time_features=self.time_features)

    def generator_config(self) -> GeneratorConfig:
        return self.velocity_config().generator_config()

@dataclass
class WGANConfig(DictConfig):
    """Everything that defines a WGAN-GP run; saved in every checkpoint and in ``model.json``.

    Args:
        base_width: generator width (thesis 64; CPU profiles 8-16). With ``init_from`` it must
            equal the U-Net's.
        critic_width: critic width (thesis 64).
        negative_slope: LeakyReLU slope of both networks (thesis 0.05).
        optimizer: ``"rmsprop"`` (thesis 3.2.2) or ``"adam"`` (``betas``; on a CPU budget a U-Net at
            RMSprop 5e-5 gave an almost blank output after 5 minutes where Adam 2e-4 learned). Both
            networks use the same kind.
        lr_generator, lr_critic: learning rates (thesis: 5e-5 both, constant).
        betas: Adam's betas (Gulrajani et al. 2017: 0.5, 0.9); ignored by RMSprop.
        lambda_adv: weight of the adversarial term in the generator loss (thesis 0.05). With
            ``adv_weighting="balanced"`` it is instead the target ratio of the adversarial to the
            L1 gradient at the generator's output.
        lambda_gp: gradient-penalty coefficient (thesis 10).
        n_critic: critic steps per generator step, each on a fresh batch (thesis 5).
        adv_weighting: ``"constant"`` (thesis), ``"inverse_epoch"`` (``lambda_adv / epoch``, the
            λ_e = 1/epoch of Cross-Zamirski et al. 2022, epochs counted from 1), or
            ``"balanced"`` (``lambda_adv * |∇L1| / |∇adv|`` measured at the generator output every
            step, so the adversarial gradient is ``lambda_adv`` times the L1 one whatever the crop size).
        max_wasserstein: training stops (keeping the last good checkpoint) when ``|W|`` exceeds this.
        batch_size: crops per step (thesis m = 16).
        crop: crop size ``(Z, Y, X)``, each >= 8.
        samples: training crops per epoch.
        val_samples: fixed validation crops, masked L1 every ``val_every`` iterations.
        iterations: generator iterations in total (``n_critic`` batches and ``n_critic + 1``
            optimiser steps each); a resumed run continues up to this number.
        val_every, ckpt_every: generator iterations between validations / checkpoints.
        init_from: ``""`` (random generator), a finished ``04_unet`` stage folder, or a ``.ckpt``
            file: start the generator from the U-Net baseline (thesis 4.2, after Cross-Zamirski).
        seed: seeds weights, crops, flips and the gradient-penalty ``ε``.
        channels_last, critic_channels_last: store the generator's / the critic's weights and
            activations as ``channels_last_3d`` (a CPU speed option; oneDNN's weight gradient of the
            critic's 7-channel stride-2 first convolution is far slower in the default layout).
        device, precision, devices, strategy, num_threads, num_workers, snapshots: as in
            :class:`UNetConfig` (snapshots at log-spaced generator iterations).
    """

    base_width: int = 64  # thesis 3.1.1
    critic_width: int = 64  # thesis 3.1.2
    negative_slope: float = 0.05  # thesis 3.2.2
    optimizer: str = "rmsprop"  # thesis 3.2.2: RMSprop for a stable WGAN
    lr_generator: float = 5e-5  # thesis 3.2.2 / Algorithm 1
    lr_critic: float = 5e-5  # thesis 3.2.2 / Algorithm 1
    betas: tuple[float, float] = (0.5, 0.9)  # Adam only (Gulrajani et al. 2017)
    lambda_adv: float = 0.05  # Algorithm 1
    lambda_gp: float = 10.0  # Algorithm 1 (Gulrajani et al. 2017)
    n_critic: int = 5  # Algorithm 1
    adv_weighting: str = "constant"  # thesis; "inverse_epoch" = Cross-Zamirski et al. 2022
    max_wasserstein: float = 1e4  # divergence guard
    batch_size: int = 16  # Algorithm 1: m = 16
    crop: tuple[int, int, int] = (32, 384, 384)  # thesis-scale crops (Z, Y, X)
    samples: int = 1024
    val_samples: int = 16
    iterations: int = 5000
    val_every: int = 100
    ckpt_every: int = 100
    init_from: str = ""
    seed: int = 0
    device: str = "cpu"
    precision: str = "32-true"
    devices: int = 1
    strategy: str = "auto"
    num_threads: int = 0
    num_workers: int = 0
    channels_last: bool = False
    critic_channels_last: bool = False
    snapshots: int = 0  # log-spaced generator snapshots for learning curves (0: none)
    RESUMABLE_KEYS: ClassVar[tuple[str, ...]] = (  # may change between an interrupted run and its resumption
        "iterations", "val_every", "ckpt_every", "device", "precision", "devices", "strategy", "num_threads",
        "num_workers", "max_wasserstein", "channels_last", "critic_channels_last")

    def __post_init__(self):
        self.crop = tuple(int(c) for c in self.crop)
        self.betas = tuple(float(b) for b in self.betas)
        self.init_from = str(self.init_from or "")
        if len(self.crop) != 3 or min(self.crop) < 8:
            raise ValueError(f"crop must be 3 sizes (Z, Y, X), each >= 8, got {self.crop}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.adv_weighting not in ADV_WEIGHTINGS:
            raise ValueError(f"adv_weighting must be one of {ADV_WEIGHTINGS}, got {self.adv_weighting!r}")
        for name in ("lr_generator", "lr_critic", "max_wasserstein"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("lambda_adv", "lambda_gp"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_snapshots(self.snapshots)
        self.check_run_fields(("base_width", "critic_width", "n_critic", "batch_size", "samples", "val_samples",
                               "iterations", "val_every", "ckpt_every", "devices"))

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps (= batches) per generator iteration: ``n_critic`` critic + 1 generator."""
        return self.n_critic + 1

    @property
    def optimiser_steps(self) -> int:
        return self.iterations * self.steps_per_iteration

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(base_width=self.base_width, negative_slope=self.negative_slope)

    def critic_config(self) -> CriticConfig:
        return CriticConfig(base_width=self.critic_width, negative_slope=self.negative_slope)

"""The thesis' networks: a 3D U-Net generator and a 3D PatchGAN critic (thesis 3.1).

Read top to bottom: the building blocks, then :class:`GeneratorConfig` / :class:`Generator`, then
:class:`CriticConfig` / :class:`Critic`, then helpers for tests and the architecture figures
(:func:`num_params`, :func:`summarize`). Tensors are ``N C Z Y X``. The models never print.

With their default configurations the generator has 23,092,678 trainable parameters (the thesis reports
23.1 M) and the critic 6,203,841 (thesis: 6.2 M) with a receptive field of 54 voxels. Those counts hold with
InstanceNorm3d *without* affine parameters (PyTorch's default); an affine norm would give 23.10 M and 6.21 M.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The generator downsamples three times (depth 3), so padded sizes are multiples of 2**3.
SIZE_MULTIPLE = 8
MIN_SIZE = 8


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (no affine parameters) that also accepts a single voxel.

    An input of 8 voxels per axis reaches the U-Net's bottleneck (and the critic's third block)
    as one voxel; ``(x - mean) / std`` of one value is 0, which PyTorch refuses to compute. This
    returns that 0 instead of raising, so the any-size promise holds down to 8x8x8.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2:].numel() == 1:
            return x - x  # the normalised value of a single voxel, with a (zero) gradient path
        return super().forward(x)


def deep_level(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a level of Z/8-deep maps (2 slices for a 16-slice crop), in float32 inside a CPU
    bfloat16 autocast: oneDNN's bf16 weight gradients of such maps differ from run to run (two trainings
    from one seed ended 0.007 apart; bit-identical with these levels in float32, 0.405 against 0.421 s
    per step: ``benchmarks/bench_bf16.py``). Elsewhere (float32, a GPU, tracing) ``module(x)``."""
    cpu_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if x.device.type == "cpu" and cpu_bf16 and not torch.jit.is_tracing():
        with torch.autocast("cpu", enabled=False):
            return module(x.float())
    return module(x)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs a single float32 volume on the CPU through oneDNN too.

    For a CPU float32 batch of one whose ``N*C*Z*Y`` is at most 20480, PyTorch picks its native
    im2col kernel over oneDNN (a heuristic written for 2D inputs); on a 3D U-Net level of 8 channels,
    16x96x96 voxels that kernel is ~10x slower. Same weights, same result (to float rounding); a
    traced or scripted network and autocast keep the plain call, so an export runs on any device.
    """

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (not torch.jit.is_tracing() and not torch.jit.is_scripting() and x.shape[0] == 1
                and x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and torch.backends.mkldnn.is_available()
                and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


# The generator's normalisation layers: instance norm (thesis 3.1.1) or batch norm (Ounkomol et
# al. 2018's 3D U-Net), which an ablation swaps in. Batch norm learns an affine map per channel and
# normalises by running statistics at inference.
NORMS = {"instance": InstanceNorm3d, "batch": nn.BatchNorm3d}


class ConvBlock(nn.Sequential):
    """Two identical sub-blocks ``Conv3d(k=3, s=1, p=1) -> norm -> LeakyReLU`` (thesis 3.1.1:
    InstanceNorm3d; ``norm`` is a key of :data:`NORMS`)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float, norm: str = "instance"):
        super().__init__(
            Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1),
            NORMS[norm](out_channels),
            nn.LeakyReLU(negative_slope),
            Conv3d(out_channels, out_channels, kernel_size=3, stride=1, padding=1),
            NORMS[norm](out_channels),
            nn.LeakyReLU(negative_slope),
        )


class Down(Conv3d):
    """A learned downsampling: ``Conv3d(k=2, s=2)`` halves each axis and keeps the channels."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=2, stride=2)


class UpCat(nn.Module):
    """Decoder level: ``ConvTranspose3d(k=2, s=2)`` doubles each axis and halves the channels,
    the encoder's skip is concatenated, and a :class:`ConvBlock` merges the two."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float, norm: str = "instance"):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels, negative_slope, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def check_size(shape, what: str = "input") -> None:
    """Raise a clear error unless ``shape`` is ``N C Z Y X`` with every spatial axis >= 8."""
    shape = tuple(shape)
    if len(shape) != 5:
        raise ValueError(f"{what} must be a 5D tensor N C Z Y X, got shape {shape}")
    if min(shape[2:]) < MIN_SIZE:
        raise ValueError(
            f"{what} of shape {shape} is too small: every spatial axis (Z, Y, X) must be at least "
            f"{MIN_SIZE} voxels for the depth-3 U-Net / PatchGAN"
        )


# --------------------------------------------------------------------------------------------
# Generator (thesis 3.1.1, Figure 3.1)
# --------------------------------------------------------------------------------------------
@dataclass
class GeneratorConfig:
    """The generator's hyper-parameters; defaults are the thesis' values.

    Args:
        base_width: filters of the first encoder block; the others are 2x, 4x and the bottleneck
            8x (thesis: 64, 128, 256, 512). Must be >= 1; CPU profiles use 8 or 16.
        in_channels: input channels (1: brightfield).
        out_channels: predicted fluorescence channels (6: :data:`vstain.channels.TARGETS`).
        negative_slope: LeakyReLU slope, in [0, 1) (thesis 3.2.2: 0.05).
        norm: ``"instance"`` (thesis 3.1.1, no affine parameters) or ``"batch"`` (BatchNorm3d,
            as Ounkomol et al. 2018; a batch of one crop then normalises by that crop alone).
    """

    base_width: int = 64  # thesis 3.1.1: 64/128/256 filters, bottleneck 512
    in_channels: int = 1  # brightfield
    out_channels: int = 6  # thesis 3.1.1: the six fluorescent channels
    negative_slope: float = 0.05  # thesis 3.2.2: LeakyReLU slope chosen by search
    norm: str = "instance"  # thesis 3.1.1

    def __post_init__(self):
        _check_positive(self, "base_width", "in_channels", "out_channels")
        if not 0 <= self.negative_slope < 1:
            raise ValueError(f"negative_slope must be in [0, 1), got {self.negative_slope}")
        if self.norm not in NORMS:
            raise ValueError(f"GeneratorConfig.norm must be one of {tuple(NORMS)}, got {self.norm!r}")


class Generator(nn.Module):
    """3D U-Net of depth 3 (thesis 3.1.1): brightfield ``[N,1,Z,Y,X]`` -> ``[N,6,Z,Y,X]``.

    Accepts any Z, Y, X >= 8: the input is reflect-padded to a multiple of 8 and the output
    cropped back, so a whole FOV is predicted in one pass without stitching.

    Args:
        cfg: a :class:`GeneratorConfig` (defaults: the thesis' 23.09 M-parameter network).
    """

    def __init__(self, cfg: GeneratorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GeneratorConfig()
        w, s, n = cfg.base_width, cfg.negative_slope, cfg.norm
        self.enc1 = ConvBlock(cfg.in_channels, w, s, n)
        self.down1 = Down(w)
        self.enc2 = ConvBlock(w, 2 * w, s, n)
        self.down2 = Down(2 * w)
        self.enc3 = ConvBlock(2 * w, 4 * w, s, n)
        self.down3 = Down(4 * w)
        self.bottleneck = ConvBlock(4 * w, 8 * w, s, n)
        self.up3 = UpCat(8 * w, 4 * w, s, n)
        self.up2 = UpCat(4 * w, 2 * w, s, n)
        self.up1 = UpCat(2 * w, w, s, n)
        self.head = Conv3d(w, cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        check_size(x.shape, "generator input")
        x, crop = pad_to_multiple(x, SIZE_MULTIPLE)  # [N, 1, Z', Y', X'], each a multiple of 8
        e1 = self.enc1(x)  # [N, w, Z', Y', X']
        e2 = self.enc2(self.down1(e1))  # [N, 2w, Z'/2, Y'/2, X'/2]
        e3 = self.enc3(self.down2(e2))  # [N, 4w, Z'/4, ...]
        b = deep_level(self.bottleneck, self.down3(e3))  # [N, 8w, Z'/8, ...]
        d3 = self.up3(b, e3)  # [N, 4w, Z'/4, ...]
        d2 = self.up2(d3, e2)  # [N, 2w, Z'/2, ...]
        d1 = self.up1(d2, e1)  # [N, w, Z', Y', X']
        return self.head(d1)[crop]  # [N, 6, Z, Y, X]


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[slice, ...]]:
    """Reflect-pad the last three axes of ``x`` up to a multiple of ``multiple`` (split evenly
    between both ends) and return the padded tensor and the index that crops it back."""
    pads, crop = [], [slice(None), slice(None)]
    for n in x.shape[2:]:
        extra = -n % multiple
        lo, hi = extra // 2, extra - extra // 2
        pads.append((lo, hi))
        crop.append(slice(lo, lo + n))
    if any(lo or hi for lo, hi in pads):
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad wants the last axis first
        x = F.pad(x, flat, mode="reflect")
    return x, tuple(crop)


# --------------------------------------------------------------------------------------------
# Critic (thesis 3.1.2, Figure 3.2)
# --------------------------------------------------------------------------------------------
@dataclass
class CriticConfig:
    """The critic's hyper-parameters; defaults are the thesis' values.

    Args:
        base_width: filters of the first block; then 2x, 4x, 8x (thesis: 64, 128, 256, 512).
        in_channels: brightfield + the six (masked) targets = 7.
        negative_slope: LeakyReLU slope, in [0, 1) (thesis: 0.05).
    """

    base_width: int = 64  # thesis 3.1.2: 64/128/256/512 filters
    in_channels: int = 7  # thesis 3.2.1: brightfield concatenated with the 6 masked targets
    negative_slope: float = 0.05  # thesis 3.2.2

    def __post_init__(self):
        _check_positive(self, "base_width", "in_channels")
        if not 0 <= self.negative_slope < 1:
            raise ValueError(f"negative_slope must be in [0, 1), got {self.negative_slope}")


class Critic(nn.Module):
    """3D PatchGAN critic of a WGAN-GP (thesis 3.1.2): a map of realness scores, not probabilities.

    Five convolutions: three ``k=4, s=2, p=1`` (w, 2w, 4w filters), then ``k=3, s=1, p=1`` to 8w
    and to 1 score per patch. LeakyReLU after the first four; InstanceNorm3d on blocks 2-4. Never
    batch norm: it couples the samples of a batch and so breaks the per-sample gradient penalty.
    The last convolution is left plain: a norm or activation on a one-channel score map would
    remove its mean, which is exactly what the Wasserstein estimate reads.

    Args:
        cfg: a :class:`CriticConfig` (defaults: the thesis' 6.2 M-parameter critic).

    ``forward(x [N,1,Z,Y,X], y [N,6,Z,Y,X])`` concatenates the pair and returns ``[N,1,Z/8,Y/8,X/8]``
    (floored); each axis must be at least 8.
    """

    def __init__(self, cfg: CriticConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CriticConfig()
        w, s = cfg.base_width, cfg.negative_slope
        self.block1 = nn.Sequential(Conv3d(cfg.in_channels, w, 4, 2, 1), nn.LeakyReLU(s))
        self.block2 = nn.Sequential(Conv3d(w, 2 * w, 4, 2, 1), InstanceNorm3d(2 * w), nn.LeakyReLU(s))
        self.block3 = nn.Sequential(Conv3d(2 * w, 4 * w, 4, 2, 1), InstanceNorm3d(4 * w), nn.LeakyReLU(s))
        self.block4 = nn.Sequential(Conv3d(4 * w, 8 * w, 3, 1, 1), InstanceNorm3d(8 * w), nn.LeakyReLU(s))
        self.score = Conv3d(8 * w, 1, 3, 1, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise ValueError(f"critic: brightfield {tuple(x.shape)} and targets {tuple(y.shape)} differ in N or Z, Y, X")
        h = torch.cat([x, y], dim=1)  # [N, 7, Z, Y, X]
        check_size(h.shape, "critic input")
        h = self.block1(h)  # [N, w, Z/2, ...]
        h = self.block2(h)  # [N, 2w, Z/4, ...]
        h = deep_level(self.block3, h)  # [N, 4w, Z/8, ...]
        h = deep_level(self.block4, h)  # [N, 8w, Z/8, ...]
        return deep_level(self.score, h)  # [N, 1, Z/8, Y/8, X/8]

    def receptive_field(self) -> int:
        """Voxels (per axis) of input seen by one output score: 54 for the thesis' critic."""
        return receptive_field(self)


# --------------------------------------------------------------------------------------------
# Velocity network of the conditional flow (Lipman et al. 2023; Liu et al. 2023)
# --------------------------------------------------------------------------------------------
@dataclass
class VelocityConfig:
    """The flow's velocity network: the generator, widened at its input to the brightfield plus the
    noisy targets, with time gains.

    Args:
        base_width: the generator's width (as :class:`GeneratorConfig`).
        out_channels: target channels (6); the input has ``1 + out_channels``.
        negative_slope: LeakyReLU slope, in [0, 1).
        time_features: sinusoidal features of the time ``t`` in [0, 1], even and >= 2.
    """

    base_width: int = 64  # = the thesis' generator
    out_channels: int = 6  # the six fluorescent channels
    negative_slope: float = 0.05  # thesis 3.2.2
    time_features: int = 32  # sin/cos pairs of t at 16 frequencies (assumption: as DiT's time embedding)

    def __post_init__(self):
        _check_positive(self, "base_width", "out_channels", "time_features")
        if self.time_features % 2 or not 0 <= self.negative_slope < 1:
            raise ValueError(f"time_features must be even and negative_slope in [0, 1), got {self.time_features}, "
                             f"{self.negative_slope}")

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(self.base_width, 1 + self.out_channels, self.out_channels, self.negative_slope)


MIN_REMAINING = 0.05  # 1 - t is clipped here: the velocity's 1 / (1 - t) stays <= 20 (Li & He 2025)


def velocity_from_clean(y1_hat: Tensor, y_t: Tensor, t) -> Tensor:
    """The straight path's velocity towards a predicted clean target: ``(ŷ_1 - y_t) / (1 - t)``."""
    return (y1_hat - y_t) / torch.clamp(1 - torch.as_tensor(t, dtype=y_t.dtype, device=y_t.device),
                                         min=MIN_REMAINING)


class VelocityNet(nn.Module):
    """The flow's network: from the brightfield and the noisy targets ``y_t`` at time ``t`` it
    predicts the clean targets ``y_1`` (:meth:`forward`); the velocity that carries noise ``y_0`` to
    the targets along the straight path is then ``(ŷ_1 - y_t) / (1 - t)`` (:meth:`velocity`).

    Predicting the clean targets rather than the velocity keeps the network's output in the
    targets' units, as the U-Net's, and puts the part of the velocity that is linear in ``y_t``
    into the formula instead of the network, whose instance norms discard the input's scale
    (x-prediction, as Li & He 2025 advocate for high-dimensional outputs).

    The network is a :class:`Generator` whose input is the brightfield and the noisy targets
    ``[N, 1 + 6, Z, Y, X]``. Time enters as a per-channel gain ``1 + g(t)`` on the input of each
    resampling convolution (the three ``Down`` and the three transposed convolutions), FiLM without
    the shift: every convolution block ends in instance norm, which removes any per-channel
    constant, so an added time bias would vanish where a gain survives. ``g`` is a small MLP on
    sinusoidal features of ``t``, its last layer zero at initialisation (the gains start at 1).

    At a fixed ``t`` a gain on a convolution's input channel is a gain on that channel's weights, so
    :meth:`at` returns a plain :class:`Generator` with the gains folded in, exactly the same function:
    whole-FOV prediction and its seam-free tiling serve each step of the ODE unchanged.

    Args:
        cfg: a :class:`VelocityConfig`.
    """

    def __init__(self, cfg: VelocityConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VelocityConfig()
        self.unet = Generator(cfg.generator_config())
        w = cfg.base_width
        self.gain_channels = (w, 2 * w, 4 * w, 8 * w, 4 * w, 2 * w)  # into down1-3, up3.up, up2.up, up1.up
        self.time = nn.Sequential(nn.Linear(cfg.time_features, 4 * w), nn.SiLU(),
                                  nn.Linear(4 * w, sum(self.gain_channels)))
        nn.init.zeros_(self.time[-1].weight)
        nn.init.zeros_(self.time[-1].bias)

    def gains(self, t: Tensor) -> list[Tensor]:
        """The six gains ``[N, C_k]`` at times ``t`` ``[N]`` (or a scalar)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.time[0].weight.device).reshape(-1)
        half = self.cfg.time_features // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))  # 1 .. 1000 rad per unit t
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)  # [N, F]
        return list(torch.split(1 + self.time(emb), self.gain_channels, dim=1))

    def forward(self, x: Tensor, y_t: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x, y_t], dim=1)  # [N, 7, Z, Y, X]
        check_size(h.shape, "velocity input")
        h, crop = pad_to_multiple(h, SIZE_MULTIPLE)
        g1, g2, g3, g4, g5, g6 = (g[:, :, None, None, None].expand(h.shape[0], -1, 1, 1, 1) for g in self.gains(t))
        u = self.unet
        e1 = u.enc1(h)  # [N, w, Z', Y', X']
        e2 = u.enc2(u.down1(e1 * g1))  # [N, 2w, Z'/2, ...]
        e3 = u.enc3(u.down2(e2 * g2))  # [N, 4w, Z'/4, ...]
        b = deep_level(u.bottleneck, u.down3(e3 * g3))  # [N, 8w, Z'/8, ...]
        d3 = u.up3(b * g4, e3)  # [N, 4w, Z'/4, ...]
        d2 = u.up2(d3 * g5, e2)  # [N, 2w, Z'/2, ...]
        d1 = u.up1(d2 * g6, e1)  # [N, w, Z', Y', X']
        return u.head(d1)[crop]  # [N, 6, Z, Y, X]

    def velocity(self, x: Tensor, y_t: Tensor, t: Tensor) -> Tensor:
        """``(ŷ_1 - y_t) / (1 - t)``, with ``1 - t`` held at :data:`MIN_REMAINING` or more."""
        t = torch.as_tensor(t, dtype=y_t.dtype, device=y_t.device).reshape(-1, *([1] * (y_t.dim() - 1)))
        return velocity_from_clean(self(x, y_t, t.reshape(-1)), y_t, t)

    def at(self, t: float) -> Generator:
        """The network at time ``t`` as a :class:`Generator` of ``[N, 7, Z, Y, X]`` inputs that
        predicts ``ŷ_1`` (gains folded into the weights), on the same device, in eval mode."""
        g = copy.deepcopy(self.unet).eval()
        with torch.no_grad():
            gains = [k[0] for k in self.gains(torch.tensor([float(t)]))]
            convs = (g.down1, g.down2, g.down3, g.up3.up, g.up2.up, g.up1.up)
            for conv, gain in zip(convs, gains):
                # Conv3d weights are [out, in, ...], ConvTranspose3d weights [in, out, ...]
                shape = (-1, 1, 1, 1, 1) if isinstance(conv, nn.ConvTranspose3d) else (1, -1, 1, 1, 1)
                conv.weight.mul_(gain.view(shape))
        return g


# --------------------------------------------------------------------------------------------
# Helpers: parameter counts, receptive field, per-block summary for the architecture figures
# --------------------------------------------------------------------------------------------
def num_params(module: nn.Module, trainable: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def receptive_field(module: nn.Module) -> int:
    """Receptive field along one axis of a plain chain of convolutions (in registration order)."""
    r, jump = 1, 1
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            k, s = m.kernel_size[0], m.stride[0]
            r += (k - 1) * jump
            jump *= s
    return r


def summarize(model: nn.Module, zyx=(32, 384, 384), batch: int = 1) -> list[dict]:
    """One row per top-level block of ``model`` for an input of spatial size ``zyx``:
    ``name``, ``kind`` (class name), ``in_shape``, ``out_shape`` (both ``C, Z, Y, X``) and ``params``.

    Runs the model on PyTorch's meta device (shapes only, no memory), so thesis-size inputs
    (default 32x384x384, the thesis' crop) are free. Input channels come from ``model.cfg``.
    """
    meta = copy.deepcopy(model).to("meta")
    rows: list[dict] = []

    def hook(name):
        def fn(mod, args, out):
            rows.append({
                "name": name,
                "kind": type(mod).__name__,
                "in_shape": tuple(args[0].shape[1:]),
                "out_shape": tuple(out.shape[1:]),
                "params": num_params(mod),
            })
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in meta.named_children()]
    c = model.cfg.in_channels
    with torch.no_grad():
        if isinstance(model, Critic):
            meta(torch.empty(batch, 1, *zyx, device="meta"), torch.empty(batch, c - 1, *zyx, device="meta"))
        else:
            meta(torch.empty(batch, c, *zyx, device="meta"))
    for h in handles:
        h.remove()
    return rows


def _check_positive(cfg, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a positive integer, got {v!r}")

"""Losses of the study (thesis 3.2.1 and Algorithm 1; Gulrajani et al. 2017).

Targets are ``N C Z Y X`` with NaN in the channels a FOV does not carry.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def valid_mask(target: Tensor) -> Tensor:
    """Boolean mask of the voxels that carry a label (not NaN)."""
    return ~torch.isnan(target)


def mask_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The thesis' ``mask``: zero the prediction where the target is NaN, and the target's NaN.

    Real and fake critic inputs built from the pair have identical empty channels, so the critic
    cannot tell them apart by counting blank channels.
    """
    valid = valid_mask(target)
    return pred * valid, torch.nan_to_num(target, nan=0.0)


def _masked_mean(pred: Tensor, target: Tensor, error: Callable[[Tensor], Tensor], name: str) -> Tensor:
    """Mean of ``error(pred - target)`` over the labelled voxels only.

    The prediction is zeroed where the target is NaN and the target's NaN become 0; the error is
    computed without reduction, masked, and averaged over the valid voxels, so missing channels
    neither count nor receive gradient.
    """
    valid = valid_mask(target)
    n = valid.sum()
    if n == 0:
        raise ValueError(f"{name}: the target carries no labelled voxel (all NaN)")
    p, t = mask_pair(pred, target)
    return (error(p - t) * valid).sum() / n


def masked_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over the labelled voxels only (thesis 3.2.1)."""
    return _masked_mean(pred, target, torch.abs, "masked_l1")


def masked_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the labelled voxels only (the loss of Ounkomol et al. 2018, masked
    as :func:`masked_l1`)."""
    return _masked_mean(pred, target, torch.square, "masked_mse")


def masked_l1_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Masked L1 plus masked MSE, unweighted (both in units of the z-scored target)."""
    return masked_l1(pred, target) + masked_mse(pred, target)


# The generator's pixel losses by name (``UNetConfig.loss``); "l1" is the thesis' (3.2.1).
PIXEL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": masked_l1, "mse": masked_mse, "l1+mse": masked_l1_mse}


def wasserstein_estimate(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """The critic's estimate of the Wasserstein distance: mean D(real) - mean D(fake)."""
    return d_real.mean() - d_fake.mean()


def gradient_penalty(critic, x: Tensor, y_real: Tensor, y_fake: Tensor) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017, eq. 3), conditioned on the brightfield ``x``.

    Interpolates between the real and the fake *targets*, ``ŷ = ε·y + (1-ε)·ỹ`` with one
    ``ε ~ U[0, 1]`` per sample (the thesis' Algorithm 1 writes ``ε·x``, a typo), and penalises
    ``(||∇_ŷ D(x, ŷ)||₂ - 1)²`` averaged over the batch. ``critic(x, y)`` takes the brightfield
    and the (masked) targets.

    The critic is a PatchGAN: it returns a map of P patch scores per sample. The penalty is on the
    gradient of their *sum* (``grad_outputs`` of ones, as in most PatchGAN WGAN-GP code), while the
    critic and adversarial losses use the *mean* score. The mean is then held to a Lipschitz
    constant of about 1/P, which makes λ_adv a gentler pull the larger the crop (measured: the
    adversarial gradient at the generator output is ~0.15x the L1 gradient at 16x64x64 with
    λ_adv 0.05). A penalty on the mean gave ~17x there in an early CPU run. The thesis does not
    say which it used; ``WGANConfig.adv_weighting = "balanced"`` fixes the ratio directly instead.
    """
    eps = torch.rand(y_real.shape[0], *([1] * (y_real.dim() - 1)), device=y_real.device, dtype=y_real.dtype)
    y_hat = (eps * y_real + (1 - eps) * y_fake.detach()).requires_grad_(True)
    scores = critic(x, y_hat)
    (grad,) = torch.autograd.grad(scores.sum(), y_hat, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return ((norms - 1) ** 2).mean()

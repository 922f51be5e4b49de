"""Whole-volume prediction one layer at a time: tiled, bounded in memory, and exact.

A volume too large for one forward pass (:func:`vstain.inference.infer.predict_volume` decides by a memory
budget) is predicted here one convolution at a time. Each convolution runs over the whole volume in
Y-X tiles that span all of Z, reading a one-voxel halo of its input. Its output is written to a
float32 file in a scratch folder *before* normalisation, and each tile's per-channel mean and
variance are merged in float64 into the whole volume's. When the next layer reads a tile, the
InstanceNorm normalises it with the whole volume's mean and variance, as the one-pass prediction
does. The result therefore equals the one-pass prediction to float32 rounding everywhere, tile
borders included: no receptive-field halo, no blending, about the arithmetic of one forward pass,
plus the disk traffic.

The data flow mirrors :meth:`vstain.models.Generator.forward`. A *source* returns any box
``[C, Z, y0:y1, x0:x1]`` of one resolution level's activation:

- :class:`Memory`: a tensor held in memory (the padded input);
- :class:`Stored`: a convolution's output on disk, normalised and activated as it is read;
- :class:`Recomputed`: the first convolution (1 input channel, cheap), recomputed as it is read;
- :class:`Down` / :class:`Up`: the stride-2 convolution and transposed convolution, computed as read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vstain.models import SIZE_MULTIPLE, Generator, pad_to_multiple

FLOAT = 4  # bytes of a float32


class Moments:
    """Per-channel mean and (biased) variance of a volume seen tile by tile: each tile's own
    ``var_mean`` merged in float64 on the CPU (any device's tiles) by Chan et al.'s pairwise
    update, so no tile is read twice."""

    def __init__(self, channels: int):
        self.n, self.mean = 0, torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros_like(self.mean)  # sum of squared deviations from the mean

    def add(self, t: Tensor) -> None:
        """Add a tile ``[C, ...]``."""
        var, mean = (v.cpu().double() for v in torch.var_mean(t, tuple(range(1, t.dim())), correction=0))
        k = t[0].numel()
        delta, n = mean - self.mean, self.n + k
        self.mean += delta * (k / n)
        self.m2 += var * k + delta * delta * (self.n * k / n)
        self.n = n

    def var(self) -> Tensor:
        return self.m2 / self.n


class Activate:
    """The ``norm -> LeakyReLU`` that follows a convolution in a ConvBlock, applied to a tile.

    InstanceNorm uses the whole volume's per-channel mean and variance (:class:`Moments`, the
    layer's ``eps``); BatchNorm (eval mode) uses its running statistics, which do not depend on the
    tile.
    """

    def __init__(self, norm: nn.Module, act: nn.Module, moments: Moments, device):
        self.norm, self.act = norm, act
        self.mean = moments.mean.float()[:, None, None, None].to(device)  # [C, 1, 1, 1]
        self.inv = torch.rsqrt(moments.var() + norm.eps).float()[:, None, None, None].to(device)

    def __call__(self, t: Tensor) -> Tensor:
        """Normalise and activate a freshly read tile ``[C, ...]``, in place where possible."""
        if isinstance(self.norm, nn.InstanceNorm3d):
            t = t.sub_(self.mean).mul_(self.inv)
        else:
            t = self.norm(t[None])[0]
        return F.leaky_relu_(t, self.act.negative_slope) if isinstance(self.act, nn.LeakyReLU) else self.act(t)


class Memory:
    """A ``[C, Z, Y, X]`` tensor held in memory."""

    def __init__(self, t: Tensor, device):
        self.t, self.device = t, device
        self.channels, self.shape = t.shape[0], tuple(t.shape[1:])

    def read(self, y0, y1, x0, x1) -> Tensor:
        return self.t[:, :, y0:y1, x0:x1].to(self.device)


class Stored:
    """A convolution's pre-norm output ``[C, Z, Y, X]`` in a float32 file laid out ``(Z, Y, X, C)``,
    the channels-last order the convolutions run in: a Y-X box is one contiguous run per (z, y) and
    needs no transposition. :meth:`read` applies ``activate`` (set once the whole volume's
    statistics are known)."""

    def __init__(self, path: Path, channels: int, shape, device):
        self.path, self.channels, self.shape, self.device = path, channels, tuple(shape), device
        self.activate: Activate | None = None
        z, y, x = self.shape
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, z * y * x * channels * FLOAT)

    def _offset(self, z: int, y: int, x: int) -> int:
        return ((z * self.shape[1] + y) * self.shape[2] + x) * self.channels * FLOAT

    def write(self, y0: int, x0: int, t: Tensor) -> None:
        a = t.permute(1, 2, 3, 0).contiguous().cpu().numpy()  # [Z, h, w, C]; no copy when channels-last
        for z, plane in enumerate(a):
            for i, run in enumerate(plane):
                if os.pwrite(self.fd, run, self._offset(z, y0 + i, x0)) != run.nbytes:
                    raise OSError(f"short write to {self.path}: is its disk full?")

    def read(self, y0, y1, x0, x1) -> Tensor:
        a = np.empty((self.shape[0], y1 - y0, x1 - x0, self.channels), np.float32)
        for z, plane in enumerate(a):
            for i, run in enumerate(plane):
                if os.preadv(self.fd, [run], self._offset(z, y0 + i, x0)) != run.nbytes:
                    raise OSError(f"short read from {self.path}: the scratch file was truncated")
        t = torch.from_numpy(a).to(self.device).permute(3, 0, 1, 2)  # [C, Z, h, w], channels-last
        return self.activate(t) if self.activate is not None else t

    def remove(self) -> None:
        """Close and delete the file (again: nothing)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)


class Recomputed:
    """A convolution of in-memory inputs, recomputed (then activated) for every box it is read at."""

    def __init__(self, conv: nn.Conv3d, inputs: list):
        self.conv, self.inputs = conv, inputs
        self.channels, self.shape = conv.out_channels, inputs[0].shape
        self.activate: Activate | None = None

    def read(self, y0, y1, x0, x1) -> Tensor:
        t = conv3x3(self.conv, self.inputs, (y0, y1, x0, x1))
        return self.activate(t) if self.activate is not None else t


class Down:
    """``Conv3d(k=2, s=2)`` of a source one level up (twice the size), computed as read."""

    def __init__(self, conv: nn.Conv3d, src):
        self.conv, self.src = conv, src
        self.channels, self.shape = conv.out_channels, tuple(s // 2 for s in src.shape)

    def read(self, y0, y1, x0, x1) -> Tensor:
        t = self.src.read(2 * y0, 2 * y1, 2 * x0, 2 * x1)
        return F.conv3d(t[None], self.conv.weight, self.conv.bias, stride=2)[0]


class Up:
    """``ConvTranspose3d(k=2, s=2)`` of a source one level down (half the size), computed as read:
    output voxel ``i`` depends on input voxel ``i // 2`` only."""

    def __init__(self, conv: nn.ConvTranspose3d, src):
        self.conv, self.src = conv, src
        self.channels, self.shape = conv.out_channels, tuple(2 * s for s in src.shape)

    def read(self, y0, y1, x0, x1) -> Tensor:
        a0, b0 = y0 // 2, x0 // 2
        t = self.src.read(a0, -(-y1 // 2), b0, -(-x1 // 2))
        t = F.conv_transpose3d(t[None], self.conv.weight, self.conv.bias, stride=2)[0]
        return t[:, :, y0 - 2 * a0:y1 - 2 * a0, x0 - 2 * b0:x1 - 2 * b0]


def channels_last(shape, **kw) -> Tensor:
    """A zero ``[C, Z, Y, X]`` tensor stored channels-last (memory order Z, Y, X, C): CPU
    convolutions run about twice as fast on it as on the default order."""
    c, *zyx = shape
    return torch.zeros((*zyx, c), **kw).permute(3, 0, 1, 2)


def conv3x3(conv: nn.Conv3d, inputs: list, box) -> Tensor:
    """``conv`` (k=3, padding 1) of the channel-concatenated ``inputs`` over the Y-X ``box``
    ``(y0, y1, x0, x1)``, all of Z: reads a one-voxel halo, zero outside the volume (the
    convolution's own zero padding). Returns ``[C_out, Z, y1-y0, x1-x0]``, channels-last."""
    y0, y1, x0, x1 = box
    z, ny, nx = inputs[0].shape
    a0, a1, b0, b1 = max(y0 - 1, 0), min(y1 + 1, ny), max(x0 - 1, 0), min(x1 + 1, nx)
    w = conv.weight
    buf = channels_last((sum(s.channels for s in inputs), z, y1 - y0 + 2, x1 - x0 + 2), dtype=w.dtype, device=w.device)
    c = 0
    for s in inputs:
        buf[c:c + s.channels, :, a0 - y0 + 1:a1 - y0 + 1, b0 - x0 + 1:b1 - x0 + 1] = s.read(a0, a1, b0, b1)
        c += s.channels
    w = w.contiguous(memory_format=torch.channels_last_3d)
    return F.conv3d(buf[None], w, conv.bias, padding=(1, 0, 0))[0]


def tile_bounds(size: int, tile: int) -> list[int]:
    """Edges ``[0, ..., size]`` of ``ceil(size / tile)`` near-equal tiles along a padded axis, on the
    8-voxel grid so that every resolution level (down to 1/8) has the same tiles."""
    n = max(1, -(-size // max(tile, SIZE_MULTIPLE)))
    return sorted({round(i * size / n / SIZE_MULTIPLE) * SIZE_MULTIPLE for i in range(n)} | {size})


class _Pass:
    """The convolutions of one prediction, run over the whole volume tile by tile."""

    def __init__(self, folder: Path, bounds, device, progress: bool, total: int):
        self.folder, self.bounds, self.device = folder, bounds, device
        self.bar = tqdm(total=total, desc="layerwise", unit="conv", disable=not progress)
        self.stores: list[Stored] = []  # every file opened, closed by close() even after an error

    def close(self) -> None:
        for s in self.stores:
            s.remove()
        self.bar.close()

    def boxes(self, level: int):
        """The Y-X tiles of resolution ``level`` (1/2**level of the padded volume)."""
        f = 2 ** level
        by, bx = ([b // f for b in bounds] for bounds in self.bounds)
        for y0, y1 in zip(by, by[1:]):
            for x0, x1 in zip(bx, bx[1:]):
                yield y0, y1, x0, x1

    def conv(self, conv: nn.Conv3d, inputs: list, level: int, store: bool = True):
        """Run ``conv`` over the volume and gather the :class:`Moments` of its output. Returns a
        :class:`Stored` output, or a :class:`Recomputed` one when ``store`` is False, and the moments."""
        out = None
        if store:
            out = Stored(self.folder / f"{len(self.stores):02d}.f32", conv.out_channels, inputs[0].shape, self.device)
            self.stores.append(out)
        moments = Moments(conv.out_channels)
        for box in self.boxes(level):
            t = conv3x3(conv, inputs, box)
            moments.add(t)
            if out is not None:
                out.write(box[0], box[2], t)
        self.bar.update()
        return (out or Recomputed(conv, inputs)), moments

    def block(self, block: nn.Sequential, inputs: list, level: int, free: tuple = ()):
        """A ConvBlock ``conv -> norm -> act -> conv -> norm -> act``; ``free``: stores no longer
        needed once the first convolution has read them."""
        recompute = all(isinstance(s, Memory) for s in inputs)  # the first layer: 1 channel in, cheap
        a, moments = self.conv(block[0], inputs, level, store=not recompute)
        a.activate = Activate(block[1], block[2], moments, self.device)
        for s in free:
            s.remove()
        b, moments = self.conv(block[3], [a], level)
        b.activate = Activate(block[4], block[5], moments, self.device)
        if isinstance(a, Stored):
            a.remove()
        return b

    def head(self, conv: nn.Conv3d, src, out: Tensor) -> Tensor:
        """The last convolution, written into ``out [C, Z, Y, X]`` in memory."""
        for y0, y1, x0, x1 in self.boxes(0):
            out[:, :, y0:y1, x0:x1] = conv3x3(conv, [src], (y0, y1, x0, x1)).float().cpu()
        self.bar.update()
        return out


def scratch_bytes(generator: Generator, padded_zyx) -> int:
    """Disk the scratch folder needs at most: the full-resolution decoder holds its input's upper
    half (the skip, w channels) and lower half (2w channels at 1/8 the voxels) beside its first
    convolution's output (w), i.e. 2.25 full-resolution stores, plus a margin."""
    return int(2.5 * generator.cfg.base_width * np.prod(padded_zyx) * FLOAT)


class ScratchSpaceError(OSError):
    """The scratch folder's disk has too little room for a layerwise prediction."""


def predict_layerwise(generator: Generator, x: Tensor, tile, workdir=None, progress: bool = False) -> Tensor:
    """Predict ``x [1, 1, Z, Y, X]`` one convolution at a time over Y-X tiles of about
    ``tile = (ty, tx)`` voxels (:func:`tile_bounds`; all of Z), with every InstanceNorm using
    whole-volume statistics.

    The volume is reflect-padded to multiples of 8 as the one-pass prediction pads it. Scratch files
    (:func:`scratch_bytes` at most) go to a temporary folder under ``workdir`` (default: the system's
    temporary folder; where that is in memory, as a tmpfs, pass a disk) that is removed afterwards,
    after an error too. ``generator`` must be in eval mode. Returns ``[1, 6, Z, Y, X]`` float32 on
    the CPU.

    Raises:
        ScratchSpaceError: the disk of ``workdir`` has less free space than :func:`scratch_bytes`.
    """
    if not isinstance(generator, Generator):
        raise TypeError(f"layerwise prediction needs a vstain Generator, got {type(generator).__name__}")
    if generator.training:
        raise ValueError("layerwise prediction needs the generator in eval mode (batch norm would use tile statistics)")
    if any(isinstance(m, nn.InstanceNorm3d) and (m.affine or m.track_running_stats) for m in generator.modules()):
        raise ValueError("layerwise prediction supports InstanceNorm3d without affine parameters or running statistics")
    xp, crop = pad_to_multiple(x, SIZE_MULTIPLE)  # [1, 1, Z', Y', X']
    padded = tuple(xp.shape[2:])
    root = Path(workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    need, free = scratch_bytes(generator, padded), shutil.disk_usage(root).free
    if need > free:
        raise ScratchSpaceError(f"layerwise prediction of a {padded} volume needs about {need / 2**30:.1f} GiB of "
                                f"scratch space in {root}, which has {free / 2**30:.1f} GiB free: choose a folder on "
                                f"a larger disk (workdir=, or --scratch of vstain predict)")
    g, device = generator, next(generator.parameters()).device
    bounds = [tile_bounds(n, int(t)) for n, t in zip(padded[1:], tile)]
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="vstain-layerwise-", dir=root) as folder:
        run = _Pass(Path(folder), bounds, device, progress, total=15)
        try:
            e1 = run.block(g.enc1, [Memory(xp[0], device)], 0)  # [w, Z', Y', X']
            e2 = run.block(g.enc2, [Down(g.down1, e1)], 1)  # [2w, Z'/2, ...]
            e3 = run.block(g.enc3, [Down(g.down2, e2)], 2)  # [4w, Z'/4, ...]
            b = run.block(g.bottleneck, [Down(g.down3, e3)], 3)  # [8w, Z'/8, ...]
            d3 = run.block(g.up3.conv, [Up(g.up3.up, b), e3], 2, free=(b, e3))  # [4w, Z'/4, ...]
            d2 = run.block(g.up2.conv, [Up(g.up2.up, d3), e2], 1, free=(d3, e2))  # [2w, Z'/2, ...]
            d1 = run.block(g.up1.conv, [Up(g.up1.up, d2), e1], 0, free=(d2, e1))  # [w, Z', Y', X']
            out = run.head(g.head, d1, torch.empty((g.cfg.out_channels, *padded), dtype=torch.float32))
        finally:
            run.close()  # every scratch file closed and deleted, also after an error
    return out[None][crop]

"""Denoising of the target channels: Noise2Void through careamics.

Thesis 2.2.2 denoises the target fluorescence with Noise2Void (Krull et al. 2019): a U-Net
trained on the noisy stacks themselves, with a random subset of pixels masked (their values
replaced by a neighbour's) so that the network cannot learn the identity and has to predict each
pixel from its surroundings. This module is the project's only importer of careamics (imported
lazily, so that the focus stage does not pay for it); nothing here talks to the network (no
BioImage Model Zoo export or download is ever called).

Memory: careamics reads training patches from :class:`DiskStack` s, windows of the FOV files on
disk, one patch at a time (careamics' ``ImageStackLoading``), and :class:`N2VModel` denoises one
stack per call, so a channel carried by hundreds of FOVs trains and predicts with one FOV in
memory, not all of them.

The classical denoisers it is compared with, and the score against the clean truth, are in
:mod:`vstain.preprocess.classical`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tifffile

MODEL_CKPT = "model.ckpt"
KEY_JSON = "key.json"


def _pow2_ge8(v: int) -> bool:
    return v >= 8 and (v & (v - 1)) == 0


@dataclass
class N2VConfig:
    """Noise2Void training and tiled prediction, one model per target channel.

    Args:
        patch_size: training patch ``(Z, Y, X)``; each a power of 2 and >= 8, Y == X
            (careamics' constraints). Krull et al. use 64 in YX; 3D examples (16, 64, 64).
        batch_size: patches per training step, and tiles per prediction batch.
        epochs: passes over the training patches.
        steps_per_epoch: batches per epoch (``None``: every patch once).
        depth: U-Net levels (careamics default 2).
        base_width: channels of the first U-Net level (careamics ``num_channels_init``, default 32).
        batch_norm: batch normalisation in the U-Net (careamics default True; its running statistics
            need some hundred steps to settle, so very short trainings predict better without it).
        masked_pixel_percentage: percent of pixels masked per patch (careamics default 0.2).
        roi_size: side of the neighbourhood a masked pixel's replacement is drawn from (default 11).
        n_val_patches: patches careamics holds out of the training data for validation (when the
            stacks are too small for that, validation runs on the training stacks).
        learning_rate: Adam learning rate (careamics default 1e-4).
        tile_size: prediction tile ``(Z, Y, X)``, same constraints as ``patch_size``.
        tile_overlap: overlap between tiles ``(Z, Y, X)``; even, smaller than the tile.
        seed: seeds patches, masking and weights.
        channels_last: the U-Net's weights in ``channels_last_3d`` layout: on a CPU, training runs
            ~2.5x faster (``benchmarks/bench_n2v.py``); equivalent, not bit-identical.
    """

    patch_size: tuple[int, int, int] = (16, 64, 64)
    batch_size: int = 8
    epochs: int = 20
    steps_per_epoch: int | None = None
    depth: int = 2
    base_width: int = 32
    batch_norm: bool = True
    masked_pixel_percentage: float = 0.2
    roi_size: int = 11
    n_val_patches: int = 8
    learning_rate: float = 1e-4
    tile_size: tuple[int, int, int] = (16, 64, 64)
    tile_overlap: tuple[int, int, int] = (4, 16, 16)
    seed: int = 0
    channels_last: bool = True

    def __post_init__(self):
        self.patch_size = tuple(int(v) for v in self.patch_size)
        self.tile_size = tuple(int(v) for v in self.tile_size)
        self.tile_overlap = tuple(int(v) for v in self.tile_overlap)
        for name in ("patch_size", "tile_size"):
            v = getattr(self, name)
            if len(v) != 3 or not all(_pow2_ge8(s) for s in v) or v[1] != v[2]:
                raise ValueError(f"N2VConfig.{name} must be 3 powers of 2, each >= 8, with Y == X (Z, Y, X); got {v}")
        pairs = zip(self.tile_overlap, self.tile_size)
        if len(self.tile_overlap) != 3 or any(o % 2 or o < 0 or o >= t for o, t in pairs):
            raise ValueError(f"N2VConfig.tile_overlap must be 3 even values, each >= 0 and < tile_size "
                             f"{self.tile_size}; got {self.tile_overlap}")
        if self.epochs < 1 or self.batch_size < 1 or self.n_val_patches < 1:
            raise ValueError(f"N2VConfig: epochs, batch_size and n_val_patches must be >= 1; got "
                             f"{self.epochs}, {self.batch_size}, {self.n_val_patches}")
        if not 0 < self.masked_pixel_percentage <= 100:
            raise ValueError(f"masked_pixel_percentage must be in (0, 100], got {self.masked_pixel_percentage}")


# ----------------------------------------------------------------------------- careamics adapter


@contextlib.contextmanager
def _quiet(log_path: Path):
    """Keep careamics' and Lightning's console output out of the notebook: prints and progress
    bars go to ``log_path``, warnings are written there too, and log records below ERROR are
    dropped for the duration (careamics' loggers hold their own handlers on the real stderr)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    previous = logging.root.manager.disable
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)
            for w in caught:
                f.write(f"warning: {w.category.__name__}: {w.message}\n")


def _careamics_config(cfg: N2VConfig, channel: str, device: str, precision: str = "32-true"):
    from careamics.config import create_advanced_n2v_config

    accelerator = "gpu" if str(device).startswith("cuda") else "cpu"
    return create_advanced_n2v_config(
        experiment_name=f"n2v_{channel}",
        data_type="custom",  # stacks come through _image_stacks: DiskStacks or in-memory arrays
        axes="ZYX",
        patch_size=list(cfg.patch_size),
        batch_size=cfg.batch_size,
        num_epochs=cfg.epochs,
        num_steps=cfg.steps_per_epoch,
        augmentations=["x_flip", "y_flip"],
        n_val_patches=cfg.n_val_patches,
        roi_size=cfg.roi_size,
        masked_pixel_percentage=cfg.masked_pixel_percentage,
        model_params={"depth": cfg.depth, "num_channels_init": cfg.base_width, "use_batch_norm": cfg.batch_norm},
        optimizer_params={"lr": cfg.learning_rate},
        num_workers=0,
        trainer_params={"accelerator": accelerator, "devices": 1, "enable_model_summary": False,
                        "log_every_n_steps": 1, "precision": precision},
        seed=cfg.seed + 1,  # careamics requires a seed > 0
    )


class DiskStack:
    """One channel of a ``[C, Z, Y, X]`` volume file, cropped to the slices ``[z_lo, z_hi)`` and read
    from disk patch by patch: a careamics ``ImageStack`` with ``data_shape`` ``(1, 1, z, Y, X)``
    (``S C Z Y X``).

    Each patch maps the file anew and lets the mapping go, so a training that draws patches from
    any number of FOVs holds one patch of them in memory (and in the process' resident pages).

    Args:
        path: an uncompressed TIFF holding a ``[C, Z, Y, X]`` volume, as
            :func:`vstain.volumes.write_volume` writes it.
        channel: the channel, an index into ``C``.
        z_lo, z_hi: the slices kept (the focus window), ``0 <= z_lo < z_hi <= Z``.
        name: names the stack in errors (the FOV id; default the file name).
    """

    original_axes = "ZYX"

    def __init__(self, path: str | Path, channel: int, z_lo: int, z_hi: int, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        try:
            mm = tifffile.memmap(self.path, mode="r")
        except (ValueError, tifffile.TiffFileError) as e:
            raise ValueError(f"{self.path}: cannot be read patch by patch ({e}); Noise2Void streams its "
                             "patches from uncompressed TIFFs such as vstain.volumes.write_volume writes") from e
        if mm.ndim != 4 or not 0 <= channel < mm.shape[0] or not 0 <= z_lo < z_hi <= mm.shape[1]:
            raise ValueError(f"{self.path}: a volume of shape {mm.shape} (expected [C, Z, Y, X]) has no "
                             f"channel {channel} with slices [{z_lo}, {z_hi})")
        _, nz, ny, nx = mm.shape
        self.channel, self.z_lo, self.z_hi = int(channel), int(z_lo), int(z_hi)
        self.data_dtype = mm.dtype
        self.shape = self.original_data_shape = (self.z_hi - self.z_lo, ny, nx)
        self.source, self.data_shape = self.path, (1, 1, *self.shape)  # careamics' ImageStack attributes
        self._offset = mm.offset + (self.channel * nz + self.z_lo) * ny * nx * mm.dtype.itemsize
        del mm

    def _map(self) -> np.memmap:
        return np.memmap(self.path, self.data_dtype, "r", offset=self._offset, shape=self.shape)

    def read(self) -> np.ndarray:
        """The whole window ``[z, Y, X]``, float32, in memory."""
        return np.array(self._map(), dtype=np.float32)

    def extract_patch(self, sample_idx: int, channels, coords, patch_size) -> np.ndarray:
        """careamics' ``ImageStack.extract_patch``: the patch ``[1, pz, py, px]`` whose corner is
        ``coords`` (Z, Y, X), zero-padded where it leaves the window."""
        from careamics.dataset.image_stack.image_utils.image_stack_utils import pad_patch

        if sample_idx != 0 or (channels is not None and list(channels) != [0]):
            raise ValueError(f"{self.name}: a DiskStack holds one sample of one channel, "
                             f"asked for sample {sample_idx}, channels {channels}")
        box = tuple(slice(max(c, 0), min(c + p, n)) for c, p, n in zip(coords, patch_size, self.shape))
        data = np.array(self._map()[box], dtype=np.float32)[None]
        return pad_patch(coords, patch_size, self.data_shape, data)


Stack = np.ndarray | DiskStack


def _image_stacks(source: list[Stack], axes: str) -> list:
    """careamics ``ImageStackLoader``: DiskStacks as they are, in-memory ``[Z, Y, X]`` arrays as
    careamics' own ``InMemoryImageStack``."""
    from careamics.dataset.image_stack import InMemoryImageStack

    return [s if isinstance(s, DiskStack) else InMemoryImageStack.from_array(s, axes) for s in source]


def _read(stack: Stack) -> np.ndarray:
    return stack.read() if isinstance(stack, DiskStack) else stack


def _check_stacks(stacks: list[Stack], channel: str, cfg: N2VConfig) -> list[Stack]:
    """Shapes checked; arrays as float32. NaN is checked by :func:`_digest`, which reads every stack."""
    if not stacks:
        raise ValueError(f"Noise2Void for channel '{channel}': no stack to train on")
    out = []
    for i, s in enumerate(stacks):
        s = s if isinstance(s, DiskStack) else np.asarray(s, dtype=np.float32)
        if len(s.shape) != 3:
            raise ValueError(f"Noise2Void for channel '{channel}': stack {i} is not [Z, Y, X] (shape {s.shape})")
        if any(p > n for p, n in zip(cfg.patch_size, s.shape)):
            raise ValueError(
                f"Noise2Void for channel '{channel}': patch_size {cfg.patch_size} does not fit stack {i} "
                f"of shape {s.shape} (Z, Y, X); lower patch_size"
            )
        out.append(s)
    return out


def _digest(stacks: list[Stack], channel: str) -> str:
    """SHA-256 of the stacks' shapes and values, read one at a time; a stack with NaN/inf is an error."""
    h = hashlib.sha256()
    for i, s in enumerate(stacks):
        a = np.ascontiguousarray(_read(s), dtype=np.float32)
        if not np.isfinite(a).all():
            where = f" ({s.name})" if isinstance(s, DiskStack) else ""
            raise ValueError(
                f"Noise2Void for channel '{channel}': stack {i}{where} holds NaN/inf; pass only the FOVs that "
                "carry this channel"
            )
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def model_key(cfg: N2VConfig, digest: str, device: str = "cpu", precision: str = "32-true") -> str:
    """Hash of the parameters, device, precision, careamics' version and the training stacks'
    :func:`_digest`: a trained model is reused when it matches."""
    from careamics import __version__ as cv

    params = {**asdict(cfg), "device": str(device), "precision": precision, "careamics": cv, "data": digest}
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _validation_data(stacks: list[Stack], cfg: N2VConfig) -> list[Stack] | None:
    """``None`` (careamics holds ``n_val_patches`` whole grid patches out of the training data) when
    the stacks hold more whole patches than that; else the training stacks themselves, since
    careamics 0.3.5 cannot split small stacks (its count includes partial grid patches). N2V's
    validation loss is measured on noisy pixels either way: a monitor, not a quality measure."""
    whole = sum(int(np.prod([n // p for n, p in zip(s.shape, cfg.patch_size)])) for s in stacks)
    return None if whole > cfg.n_val_patches else stacks


def read_losses(work_dir: Path) -> list[dict]:
    """The rows of careamics' CSV log (metrics.csv) of the latest run in ``work_dir``."""
    import csv

    files = sorted(work_dir.glob("csv_logs/*/version_*/metrics.csv"))
    if not files:
        return []
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


@dataclass
class N2VModel:
    """One channel's trained (or reused) Noise2Void model; :meth:`denoise` takes one stack at a time."""

    channel: str
    careamist: object
    cfg: N2VConfig
    reused: bool
    train_s: float
    checkpoint: Path
    log: Path
    losses: list[dict] = field(default_factory=list)

    def denoise(self, stack: Stack) -> np.ndarray:
        """The denoised ``[Z, Y, X]`` float32 of one stack (an array or a :class:`DiskStack`), tiled
        with ``cfg.tile_size`` and ``cfg.tile_overlap``.

        Raises:
            RuntimeError: careamics failed; the message names the channel and carries the cause.
        """
        s = np.asarray(_read(stack), dtype=np.float32)
        try:
            with _quiet(self.log):
                preds, _ = self.careamist.predict(s, data_type="array", axes="ZYX", tile_size=self.cfg.tile_size,
                                                  tile_overlap=self.cfg.tile_overlap, checkpoint=self.checkpoint,
                                                  batch_size=self.cfg.batch_size)
        except Exception as e:
            raise RuntimeError(
                f"Noise2Void prediction for channel '{self.channel}' failed in careamics ({type(e).__name__}: {e}) "
                f"on a stack of shape {s.shape}, tile_size {self.cfg.tile_size}; careamics' log: {self.log}"
            ) from e
        out = np.asarray(preds[0], dtype=np.float32).reshape(s.shape)
        if not np.isfinite(out).all():
            raise RuntimeError(
                f"Noise2Void for channel '{self.channel}' predicted {int((~np.isfinite(out)).sum())} non-finite "
                f"voxels: its training diverged (see its losses in {self.log.parent}); with bf16-mixed on a CPU, "
                "feature maps 2 slices deep give unrepeatable weight gradients: use a patch of at least 16 slices "
                "or 32-true")
        return out


def _laid_out(careamist, cfg: N2VConfig):
    """``careamist`` with its U-Net in the memory layout of ``N2VConfig.channels_last``."""
    if cfg.channels_last:
        import torch
        careamist.model.model.to(memory_format=torch.channels_last_3d)
    return careamist


def train_n2v(
    stacks: list[Stack], channel: str, work_dir: str | Path, cfg: N2VConfig, device: str = "cpu",
    precision: str = "32-true",
) -> N2VModel:
    """Train (or reuse) a Noise2Void model on one channel's stacks.

    careamics draws its training patches straight from the stacks (for :class:`DiskStack` s, from
    disk, a patch at a time); the stacks are read whole only one at a time, to check and hash them.

    Args:
        stacks: the channel's focus-cropped ``[Z, Y, X]`` stacks (arrays or :class:`DiskStack` s), raw
            intensities, no NaN.
        channel: the target channel's name (names the model and the errors).
        work_dir: careamics' folder for this channel (checkpoints, CSV logs, ``train.log``);
            ``model.ckpt`` and ``key.json`` mark a finished model, reused when the key matches.
        cfg: training and tiling parameters.
        device: ``"cpu"`` or ``"cuda"``.
        precision: Lightning precision for training and prediction (``"32-true"``, ``"bf16-mixed"``).

    Raises:
        RuntimeError: careamics failed; the message names the channel and carries the cause.
    """
    from careamics import CAREamist, ImageStackLoading

    stacks = _check_stacks(stacks, channel, cfg)
    key = model_key(cfg, _digest(stacks, channel), device, precision)
    work_dir = Path(work_dir)
    ckpt = work_dir / MODEL_CKPT
    log = work_dir / "train.log"
    try:
        done = ckpt.exists() and (work_dir / KEY_JSON).exists()
        if done and json.loads((work_dir / KEY_JSON).read_text()).get("key") == key:
            with _quiet(log):
                model = _laid_out(CAREamist(checkpoint_path=ckpt, work_dir=work_dir, enable_progress_bar=False), cfg)
            train_s = float(json.loads((work_dir / KEY_JSON).read_text()).get("train_s", 0.0))
            return N2VModel(channel, model, cfg, True, train_s, ckpt, log, read_losses(work_dir))
        if work_dir.exists():
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        with _quiet(log):
            model = _laid_out(CAREamist(_careamics_config(cfg, channel, device, precision), work_dir=work_dir,
                                        enable_progress_bar=False), cfg)
            model.train(train_data=stacks, val_data=_validation_data(stacks, cfg),
                        loading=ImageStackLoading(_image_stacks))
        train_s = time.perf_counter() - t0
        last = sorted(work_dir.glob("checkpoints/*/*_last.ckpt"))
        if not last:
            raise RuntimeError("training ended without a last checkpoint")
        shutil.copy2(last[-1], ckpt)
    except Exception as e:
        raise RuntimeError(
            f"Noise2Void for channel '{channel}' failed in careamics ({type(e).__name__}: {e}). "
            f"{len(stacks)} stacks of shape {stacks[0].shape}, patch_size {cfg.patch_size}, "
            f"n_val_patches {cfg.n_val_patches}; careamics' log: {log}"
        ) from e
    info = {"key": key, "params": asdict(cfg), "channel": channel, "n_stacks": len(stacks),
            "train_s": round(train_s, 2)}
    (work_dir / KEY_JSON).write_text(json.dumps(info, indent=2))
    return N2VModel(channel, model, cfg, False, train_s, ckpt, log, read_losses(work_dir))


def train_and_denoise(
    stacks: list[Stack], channel: str, work_dir: str | Path, cfg: N2VConfig, device: str = "cpu",
    precision: str = "32-true",
) -> tuple[N2VModel, list[np.ndarray]]:
    """:func:`train_n2v`, then every stack denoised, all kept in memory (for a few stacks; stage 03
    denoises FOV by FOV with :meth:`N2VModel.denoise`). Arguments as :func:`train_n2v`."""
    model = train_n2v(stacks, channel, work_dir, cfg, device, precision)
    return model, [model.denoise(s) for s in stacks]


# ----------------------------------------------------------------------------- blind spot (Fig 2.2)


def blind_spot_mask(patch: np.ndarray, masked_pixel_percentage: float = 0.2, roi_size: int = 11,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """careamics' own N2V pixel manipulation (``uniform_manipulate``) on one 2D or 3D patch.

    Returns ``(masked, mask)``: the patch with the selected pixels replaced by a random neighbour
    within ``roi_size`` (never themselves), and the 0/1 mask of the selected pixels.
    """
    import torch
    from careamics.lightning.modules.n2v_utils.pixel_manipulation import uniform_manipulate

    t = torch.as_tensor(np.asarray(patch, dtype=np.float32))[None]
    rng = torch.Generator().manual_seed(int(seed))
    masked, mask = uniform_manipulate(t, masked_pixel_percentage, subpatch_size=roi_size, rng=rng)
    return masked[0].numpy(), mask[0].numpy().astype(bool)


def receptive_field(cfg: N2VConfig, shape: tuple[int, ...], checkpoint: str | Path | None = None,
                    seed: int = 0) -> np.ndarray:
    """The N2V U-Net's receptive field at the centre voxel of a ``(Z, Y, X)`` input: ``|d out / d in|``.

    Built from careamics' module for ``cfg`` (random weights) or loaded from ``checkpoint``.
    """
    import torch

    if checkpoint is not None:
        from careamics.lightning.utils import load_module_from_checkpoint

        net = load_module_from_checkpoint(Path(checkpoint)).model
    else:
        from careamics.lightning.modules import create_module

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # careamics' batch-size advice
            net = create_module(_careamics_config(cfg, "rf", "cpu").algorithm_config).model
    net.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, *shape), generator=g).requires_grad_(True)
    out = net(x)
    c = tuple(s // 2 for s in shape)
    out[(0, 0, *c)].backward()
    return x.grad[0, 0].abs().numpy()

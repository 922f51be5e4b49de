"""Apply a trained generator to new brightfield stacks: the logic behind ``python -m vstain predict``.

MODEL is a finished ``04_unet`` / ``05_wgan`` stage folder or a bioimage.io package written by
``python -m vstain export``. Each INPUT file (OME-TIFF or plain TIFF, ``[C,] Z, Y, X``) goes through
the steps the training data went through:

1. the brightfield channel, by index or by OME channel name;
2. optionally the in-focus window of N slices (PLLS on the brightfield, :mod:`vstain.preprocess.focus`);
3. a voxel-size check against the training voxel size (a warning above 10 % on any axis: the thesis
   notes that accuracy drops with another z-step) and, with ``resample``, linear resampling to the
   training grid and back;
4. zero mean, unit variance over the stack (as the processed set, :func:`vstain.preprocess.processed.zscore`);
5. prediction in one pass or tiled within a memory budget (:func:`vstain.inference.infer.predict_volume`),
   optionally averaged over Y/X flips with their spread as an uncertainty (:mod:`vstain.inference.tta`).

One float32 OME-TIFF per input is written with the six channel names (then ``<name>_std`` channels
with ``tta``) and the input's physical pixel sizes. A bad file does not stop a batch: it is
reported with its reason and the others are still predicted.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from vstain.channels import TARGETS
from vstain.data.stage import voxel_size
from vstain.modelfiles import MODEL_JSON, load_generator, read_model_json, simulated_data_warning, trained_on
from vstain.models import MIN_SIZE
from vstain.preprocess import focus
from vstain.preprocess.processed import zscore
from vstain.volumes import read_ome, write_ome

from .infer import DEFAULT_BUDGET_BYTES, default_max_voxels, predict_volume
from .layerwise import ScratchSpaceError
from .tta import predict_tta

TIFF_SUFFIXES = (".tif", ".tiff")
VOXEL_TOLERANCE = 0.10  # relative voxel-size difference per axis above which predict warns
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


class SimulatedTrainingWarning(UserWarning):
    """The model learned from simulated FOVs only (given once per batch of predictions)."""


class InputError(ValueError):
    """An input file that cannot be predicted; the message names the file and the reason."""


@dataclass
class Model:
    """A generator ready for prediction and what it was trained on.

    Args:
        generator: eval mode, on the CPU.
        voxel_size_zyx: the training voxel size in µm, or None when unknown.
        channel_names: the output channels, in order.
        source: the folder or package it was loaded from.
        trained_on: where its training FOVs came from (``"synthetic"``, ``"allen"``, ``"unknown"``).
        steps: optimiser steps of its training, when recorded.
    """

    generator: object
    voxel_size_zyx: tuple[float, float, float] | None
    channel_names: list[str] = field(default_factory=lambda: list(TARGETS))
    source: str = ""
    trained_on: str = "unknown"
    steps: int | None = None

    def warning(self, named: bool = True) -> str | None:
        """The warning to give before predicting with a model trained on simulated data (``named``:
        prefixed with where the model was loaded from), else None."""
        if self.trained_on != "synthetic":
            return None
        text = simulated_data_warning(self.voxel_size_zyx, self.generator.cfg.base_width, self.steps, not named)
        return f"{self.source}: {text}" if named else text


def parse_bytes(text: str | int) -> int:
    """``"4GiB"``, ``"512 MB"``, ``"2g"`` or a plain number of bytes -> bytes."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--max-memory: cannot read {text!r}; give e.g. 4GiB, 512MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def stage_voxel_size(stage: Path) -> tuple[float, float, float] | None:
    """The voxel size of the FOVs a model stage trained on, from its run directory's ``01_data``;
    None when that stage is missing or its FOVs differ in voxel size."""
    try:
        return voxel_size(stage.parent / "01_data")
    except (FileNotFoundError, ValueError):
        return None


def load_model(path: str | Path) -> Model:
    """A model stage folder (holding ``model.json``) or a bioimage.io package (``.zip`` or its
    ``rdf.yaml``) as a :class:`Model`."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_JSON).exists():
        steps = (read_model_json(path) or {}).get("global_step")
        return Model(load_generator(path), stage_voxel_size(path), list(TARGETS), str(path), trained_on(path), steps)
    if path.is_file() or (path.is_dir() and (path / "rdf.yaml").exists()):
        from .export import load_package

        gen, info = load_package(path)
        return Model(gen, tuple(info.voxel_size_zyx), list(info.channel_names), str(path), info.trained_on,
                     info.global_step)
    raise FileNotFoundError(f"MODEL {path}: neither a model stage folder (with {MODEL_JSON}: "
                            f"runs/<profile>/04_unet or 05_wgan) nor a bioimage.io package (.zip)")


def list_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The TIFF files named by ``inputs`` (files as given; folders: their ``*.tif``/``*.tiff``, sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        else:
            files.append(p)
    return files


def pick_channel(names: list[str], n_channels: int, channel: str | int | None, path) -> int:
    """The brightfield channel: an index, an OME channel name (case-insensitive), or by default the
    one channel of a single-channel file or the channel whose name contains "bright"."""
    if channel is None:
        if n_channels == 1:
            return 0
        hits = [i for i, n in enumerate(names) if "bright" in str(n).lower()]
        if len(hits) == 1:
            return hits[0]
        raise InputError(f"{path}: {n_channels} channels {names or ''} and none named as brightfield; "
                         "choose one with --channel (an index or an OME channel name)")
    if isinstance(channel, int) or str(channel).lstrip("-").isdigit():
        i = int(channel)
        if not 0 <= i < n_channels:
            raise InputError(f"{path}: no channel {i}: the file has {n_channels} channel(s) (0..{n_channels - 1})")
        return i
    lower = [str(n).lower() for n in names]
    if str(channel).lower() not in lower:
        raise InputError(f"{path}: no channel named {channel!r}; its channels are {names or 'unnamed'}")
    return lower.index(str(channel).lower())


def voxel_mismatch(voxel, train_voxel, tolerance: float = VOXEL_TOLERANCE) -> list[str]:
    """The axes (``"z"``, ``"y"``, ``"x"``) whose voxel size differs from the training one by more
    than ``tolerance`` (relative)."""
    if voxel is None or train_voxel is None:
        return []
    return [a for a, v, t in zip("zyx", voxel, train_voxel) if abs(v - t) > tolerance * t]


def resample(vol: np.ndarray, shape_zyx) -> np.ndarray:
    """``[C, Z, Y, X]`` linearly resampled to ``shape_zyx`` (first-order spline, edges kept)."""
    factors = [1.0] + [n / s for n, s in zip(shape_zyx, vol.shape[1:])]
    return ndimage.zoom(vol, factors, order=1, mode="nearest", grid_mode=True).astype(np.float32)


def predict_file(model: Model, path: Path, out_dir: Path, channel=None, focus_window: int | None = None,
                 do_resample: bool = False, tta: bool = False, max_voxels: int | None = None,
                 scratch: str | Path | None = None, progress: bool = False) -> Path:
    """Predict one file and write ``out_dir/<stem>_vstain.ome.tif``; returns that path. ``scratch``:
    folder for the layer-by-layer scratch files of a stack over the memory budget (default: the
    system's temporary folder); ``progress``: a bar over the layers of such a stack.

    Raises :class:`InputError` naming the file for an input that cannot be predicted.
    """
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise InputError(f"{path}: not a TIFF file (expected {', '.join(TIFF_SUFFIXES)})")
    try:
        vol, voxel, names = read_ome(path)
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from e
    bf = vol[pick_channel(names, vol.shape[0], channel, path)][None].astype(np.float32)
    z_lo = 0
    if focus_window:
        if bf.shape[1] < focus_window:
            raise InputError(f"{path}: {bf.shape[1]} slices, fewer than --focus-window {focus_window}")
        res = focus.focus_center(bf[0], "plls", window=int(focus_window), fov_id=str(path))
        z_lo = res.z_lo
        bf = bf[:, res.z_lo:res.z_hi]
    shape = bf.shape[1:]
    off = voxel_mismatch(voxel, model.voxel_size_zyx)
    if off:
        warnings.warn(f"{path}: voxel size {voxel} µm differs from the training voxel size "
                      f"{model.voxel_size_zyx} µm by more than {VOXEL_TOLERANCE:.0%} on axis {', '.join(off)}"
                      + ("; resampling to the training grid" if do_resample else
                         "; accuracy may drop (use --resample to match it)"), stacklevel=2)
    x = bf
    if do_resample and off:
        x = resample(bf, [round(n * v / t) for n, v, t in zip(shape, voxel, model.voxel_size_zyx)])
    if min(x.shape[1:]) < MIN_SIZE:
        raise InputError(f"{path}: the stack {tuple(x.shape[1:])} (Z, Y, X) is smaller than the network "
                         f"allows ({MIN_SIZE} voxels per axis at least)")
    x = zscore(x)
    kw = {"max_voxels": max_voxels, "workdir": scratch, "progress": progress}
    try:
        if tta:
            mean, std = predict_tta(model.generator, x, **kw)
            pred, chans = np.concatenate([mean, std]), [*model.channel_names, *(f"{c}_std" for c in model.channel_names)]
        else:
            pred, chans = predict_volume(model.generator, x, **kw), list(model.channel_names)
    except ScratchSpaceError as e:
        raise InputError(f"{path}: {e}") from e
    if pred.shape[1:] != shape:
        pred = resample(pred, shape)
    out = out_dir / f"{path.name.split('.')[0]}_vstain.ome.tif"
    write_ome(out, np.ascontiguousarray(pred, np.float32), chans, voxel or model.voxel_size_zyx or (1.0, 1.0, 1.0))
    if focus_window:  # where the window starts, slice 0 included, so the prediction can be placed in the stack
        out.with_suffix("").with_suffix(".json").write_text(json.dumps({"focus_z_lo": int(z_lo), "source": str(path)}))
    return out


def predict_files(model: Model, inputs: Sequence[str | Path], out_dir: str | Path, channel=None,
                  focus_window: int | None = None, do_resample: bool = False, tta: bool = False,
                  max_memory: str | int = DEFAULT_BUDGET_BYTES, progress: bool = True,
                  scratch: str | Path | None = None):
    """Predict every input file (a progress bar over files). Returns ``(written, failed)``:
    the output paths, and ``(input, reason)`` for each file that could not be predicted."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_voxels = default_max_voxels(model.generator, parse_bytes(max_memory))
    if model.warning():
        warnings.warn(model.warning(), SimulatedTrainingWarning, stacklevel=2)
    written, failed = [], []
    files = list_inputs(inputs)
    for path in tqdm(files, desc="predict", unit="file", disable=not progress):
        try:
            if not path.exists():
                raise InputError(f"{path}: no such file or folder")
            written.append(predict_file(model, path, out_dir, channel, focus_window, do_resample, tta, max_voxels,
                                        scratch, progress))
        except InputError as e:
            failed.append((path, str(e)))
    return written, failed

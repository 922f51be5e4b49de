"""What a model stage (``04_unet``, ``05_wgan``) leaves on disk, and how it is read back: the run's
config with the hashes of its inputs (``model.json``), Lightning checkpoints
(``checkpoints/last.ckpt``), the loss table (``losses.csv``) and the whole-FOV predictions
(``predictions/<fov_id>.tif``); :func:`load_generator` gives back the trained generator for
evaluation, the prediction command and the model export.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from . import dataset
from .channels import TARGETS
from .infer import default_max_voxels, plan, predict_volume
from .models import Generator, GeneratorConfig
from .volumes import sha256, write_volume

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
LOGS = "logs"
LOSSES_CSV = "losses.csv"
MODEL_JSON = "model.json"


def prepare_out_dir(out_dir, config: dict, resumable_keys, defaults: dict | None = None) -> bool:
    """Decide whether ``out_dir`` holds a run to resume. If its ``model.json`` records a config
    that differs from ``config`` in anything but ``resumable_keys``, the old checkpoints and logs
    are removed (with a warning) and training starts afresh. Keys the recorded config lacks (added
    to the config class since it was written) count as their value in ``defaults``. Returns True
    when a ``last.ckpt`` will be resumed."""
    out_dir = Path(out_dir)
    mj = out_dir / MODEL_JSON
    last = out_dir / CHECKPOINTS / LAST
    if mj.exists():
        old = {**(defaults or {}), **json.loads(mj.read_text()).get("config", {})}
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
                      roi_size=None, channel_names=TARGETS) -> pd.DataFrame:
    """Predict every FOV of ``splits`` of the processed set with :func:`vstain.infer.predict_volume`
    and write ``out_dir/predictions/<fov_id>.tif`` (float32 ``[C, Z, Y, X]``, ``C`` = 6 or the
    ``channel_names`` a single-structure model predicts).

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
        pred = predict_volume(generator, x, max_voxels=max_voxels, roi_size=roi_size)
        rel = f"predictions/{r['fov_id']}.tif"
        write_volume(out_dir / rel, pred, list(channel_names))
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


def load_generator_state(source) -> tuple[dict, dict | None]:
    """The generator weights (``generator.*`` entries) of a Lightning checkpoint, and the
    generator config when known. ``source``: a ``04_unet``/``05_wgan`` stage folder (its
    ``checkpoints/last.ckpt`` and ``model.json``) or a ``.ckpt`` file."""
    p = Path(source)
    cfg = None
    if p.is_dir():
        mj = p / "model.json"
        if mj.exists():
            cfg = json.loads(mj.read_text()).get("generator")
        p = p / CHECKPOINTS / LAST
    if not p.exists():
        raise FileNotFoundError(f"no U-Net checkpoint at {p}: run notebooks/04_unet.ipynb first or give a .ckpt path")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = {k.removeprefix("generator."): v for k, v in ckpt["state_dict"].items() if k.startswith("generator.")}
    if not state:
        raise ValueError(f"{p} holds no 'generator.*' weights")
    return state, cfg


def init_checkpoint(source) -> str:
    """The checkpoint file behind ``init_from`` (a ``04_unet`` stage folder or a ``.ckpt``), or ""."""
    if not source:
        return ""
    p = Path(source)
    return str(p / CHECKPOINTS / LAST) if p.is_dir() else str(p)


def init_generator(generator: Generator, source) -> None:
    """Load the U-Net baseline's weights into ``generator`` (widths must match)."""
    state, cfg = load_generator_state(source)
    if cfg is not None and int(cfg.get("base_width", generator.cfg.base_width)) != generator.cfg.base_width:
        raise ValueError(f"init_from {source}: the U-Net has base_width {cfg['base_width']} but the WGAN's "
                         f"generator has {generator.cfg.base_width}; set base_width to match")
    generator.load_state_dict(state)

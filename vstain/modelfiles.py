"""What a model stage (``04_unet``, ``05_wgan``) leaves on disk, and how it is read back: the run's
config with the hashes of its inputs (``model.json``), Lightning checkpoints
(``checkpoints/last.ckpt``), the loss table (``losses.csv``) and the whole-FOV predictions
(``predictions/<fov_id>.tif``), and the generator snapshots of the learning curves
(``snapshots/step_<N>.pt`` with ``snapshots.csv``, written by :class:`vstain.training.snapshots.Snapshots`).
:func:`is_finished` is the one rule by which a folder counts as
finished for every trainer; :func:`load_generator` gives back the trained generator for evaluation,
the prediction command and the model export.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pandas as pd
import torch

from vstain.preprocess import processed

from .models import Generator, GeneratorConfig
from .volumes import sha256

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
LOGS = "logs"
LOSSES_CSV = "losses.csv"
MODEL_JSON = "model.json"
PREDICTIONS = "predictions"
SNAPSHOTS = "snapshots"  # folder of the generator snapshots
SNAPSHOTS_CSV = "snapshots.csv"  # one row per snapshot: step, wall_s (training time up to it), path


def read_model_json(out_dir) -> dict | None:
    """``out_dir/model.json``, or None when it is missing or unreadable (a file cut short by a kill
    before it was written by rename)."""
    try:
        return json.loads((Path(out_dir) / MODEL_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def config_changes(recorded: dict, config: dict, cfg) -> list[str]:
    """The keys in which a recorded run config and a new one differ, beyond those an interrupted run
    may change (``cfg.RESUMABLE_KEYS``); a key either lacks (added to the config class since the
    record was written) counts as its default (``type(cfg)()``'s value)."""
    defaults = type(cfg)().to_dict()
    old, new = _plain({**defaults, **recorded}), _plain({**defaults, **config})
    return sorted(k for k in set(old) | set(new) if k not in cfg.RESUMABLE_KEYS and old.get(k) != new.get(k))


def _plain(d: dict) -> dict:
    """``d`` as it reads back from JSON (tuples as lists, paths as strings), so a record compares
    equal to the config it was written from."""
    return json.loads(json.dumps(d, default=str))


def prepare_out_dir(out_dir, cfg, config: dict) -> bool:
    """Decide whether ``out_dir`` holds a run to resume. If its ``model.json`` is unreadable or
    records a config that differs from ``config`` (``cfg``'s :func:`run_config`) in anything but
    the resumable keys (:func:`config_changes`), the old checkpoints and logs are removed (with a
    warning) and training starts afresh; a fresh start also removes the generator snapshots of an
    earlier run (:data:`SNAPSHOTS`), which the new run would otherwise keep as its own. Returns True
    when a ``last.ckpt`` will be resumed."""
    out_dir = Path(out_dir)
    last = out_dir / CHECKPOINTS / LAST
    if (out_dir / MODEL_JSON).exists():
        meta = read_model_json(out_dir)
        diff = ["model.json (unreadable)"] if meta is None else config_changes(meta.get("config", {}), config, cfg)
        if diff:
            warnings.warn(f"{out_dir}: configuration changed in {diff}; discarding the old checkpoints and logs")
            for sub in (CHECKPOINTS, LOGS):
                shutil.rmtree(out_dir / sub, ignore_errors=True)
            for f in (LOSSES_CSV, MODEL_JSON):
                (out_dir / f).unlink(missing_ok=True)
    if not last.exists():  # a fresh start: snapshots of an earlier run are not this run's weights
        shutil.rmtree(out_dir / SNAPSHOTS, ignore_errors=True)
        (out_dir / SNAPSHOTS_CSV).unlink(missing_ok=True)
    return last.exists()


def is_finished(out_dir, cfg, stage_in, *inputs, splits=("test",)) -> bool:
    """The one rule by which a model folder counts as finished, for every trainer: its ``model.json``
    is marked complete, records the same run (:func:`run_config` of ``cfg`` on ``stage_in`` and the
    other ``inputs``, defaults back-filled and resumable keys ignored: :func:`config_changes`), and
    ``cfg.optimiser_steps`` steps were taken (or training stopped on a divergence, which a rerun
    would repeat); and the predictions of every FOV of ``splits`` exist."""
    meta = read_model_json(out_dir)
    if meta is None or not meta.get("complete"):
        return False
    if config_changes(meta.get("config", {}), run_config(cfg.to_dict(), stage_in, *inputs), cfg):
        return False
    if meta.get("global_step") != cfg.optimiser_steps and not meta.get("stopped"):
        return False
    fovs = processed.read_manifest(stage_in)
    fovs = fovs.loc[fovs["split"].isin(splits), "fov_id"]
    return all((Path(out_dir) / PREDICTIONS / f"{f}.tif").exists() for f in fovs)


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


def save_model_json(out_dir, config: dict, complete: bool = False, **extra) -> Path:
    """Write ``out_dir/model.json`` by rename (a kill never leaves half a file): ``{"config": ...,
    **extra, "complete": complete}``. A stage writes it when training starts and again, with
    ``complete=True``, once its predictions are written."""
    p = Path(out_dir) / MODEL_JSON
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps({"config": config, **extra, "complete": complete}, indent=2, default=str))
    tmp.replace(p)
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


def trained_on(stage_path) -> str:
    """Where a model stage's training FOVs came from: the ``source`` parameter recorded by the
    ``01_data`` stage of its run directory (``"synthetic"`` or ``"allen"``), else ``"unknown"``."""
    manifest = Path(stage_path).parent / "01_data" / "manifest.json"
    try:
        return json.loads(manifest.read_text())["params"].get("source", "unknown")
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return "unknown"


def simulated_data_warning(voxel_size_zyx, width: int, steps: int | None, sentence: bool = False) -> str:
    """What to say before a model trained on simulated FOVs is applied to anything: what it learned
    from, at which voxel size, width and length of training, and that real stacks need a model
    trained on real data."""
    voxel = "voxels of " + " x ".join(f"{v:g}" for v in voxel_size_zyx) + " µm (z, y, x)" if voxel_size_zyx else \
        "an unrecorded voxel size"
    trained = f", {steps} optimiser steps" if steps else ""
    text = (f"this model learned from simulated hiPSC colonies only ({voxel}, generator width {width}{trained}); "
            "its predictions of real microscope stacks are not to be trusted until it is trained on real data "
            "(real Allen Cell stacks are sampled at 0.29 x 0.108 x 0.108 µm)")
    return text[0].upper() + text[1:] + "." if sentence else text


def snapshot_path(out_dir, step: int) -> Path:
    """Where the generator's weights at ``step`` are kept."""
    return Path(out_dir) / SNAPSHOTS / f"step_{int(step):06d}.pt"


def read_snapshots(out_dir, check: bool = True) -> pd.DataFrame:
    """The stage's ``snapshots.csv`` (``step, wall_s, path``), sorted by step; with ``check``, an
    error naming the file when it or a snapshot it lists is missing."""
    csv = Path(out_dir) / SNAPSHOTS_CSV
    if not csv.exists():
        if check:
            raise FileNotFoundError(f"{csv}: no snapshots were kept (train with snapshot steps set)")
        return pd.DataFrame(columns=["step", "wall_s", "path"])
    rows = pd.read_csv(csv).sort_values("step").reset_index(drop=True)
    if check:
        missing = [p for p in rows["path"] if not (Path(out_dir) / p).exists()]
        if missing:
            raise FileNotFoundError(f"{csv} lists snapshots that are missing: {missing}")
    return rows


def load_snapshot(out_dir, step: int, generator: torch.nn.Module) -> torch.nn.Module:
    """``generator`` with the weights kept at ``step`` (eval mode)."""
    path = snapshot_path(out_dir, step)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no snapshot at step {step}")
    generator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return generator.eval()

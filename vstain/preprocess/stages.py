"""Stages 02 (in-focus window) and 03 (denoising and the processed training set), thesis 2.2.

Stage 02 (:func:`run_focus_stage`) reads ``01_data``, finds each FOV's in-focus window with
:mod:`vstain.preprocess.focus` and writes ``focus.csv`` (one row per FOV: the window used downstream, the
centre each measure picked, the true centre and the errors) and ``focus_curves.csv`` (long
format: each measure per slice and channel).

Stage 03 (:func:`run_denoise_stage`) trains one Noise2Void model per target channel on patches read
from the focus windows of the FOVs that carry it (:mod:`vstain.preprocess.denoise`), then goes FOV by FOV: it
denoises the window with N2V and the classical baselines (BM3D, the thesis' comparison, and
non-local means), scores all against the simulator's clean truth and writes the processed FOV at
once with :func:`vstain.preprocess.processed.write_processed_fov` (z-scored per FOV and channel; NaN = no
label). Memory holds one FOV (plus the models) whatever the number of FOVs.

Both stages are kept in one file because stage 03 reads stage 02's windows and reports beside them
(the focus table, the denoising scores and the thesis' two claims) in the same terms.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from vstain.channels import TARGETS, VOLUME_CHANNELS
from vstain.data.stage import read_fovs
from vstain.volumes import read_volume, write_volume

from . import classical, denoise, focus
from .classical import BASELINES
from .processed import open_volume, write_manifest, write_processed_fov

CHANNELS = VOLUME_CHANNELS
FOCUS_CSV = "focus.csv"
CURVES_CSV = "focus_curves.csv"
EVAL_CSV = "denoise_eval.csv"
TIME_CSV = "denoise_time.csv"
GALLERY_TIF = "gallery.tif"
GALLERY_CSV = "gallery.csv"
GALLERY_METHODS = ("noisy", "n2v", "bm3d", "nlm", "truth")


def _true_center(row) -> float:
    lo, hi = row.get("focus_z_lo"), row.get("focus_z_hi")
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return float("nan")
    return (float(lo) + float(hi) - 1) / 2


# ----------------------------------------------------------------------------- stage 02


def run_focus_stage(
    stage01: str | Path,
    out: str | Path,
    channel: str = "dna",
    window: int = 32,
    method: str = "plls",
    extremum: str = "auto",
    band: tuple[float, float] = (0.02, 0.5),
    smooth_z: float = 1.0,
) -> pd.DataFrame:
    """Find every FOV's in-focus window and write ``focus.csv`` and ``focus_curves.csv``.

    Args:
        stage01: the ``01_data`` stage folder.
        out: the ``02_plls`` stage folder.
        channel: the channel whose focus decides the window (a :data:`CHANNELS` name; thesis: DNA).
        window: slices in the window (thesis 32).
        method: the measure that sets the window (``"plls"``, thesis); the other measures are
            computed and scored alongside.
        extremum, band, smooth_z: see :func:`vstain.preprocess.focus.focus_center`.

    Returns:
        ``focus.csv`` as a DataFrame: ``fov_id, gene, structure, z_lo, z_hi, center`` (the window
        used downstream, from ``method``), per measure ``m``: ``center_m, extremum_m, error_m``
        (signed, slices), plus ``true_center`` (the middle of the simulator's in-focus range) and
        ``overlap`` (fraction of the true range inside the window).
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if method not in focus.METHODS:
        raise ValueError(f"method must be one of {focus.METHODS}, got {method!r}")
    out = Path(out)
    fovs = read_fovs(stage01)
    ci = CHANNELS.index(channel)
    rows, curves = [], []
    for _, r in fovs.iterrows():
        vol = read_volume(r["path"])
        if np.isnan(vol[ci]).all():
            raise ValueError(f"FOV {r['fov_id']}: the focus channel '{channel}' is entirely NaN")
        row = {"fov_id": r["fov_id"], "gene": r.get("gene", ""), "structure": r.get("structure", ""),
               "n_z": vol.shape[1]}
        res = {}
        for m in focus.METHODS:
            res[m] = focus.focus_center(vol[ci], m, extremum, band, smooth_z, window, r["fov_id"])
            row[f"center_{m}"] = res[m].center
            row[f"extremum_{m}"] = res[m].extremum
            row[f"contrast_min_{m}"] = res[m].contrast_min
            row[f"contrast_max_{m}"] = res[m].contrast_max
        chosen = res[method]
        row.update(z_lo=chosen.z_lo, z_hi=chosen.z_hi, center=chosen.center)
        tc = _true_center(r)
        row["true_center"] = tc
        for m in focus.METHODS:
            row[f"error_{m}"] = row[f"center_{m}"] - tc
        if np.isfinite(tc):
            lo, hi = int(r["focus_z_lo"]), int(r["focus_z_hi"])
            row["overlap"] = max(0, min(hi, chosen.z_hi) - max(lo, chosen.z_lo)) / max(hi - lo, 1)
        else:
            row["overlap"] = float("nan")
        rows.append(row)
        for c, name in enumerate(CHANNELS):
            if np.isnan(vol[c]).all():
                continue
            ms = focus.METHODS if c == ci else ("plls",)
            for m in ms:
                values = focus.focus_curve(vol[c], m, band)
                curves += [{"fov_id": r["fov_id"], "channel": name, "method": m, "z": z, "value": v}
                           for z, v in enumerate(values)]
    df = pd.DataFrame(rows)
    lead = ["fov_id", "gene", "structure", "z_lo", "z_hi", "center", "true_center", "overlap"]
    df = df[lead + [c for c in df.columns if c not in lead]]
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / FOCUS_CSV, index=False)
    pd.DataFrame(curves).to_csv(out / CURVES_CSV, index=False)
    return df


def focus_errors(df: pd.DataFrame, tolerance: int = 2) -> pd.DataFrame:
    """Per measure: mean and max absolute centre error (slices) and the fraction of FOVs within
    ``tolerance`` slices of the true centre (FOVs without a true range are left out)."""
    d = df[np.isfinite(df["true_center"])]
    rows = []
    for m in focus.METHODS:
        e = d[f"error_{m}"].abs()
        rows.append({"method": m, "n_fovs": len(d), "mean_abs_error": e.mean(), "median_abs_error": e.median(),
                     "max_abs_error": e.max(), f"within_{tolerance}": (e <= tolerance).mean(),
                     "extremum_min_fraction": (d[f"extremum_{m}"] == "min").mean()})
    return pd.DataFrame(rows)


def read_focus(stage02: str | Path) -> pd.DataFrame:
    f = Path(stage02) / FOCUS_CSV
    if not f.exists():
        raise FileNotFoundError(f"no {FOCUS_CSV} in {stage02}: run notebooks/02_plls.ipynb first")
    return pd.read_csv(f, dtype={"fov_id": str})


# ----------------------------------------------------------------------------- stage 03


def read_window(path: str | Path, lo: int, hi: int, fov_id: str, dtype=np.float32) -> np.ndarray:
    """Slices ``[lo, hi)`` of a ``[C, Z, Y, X]`` volume file as ``[C, hi - lo, Y, X]``, read without
    the rest of the volume where the file can be memory-mapped. ``dtype``: float32 for images,
    ``None`` to keep the file's (instance labels stay uint16: cropped, never interpolated)."""
    vol = open_volume(path)
    if hi > vol.shape[1] or lo < 0:
        raise ValueError(f"FOV {fov_id}: focus window [{lo}, {hi}) does not fit its {vol.shape[1]} slices ({path})")
    return np.array(vol[:, lo:hi], dtype=dtype)


def focus_windows(stage01: str | Path, stage02: str | Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Every FOV of ``01_data`` with its ``02_plls`` window, and the FOVs that carry each target.

    Reads one FOV at a time, and of it only the window's slices where the file can be memory-mapped.

    Returns:
        ``(fovs, carriers)``: ``fovs.csv`` indexed by ``fov_id`` plus ``z_lo, z_hi``; per target
        channel the ids of the FOVs whose window of that channel is not all NaN, in FOV order.
    """
    fovs = read_fovs(stage01).set_index("fov_id", drop=False)
    win = read_focus(stage02).set_index("fov_id")
    missing = sorted(set(fovs.index) - set(win.index))
    if missing:
        raise ValueError(f"FOV(s) {missing} of 01_data have no focus window in {stage02}: rerun 02_plls")
    fovs["z_lo"] = [int(win.loc[f, "z_lo"]) for f in fovs.index]
    fovs["z_hi"] = [int(win.loc[f, "z_hi"]) for f in fovs.index]
    carriers: dict[str, list[str]] = {name: [] for name in TARGETS}
    for fid, r in fovs.iterrows():
        vol = open_volume(r["path"], len(CHANNELS))
        if r["z_hi"] > vol.shape[1] or r["z_lo"] < 0:
            raise ValueError(f"FOV {fid}: focus window [{r['z_lo']}, {r['z_hi']}) does not fit its "
                             f"{vol.shape[1]} slices ({r['path']})")
        for c, name in enumerate(TARGETS):
            if not np.isnan(vol[1 + c, r["z_lo"]:r["z_hi"]]).all():
                carriers[name].append(fid)
        del vol
    return fovs, carriers


def _estimates(noisy: np.ndarray, model: denoise.N2VModel, baselines: dict, spent: dict, targets_from: str) -> dict:
    """One stack denoised by N2V and by each baseline still under its cap (or chosen for the
    targets); counts the volumes and seconds into ``spent[(channel, method)]`` (timed runs only)."""
    ests = {"noisy": noisy}
    for method, (fn, kw, cap) in {"n2v": (model.denoise, {}, None), **baselines}.items():
        tally = spent[model.channel, method]
        timed = cap is None or tally[0] < cap
        if timed or targets_from == method:
            t0 = time.perf_counter()
            ests[method] = fn(noisy, **kw)
            if timed:
                tally[0], tally[1] = tally[0] + 1, tally[1] + time.perf_counter() - t0
    return ests


def run_denoise_stage(
    stage01: str | Path,
    stage02: str | Path,
    out: str | Path,
    n2v: denoise.N2VConfig,
    bm3d_mode: str = "2d",
    bm3d_max_volumes: int | None = 1,
    nlm_patch_size: int = 5,
    nlm_patch_distance: int = 6,
    nlm_h: float = 0.8,
    nlm_mode: str = "2d",
    nlm_max_volumes: int | None = None,
    targets_from: str = "n2v",
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    device: str = "cpu",
    precision: str = "32-true",
) -> dict:
    """Denoise the focus-cropped targets, score N2V, BM3D and NLM, and write the processed set.

    Args:
        stage01, stage02: the ``01_data`` and ``02_plls`` stage folders.
        out: the ``03_denoising`` stage folder; careamics works under ``out/n2v/<channel>/``.
        n2v: Noise2Void parameters (one model per target channel, trained on the FOVs carrying it).
        bm3d_mode: ``"2d"`` (BM3D slice by slice) or ``"3d"`` (BM4D), see
            :func:`vstain.preprocess.classical.bm3d_denoise`.
        bm3d_max_volumes: run BM3D on at most this many volumes per channel, the first FOVs that
            carry it (``None``: all; 0: skip it). BM3D costs seconds per volume on a CPU.
        nlm_patch_size, nlm_patch_distance, nlm_h, nlm_mode: the non-local-means baseline, see
            :func:`vstain.preprocess.classical.nlm_denoise`.
        nlm_max_volumes: run non-local means on at most this many volumes per channel (``None``: all).
        targets_from: what the processed targets hold: ``"n2v"`` (thesis), ``"bm3d"``, ``"nlm"`` or
            ``"noisy"`` (a baseline then also runs on the volumes its cap left out).
        split_fractions, seed: the train/val/test split, see :func:`vstain.preprocess.processed.split_fovs`.
        device, precision: where and how Noise2Void trains and predicts (``"cpu"``/``"cuda"``;
            a Lightning precision such as ``"32-true"``).

    Returns:
        ``{"eval": DataFrame, "time": DataFrame, "manifest": DataFrame}``; also writes
        ``denoise_eval.csv`` (``fov_id, structure, channel, method, psnr, ssim``),
        ``denoise_time.csv`` (``channel, method, n_volumes, train_s, denoise_s, reused, s_per_volume``;
        a baseline capped at 0 volumes has no row), ``gallery.tif`` ``[6, 5, Y, X]``
        (:data:`GALLERY_METHODS`) with ``gallery.csv``, and the processed set. A channel that no
        FOV carries stays NaN everywhere.
    """
    if targets_from not in ("n2v", *BASELINES, "noisy"):
        raise ValueError(f"targets_from must be 'n2v', 'bm3d', 'nlm' or 'noisy', got {targets_from!r}")
    if bm3d_mode not in classical.BM3D_MODES:
        raise ValueError(f"bm3d_mode must be '2d' or '3d', got {bm3d_mode!r}")
    for name, cap in (("bm3d_max_volumes", bm3d_max_volumes), ("nlm_max_volumes", nlm_max_volumes)):
        if cap is not None and (int(cap) != cap or cap < 0):
            raise ValueError(f"{name} must be None or an integer >= 0, got {cap!r}")
    out = Path(out)
    fovs, carriers = focus_windows(stage01, stage02)
    baselines = {
        "bm3d": (classical.bm3d_denoise, dict(mode=bm3d_mode), bm3d_max_volumes),
        "nlm": (classical.nlm_denoise, dict(patch_size=nlm_patch_size, patch_distance=nlm_patch_distance, h=nlm_h,
                                          mode=nlm_mode), nlm_max_volumes),
    }
    # one model per channel, trained on patches read from the FOV files on disk
    models = {}
    for c, name in enumerate(TARGETS):
        if carriers[name]:
            stacks = [denoise.DiskStack(fovs.loc[f, "path"], 1 + c, fovs.loc[f, "z_lo"], fovs.loc[f, "z_hi"], f)
                      for f in carriers[name]]
            models[name] = denoise.train_n2v(stacks, name, out / "n2v" / name, n2v, device, precision)
    # then FOV by FOV: denoise, score, keep the gallery's slices, write the processed FOV
    spent = {(name, m): [0, 0.0] for name in TARGETS for m in ("n2v", *BASELINES)}
    shape_yx = open_volume(fovs["path"].iloc[0]).shape[2:]
    gallery = np.full((len(TARGETS), len(GALLERY_METHODS), *shape_yx), np.nan, np.float32)
    evals, gal_rows, rows = [], [], []
    for fid, r in fovs.iterrows():
        vol = read_window(r["path"], r["z_lo"], r["z_hi"], fid)
        truth = read_window(r["truth_path"], r["z_lo"], r["z_hi"], fid) if r["truth_path"] else None
        labels = read_window(r["labels_path"], r["z_lo"], r["z_hi"], fid, None) if r["labels_path"] else None
        target = np.full(vol[1:].shape, np.nan, np.float32)
        for c, name in enumerate(TARGETS):
            if fid not in carriers[name]:
                continue
            ests = _estimates(vol[1 + c], models[name], baselines, spent, targets_from)
            target[c] = ests[targets_from]
            if truth is not None:
                evals += [{"fov_id": fid, "structure": r["structure"], "channel": name, "method": m,
                           **classical.score(e, truth[c])} for m, e in ests.items()]
            if fid == carriers[name][0] and vol.shape[2:] == shape_yx:
                zc = vol.shape[1] // 2
                ests["truth"] = truth[c] if truth is not None else None
                for j, method in enumerate(GALLERY_METHODS):
                    if ests.get(method) is not None:
                        gallery[c, j] = ests[method][zc]
                gal_rows.append({"channel": name, "fov_id": fid, "z": zc})
        rows.append(write_processed_fov(out, {"fov_id": fid, "gene": r["gene"], "structure": r["structure"],
                                              "bf": vol[0], "target": target, "truth": truth, "labels": labels}))
        del vol, truth, target, labels
    manifest = write_manifest(out, rows, seed=seed, fractions=split_fractions)
    order = {name: i for i, name in enumerate(TARGETS)}
    ev = pd.DataFrame(evals, columns=["fov_id", "structure", "channel", "method", "psnr", "ssim"])
    ev = ev.sort_values("channel", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    times = []
    for name, model in models.items():
        times.append({"channel": name, "method": "n2v", "n_volumes": len(carriers[name]), "train_s": model.train_s,
                      "denoise_s": spent[name, "n2v"][1], "reused": model.reused})
        times += [{"channel": name, "method": m, "n_volumes": spent[name, m][0], "train_s": 0.0,
                   "denoise_s": spent[name, m][1], "reused": False} for m in BASELINES if spent[name, m][0]]
    tm = pd.DataFrame(times, columns=["channel", "method", "n_volumes", "train_s", "denoise_s", "reused"])
    tm["s_per_volume"] = tm["denoise_s"] / tm["n_volumes"].clip(lower=1)
    out.mkdir(parents=True, exist_ok=True)
    ev.to_csv(out / EVAL_CSV, index=False)
    tm.to_csv(out / TIME_CSV, index=False)
    write_volume(out / GALLERY_TIF, gallery, list(TARGETS))
    pd.DataFrame(gal_rows, columns=["channel", "fov_id", "z"]).to_csv(out / GALLERY_CSV, index=False)
    return {"eval": ev, "time": tm, "manifest": manifest}


def n2v_losses(out: str | Path) -> pd.DataFrame:
    """The Noise2Void training losses of every channel, long format: ``channel, step, train_loss``."""
    rows = []
    for d in sorted((Path(out) / "n2v").glob("*")):
        for r in denoise.read_losses(d):
            v = r.get("train_loss_step", "")
            if v not in ("", None):
                rows.append({"channel": d.name, "step": int(r["step"]), "train_loss": float(v)})
    df = pd.DataFrame(rows, columns=["channel", "step", "train_loss"])
    order = {c: i for i, c in enumerate(TARGETS)}
    return df.sort_values(["channel", "step"], key=lambda s: s.map(order) if s.name == "channel" else s,
                          kind="stable").reset_index(drop=True)

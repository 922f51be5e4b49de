"""Stages 02 (in-focus window) and 03 (denoising and the processed training set), thesis 2.2.

Stage 02 (:func:`run_focus_stage`) reads ``01_data``, finds each FOV's in-focus window with
:mod:`vstain.focus` and writes ``focus.csv`` (one row per FOV: the window used downstream, the
centre each measure picked, the true centre and the errors) and ``focus_curves.csv`` (long
format: each measure per slice and channel).

Stage 03 (:func:`run_denoise_stage`) crops every FOV to its window, trains one Noise2Void model per
target channel on the FOVs that carry it (:mod:`vstain.denoise`), runs the non-local-means
baseline, scores both against the simulator's clean truth, and writes the processed set with
:func:`vstain.dataset.write_processed` (z-scored per FOV and channel; NaN = no label).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import denoise, focus
from .data import TARGETS
from .dataset import read_volume, write_processed, write_volume

CHANNELS: tuple[str, ...] = ("brightfield", *TARGETS)
FOCUS_CSV = "focus.csv"
CURVES_CSV = "focus_curves.csv"
EVAL_CSV = "denoise_eval.csv"
TIME_CSV = "denoise_time.csv"
GALLERY_TIF = "gallery.tif"
GALLERY_CSV = "gallery.csv"
GALLERY_METHODS = ("noisy", "n2v", "nlm", "truth")


def read_fovs(stage01: str | Path) -> pd.DataFrame:
    """``01_data/fovs.csv`` with ``path``/``truth_path`` made absolute ("" where there is no truth)."""
    stage01 = Path(stage01)
    f = stage01 / "fovs.csv"
    if not f.exists():
        raise FileNotFoundError(f"no fovs.csv in {stage01}: run notebooks/01_data.ipynb first")
    df = pd.read_csv(f, dtype={"fov_id": str})
    df["path"] = [str(stage01 / p) for p in df["path"]]
    tp = df["truth_path"].fillna("") if "truth_path" in df else pd.Series("", index=df.index)
    df["truth_path"] = [str(stage01 / p) if isinstance(p, str) and p else "" for p in tp]
    return df


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
        extremum, band, smooth_z: see :func:`vstain.focus.focus_center`.

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


def _crop(vol: np.ndarray, lo: int, hi: int, fov_id: str) -> np.ndarray:
    if hi > vol.shape[1] or lo < 0:
        raise ValueError(f"FOV {fov_id}: focus window [{lo}, {hi}) does not fit its {vol.shape[1]} slices")
    return vol[:, lo:hi]


def load_windows(stage01: str | Path, stage02: str | Path):
    """Every FOV of ``01_data`` cropped to its ``02_plls`` window.

    Returns:
        ``(fovs, vols, truths)``: ``fovs.csv`` indexed by ``fov_id``; per FOV the cropped
        ``[7, z, Y, X]`` volume and the cropped ``[6, z, Y, X]`` truth (``None`` without one).
    """
    fovs = read_fovs(stage01).set_index("fov_id", drop=False)
    win = read_focus(stage02).set_index("fov_id")
    missing = sorted(set(fovs.index) - set(win.index))
    if missing:
        raise ValueError(f"FOV(s) {missing} of 01_data have no focus window in {stage02}: rerun 02_plls")
    vols, truths = {}, {}
    for fid in fovs.index:
        lo, hi = int(win.loc[fid, "z_lo"]), int(win.loc[fid, "z_hi"])
        vols[fid] = _crop(read_volume(fovs.loc[fid, "path"]), lo, hi, fid)
        tp = fovs.loc[fid, "truth_path"]
        truths[fid] = _crop(read_volume(tp), lo, hi, fid) if tp else None
    return fovs, vols, truths


def _timed_nlm(stacks: dict[str, np.ndarray], **kw) -> tuple[dict[str, np.ndarray], float]:
    t0 = time.perf_counter()
    return {fid: denoise.nlm_denoise(x, **kw) for fid, x in stacks.items()}, time.perf_counter() - t0


def run_denoise_stage(
    stage01: str | Path,
    stage02: str | Path,
    out: str | Path,
    n2v: denoise.N2VConfig,
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
    """Denoise the focus-cropped targets, score N2V and NLM, and write the processed set.

    Args:
        stage01, stage02: the ``01_data`` and ``02_plls`` stage folders.
        out: the ``03_denoising`` stage folder; careamics works under ``out/n2v/<channel>/``.
        n2v: Noise2Void parameters (one model per target channel, trained on the FOVs carrying it).
        nlm_patch_size, nlm_patch_distance, nlm_h, nlm_mode: the baseline, see
            :func:`vstain.denoise.nlm_denoise`.
        nlm_max_volumes: run the baseline on at most this many volumes per channel (``None``: all).
        targets_from: what the processed targets hold: ``"n2v"`` (thesis), ``"nlm"`` or ``"noisy"``.
        split_fractions, seed: the train/val/test split, see :func:`vstain.dataset.split_fovs`.
        device, precision: where and how Noise2Void trains and predicts (``"cpu"``/``"cuda"``;
            a Lightning precision such as ``"32-true"``).

    Returns:
        ``{"eval": DataFrame, "time": DataFrame, "manifest": DataFrame}``; also writes
        ``denoise_eval.csv`` (``fov_id, structure, channel, method, psnr, ssim``),
        ``denoise_time.csv`` (``channel, method, n_volumes, train_s, denoise_s, reused, s_per_volume``),
        ``gallery.tif`` ``[6, 4, Y, X]`` with ``gallery.csv``, and the processed set. A channel that
        no FOV carries stays NaN everywhere.
    """
    if targets_from not in ("n2v", "nlm", "noisy"):
        raise ValueError(f"targets_from must be 'n2v', 'nlm' or 'noisy', got {targets_from!r}")
    out = Path(out)
    fovs, vols, truths = load_windows(stage01, stage02)
    ids = list(fovs.index)
    nlm_kw = dict(patch_size=nlm_patch_size, patch_distance=nlm_patch_distance, h=nlm_h, mode=nlm_mode)
    targets = {fid: np.full(vols[fid][1:].shape, np.nan, np.float32) for fid in ids}
    shape_yx = vols[ids[0]].shape[2:]
    gallery = np.full((len(TARGETS), len(GALLERY_METHODS), *shape_yx), np.nan, np.float32)
    evals, times, gal_rows = [], [], []
    for c, name in enumerate(TARGETS):
        noisy = {fid: vols[fid][1 + c] for fid in ids if not np.isnan(vols[fid][1 + c]).all()}
        if not noisy:
            continue
        res = denoise.train_and_denoise(list(noisy.values()), name, out / "n2v" / name, n2v, device, precision)
        n2v_out = dict(zip(noisy, res.denoised))
        nlm_in = dict(list(noisy.items())[:nlm_max_volumes])
        nlm_out, nlm_s = _timed_nlm(nlm_in, **nlm_kw)
        times += [{"channel": name, "method": "n2v", "n_volumes": len(noisy), "train_s": res.train_s,
                   "denoise_s": res.predict_s, "reused": res.reused},
                  {"channel": name, "method": "nlm", "n_volumes": len(nlm_in), "train_s": 0.0,
                   "denoise_s": nlm_s, "reused": False}]
        if targets_from == "nlm" and len(nlm_out) < len(noisy):
            nlm_out.update(_timed_nlm({f: x for f, x in noisy.items() if f not in nlm_out}, **nlm_kw)[0])
        chosen = {"n2v": n2v_out, "nlm": nlm_out, "noisy": noisy}[targets_from]
        for fid in noisy:
            targets[fid][c] = chosen[fid]
            if truths[fid] is not None:
                for method, est in (("noisy", noisy), ("n2v", n2v_out), ("nlm", nlm_out)):
                    if fid in est:
                        evals.append({"fov_id": fid, "structure": fovs.loc[fid, "structure"], "channel": name,
                                      "method": method, **denoise.score(est[fid], truths[fid][c])})
        g = next(iter(noisy))
        zc = vols[g].shape[1] // 2
        if vols[g].shape[2:] == shape_yx:
            for j, est in enumerate((noisy, n2v_out, nlm_out, {g: truths[g][c]} if truths[g] is not None else {})):
                if g in est:
                    gallery[c, j] = est[g][zc]
            gal_rows.append({"channel": name, "fov_id": g, "z": zc})
    ev, tm = pd.DataFrame(evals), pd.DataFrame(times)
    if not tm.empty:
        tm["s_per_volume"] = tm["denoise_s"] / tm["n_volumes"].clip(lower=1)
    out.mkdir(parents=True, exist_ok=True)
    ev.to_csv(out / EVAL_CSV, index=False)
    tm.to_csv(out / TIME_CSV, index=False)
    write_volume(out / GALLERY_TIF, gallery, list(TARGETS))
    pd.DataFrame(gal_rows, columns=["channel", "fov_id", "z"]).to_csv(out / GALLERY_CSV, index=False)
    records = [{"fov_id": fid, "gene": fovs.loc[fid, "gene"], "structure": fovs.loc[fid, "structure"],
                "bf": vols[fid][0], "target": targets[fid], "truth": truths[fid]} for fid in ids]
    manifest = write_processed(out, records, seed=seed, fractions=split_fractions)
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


def denoise_summary(ev: pd.DataFrame, tm: pd.DataFrame) -> pd.DataFrame:
    """Per channel and method: mean PSNR/SSIM, the gain over the noisy input, and the wall time
    (N2V: training + prediction of every volume; NLM: its volumes; both also per volume)."""
    m = ev.groupby(["channel", "method"])[["psnr", "ssim"]].mean().reset_index()
    base = m[m["method"] == "noisy"].set_index("channel")
    m["psnr_gain"] = m["psnr"] - m["channel"].map(base["psnr"])
    m["ssim_gain"] = m["ssim"] - m["channel"].map(base["ssim"])
    cols = ["channel", "method", "n_volumes", "train_s", "total_s", "s_per_volume"]
    t = tm.assign(total_s=tm["train_s"] + tm["denoise_s"])[cols]
    m = m.merge(t, on=["channel", "method"], how="left")
    order = {k: i for i, k in enumerate(TARGETS)}
    m = m.sort_values(["channel", "method"], key=lambda s: s.map(order) if s.name == "channel" else s)
    return m.reset_index(drop=True)


def thesis_claim(summary: pd.DataFrame, psnr_tol: float = 1.0, ssim_tol: float = 0.05) -> str:
    """A plain sentence, generated from the numbers, on the thesis' claim that Noise2Void denoises
    about as well as the classical method in a fraction of the time.

    "About as well": mean PSNR at most ``psnr_tol`` dB and mean SSIM at most ``ssim_tol`` below the
    baseline's, over the channels both methods ran on. Time compares the whole job on these
    volumes: N2V training plus prediction against NLM per volume times the same number of volumes.
    """
    s = summary.set_index(["channel", "method"])
    chans = sorted({c for c, m in s.index if m == "nlm"} & {c for c, m in s.index if m == "n2v"})
    if not chans:
        return "The claim cannot be checked: no channel was denoised by both methods."
    n2v = s.loc[[(c, "n2v") for c in chans]]
    nlm = s.loc[[(c, "nlm") for c in chans]]
    dpsnr = float(n2v["psnr"].mean() - nlm["psnr"].mean())
    dssim = float(n2v["ssim"].mean() - nlm["ssim"].mean())
    t_n2v = float(n2v["total_s"].sum())
    t_nlm = float((nlm["s_per_volume"].values * n2v["n_volumes"].values).sum())
    quality = dpsnr >= -psnr_tol and dssim >= -ssim_tol
    faster = t_n2v < t_nlm
    verdict = "holds" if quality and faster else "does not hold"
    why = []
    why.append(f"N2V's mean PSNR is {dpsnr:+.2f} dB and its SSIM {dssim:+.3f} relative to non-local means "
               f"({'within' if quality else 'outside'} the tolerance of {psnr_tol} dB / {ssim_tol})")
    why.append(f"N2V took {t_n2v:.1f} s (training included) against {t_nlm:.1f} s for non-local means on the same "
               f"{int(n2v['n_volumes'].sum())} volumes, {t_n2v / max(t_nlm, 1e-9):.2f} times the time")
    return f"On this run the thesis' claim {verdict}: " + "; ".join(why) + "."

"""Sharpness against the clean truth: how much of the truth's fine in-plane detail a prediction
reproduces *in phase* (the coherent transfer), beside the plain high-frequency power ratio, which
noise and invented texture inflate (a CPU pilot measured 0.91 for noisy targets against 0.07 for the
clean truth). Used by notebook 05 to ask whether the WGAN-GP is sharper than the U-Net.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.preprocess import processed
from vstain.volumes import read_volume

from .fovpool import map_fovs
from .structure import BLANK_SHARE  # a blank channel: on at least this share of the FOVs
from .stats import channel_verdict, claim_verdict, compare, n_fovs


def _spectra(a: np.ndarray) -> np.ndarray:
    """Per-slice 2D FFT (Y, X) of a ``[Z, Y, X]`` volume, mean removed and Hann-windowed."""
    a = a.astype(np.float64) - a.mean()
    win = np.outer(np.hanning(a.shape[1]), np.hanning(a.shape[2]))
    return np.fft.rfft2(a * win, axes=(1, 2))


def _radial(shape_yx) -> np.ndarray:
    fy = np.fft.fftfreq(shape_yx[0])[:, None]
    fx = np.fft.rfftfreq(shape_yx[1])[None, :]
    return np.sqrt(fy**2 + fx**2)  # cycles per voxel, 0 .. ~0.71


def sharpness(pred: np.ndarray, truth: np.ndarray, cutoff: float = 0.125, min_coarse: float = 0.1) -> dict[str, float]:
    """How much of the clean truth's fine in-plane detail a prediction reproduces.

    Both ``[Z, Y, X]``; spectra per XY slice (Hann window), bands split at ``cutoff`` cycles per
    voxel (0.125: structures finer than 8 voxels). With ``H(band) = Σ Re(P·T*) / Σ |T|²``:

    * ``coarse = H(low)``: the coarse structure reproduced in phase with the truth (1 for a
      perfect prediction at the truth's scale; lower for a weak or wrong one).
    * ``transfer = H(high) / H(low)``: the fine detail reproduced *in phase with the truth*,
      relative to the coarse detail (so an overall gain cancels). 1: as sharp as the truth;
      below 1: blurred. Noise or invented texture, uncorrelated with the truth, adds nothing.
      NaN when ``coarse < min_coarse``: a prediction that misses the structure has no sharpness.
    * ``power = (P_high / P_low) / (T_high / T_low)``: the plain high-frequency power ratio; noise
      and invented texture raise it, so it alone does not show sharpness.

    Returns ``{"coarse", "transfer", "power"}`` (NaN where a band of the truth is empty).
    """
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"sharpness: pred {pred.shape} and truth {truth.shape} must be equal [Z, Y, X] shapes")
    P, T = _spectra(pred), _spectra(truth)
    f = _radial(pred.shape[1:])
    hi, lo = f > cutoff, (f > 0) & (f <= cutoff)
    cross = (P * np.conj(T)).real
    tp, pp = np.abs(T) ** 2, np.abs(P) ** 2
    nan = float("nan")

    def ratio(a, b):
        return a / b if b > 0 else nan

    h_lo = ratio(cross[:, lo].sum(), tp[:, lo].sum())
    h_hi = ratio(cross[:, hi].sum(), tp[:, hi].sum())
    transfer = h_hi / h_lo if h_lo >= min_coarse else nan
    t_ratio = ratio(tp[:, hi].sum(), tp[:, lo].sum())
    p_ratio = ratio(pp[:, hi].sum(), pp[:, lo].sum())
    return {"coarse": float(h_lo), "transfer": float(transfer), "power": float(ratio(p_ratio, t_ratio))}


def sharpness_table(stage_in, pred_dirs: dict[str, str | Path], split: str = "test",
                    cutoff: float = 0.125, include_target: bool = True, reference: str = "auto",
                    min_coarse: float = 0.1) -> pd.DataFrame:
    """:func:`sharpness` of every model's predictions per FOV and channel.

    Args:
        stage_in: the ``03_denoising`` stage (manifest, ``*_truth.tif``).
        pred_dirs: model name -> stage folder holding ``predictions/<fov_id>.tif``.
        split: which split's FOVs.
        cutoff: the band split, cycles per voxel.
        min_coarse: below this in-phase share of the coarse band, ``transfer`` is NaN.
        include_target: with the clean truth as reference, add the measured (denoised) targets
            as a pseudo-model ``"measured target"`` (labelled channels): a calibration, since
            what remains of the noise in them raises the plain power ratio but not the transfer.
        reference: ``"truth"`` (the simulator's clean truth, all six channels), ``"target"``
            (the measured targets, labelled channels only: real data has no truth; noise in the
            reference lowers every model's transfer alike, so the comparison stays fair) or
            ``"auto"`` (the truth where every FOV has one, else the targets).

    Returns a long table ``model, fov_id, channel, coarse, transfer, power, reference``.
    """
    if reference not in ("auto", "truth", "target"):
        raise ValueError(f"reference must be 'auto', 'truth' or 'target', got {reference!r}")
    df = processed.read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"the processed set at {stage_in} has no FOV in split '{split}'")
    has_truth = bool(df["truth_path"].astype(bool).all()) if "truth_path" in df else False
    if reference == "auto":
        reference = "truth" if has_truth else "target"
    if reference == "truth" and not has_truth:
        raise ValueError(f"reference='truth' needs the simulator's clean truth, which split '{split}' of {stage_in} lacks")

    def one_fov(r) -> list[dict]:
        _, target, truth = processed.load_fov(r)
        ref = truth if reference == "truth" else target
        vols = {m: read_volume(Path(d) / "predictions" / f"{r['fov_id']}.tif") for m, d in pred_dirs.items()}
        if include_target and reference == "truth":
            vols["measured target"] = target
        rows = []
        for model, vol in vols.items():
            for c, name in enumerate(TARGETS):
                if np.isnan(vol[c]).all() or np.isnan(ref[c]).all():
                    continue
                rows.append({"model": model, "fov_id": r["fov_id"], "channel": name,
                             **sharpness(vol[c], ref[c], cutoff, min_coarse), "reference": reference})
        return rows

    return pd.DataFrame([row for rows in map_fovs(one_fov, [r for _, r in df.iterrows()]) for row in rows])


SMALL_GAIN = 0.05  # a median gain in coherent transfer under 5% of the other model's is called small


def blank_channels(table: pd.DataFrame, model: str, share: float = BLANK_SHARE) -> dict[str, tuple[int, int]]:
    """The channels that ``model`` predicts (almost) nothing of: those where it reproduces none of the
    reference's coarse structure (``transfer`` undefined, ``coarse`` below :func:`sharpness`'s
    ``min_coarse``) on at least ``share`` of the FOVs it was scored on. Returns ``{channel: (k, n)}``,
    ``k`` of ``n`` FOVs blank."""
    own = table[table["model"] == model]
    out = {}
    for channel, g in own.groupby("channel", sort=False):
        k, n = int(g["transfer"].isna().sum()), len(g)
        if n and k / n >= share:
            out[channel] = (k, n)
    return out


def blank_note(table: pd.DataFrame, models) -> str:
    """Which channels each of ``models`` predicts (almost) nothing of (:func:`blank_channels`), to be
    read before any sharpness number."""
    parts = [f"the {m} on {TARGET_LABELS[c]} ({k} of {n} FOVs)" for m in models
             for c, (k, n) in blank_channels(table, m).items()]
    if not parts:
        return "Every model reproduces the coarse structure of every channel on most FOVs: no channel is blank."
    return ("**Before any number:** no coarse structure of the truth, so (almost) nothing predicted, for "
            + "; ".join(parts) + ". Their transfer is undefined, and each is a loss for that model in the verdict.")


def sharper_verdict(table: pd.DataFrame, model_a: str = "U-Net", model_b: str = "WGAN", n_resamples: int = 9999,
                    confidence: float = 0.95, seed: int = 0) -> str:
    """Whether ``model_b`` is sharper than ``model_a``, channel by channel, then the claim "sharper on
    most channels" as "holds", "does not hold" or "cannot be decided with n = ...".

    A channel that one model predicts (almost) nothing of (:func:`blank_channels`) is a loss for that
    model, said before any number is read; the other channels compare the coherent transfer FOV by
    FOV (paired intervals, :func:`vstain.evaluate.stats.compare`). Where the claim holds, the size of
    the gain is stated, and a median gain under :data:`SMALL_GAIN` of ``model_a``'s value is called
    small.

    Args:
        table: :func:`sharpness_table`'s long table (``model, fov_id, channel, transfer``).
    """
    blank = {m: blank_channels(table, m) for m in (model_a, model_b)}
    lost = {c: m for m in (model_a, model_b) for c in blank[m] if c not in blank[model_b if m == model_a else model_a]}
    neither = [c for c in blank[model_a] if c in blank[model_b]]
    long = table[table["model"].isin([model_a, model_b]) & ~table["channel"].isin([*lost, *neither])]
    long = long.rename(columns={"transfer": "value"}).assign(metric="transfer")
    long = long[["model", "fov_id", "channel", "metric", "value"]].dropna()
    parts, rows = [], []
    for c, m in lost.items():
        k, n = blank[m][c]
        other = model_b if m == model_a else model_a
        parts.append(f"{TARGET_LABELS[c]}: the {m} predicts almost none (no coarse structure on {k} of {n} FOVs), "
                     f"{other} better")
        rows.append({"channel": c, "model_a": model_a, "model_b": model_b, "n": n, "better": other, "diff": np.nan})
    parts += [f"{TARGET_LABELS[c]}: neither model reproduces its coarse structure on most FOVs, not compared"
              for c in neither]
    comp = pd.DataFrame()
    if not long.empty and long["model"].nunique() == 2:
        comp = compare(long, model_a, model_b, higher_is_better=True, n_resamples=n_resamples,
                       confidence=confidence, seed=seed)
        parts += [f"{TARGET_LABELS[r['channel']]}: {channel_verdict(r)}" for _, r in comp.iterrows()]
    cells = pd.concat([comp, pd.DataFrame(rows)], ignore_index=True)
    if cells.empty:
        return (f"The coherent transfer of {model_a} and {model_b} could not be compared: no channel where both are "
                "defined" + (f" ({'; '.join(parts)})." if parts else "."))
    claim = claim_verdict(cells, model_b, "most")
    text = (f"Coherent transfer per FOV, {model_b} against {model_a}, paired over test FOVs ({n_fovs(cells['n'])}): "
            + "; ".join(parts) + f". The claim that the {model_b} is sharper than the {model_a} on most channels "
            f"**{claim}**.")
    won = comp[comp["better"] == model_b] if len(comp) else comp
    if claim == "holds" and len(won):
        gains = (won["diff"] / won["mean_a"].abs().clip(lower=1e-12)).to_numpy()
        size = f"the median gain is {np.median(gains):.1%} of the {model_a}'s transfer (at most {gains.max():.1%})"
        text += (f" The gains are small, though: {size}." if np.median(gains) < SMALL_GAIN else f" For scale: {size}.")
    return text


def sharpness_report(table: pd.DataFrame, model_a: str = "U-Net", model_b: str = "WGAN") -> tuple[pd.DataFrame, dict, str]:
    """What a :func:`sharpness_table` says of two models, for a notebook to show.

    Returns ``(per_channel, medians, sentence)``: the median ``coarse, transfer, power`` per channel
    (rows in :data:`TARGETS` order, one column per measure and model), the medians over channels and
    FOVs per model (``{"transfer": {model: value}, "power": {...}}``), and a sentence comparing the
    two models' coherent transfer and plain power ratio (with the measured targets as a calibration
    where the table has them)."""
    per_channel = (table.groupby(["channel", "model"])[["coarse", "transfer", "power"]].median()
                   .unstack("model").reindex(list(TARGETS)))
    means = table.groupby("model")[["coarse", "transfer", "power"]].median()
    a, b = per_channel[("transfer", model_a)], per_channel[("transfer", model_b)]
    higher, compared = int((b > a).sum()), int((a.notna() & b.notna()).sum())
    where = (f"the {model_b} is higher in {higher} of {compared} channels where both are defined" if compared
             else "no channel where both are defined")
    shown = {m: f"{v:.3f}" if np.isfinite(v) else "undefined (no coarse structure)" for m, v in means["transfer"].items()}
    calibration = (f"; the measured targets score {shown['measured target']} and "
                   f"{means.loc['measured target', 'power']:.3f}" if "measured target" in means.index else "")
    reference = "clean truth" if table["reference"].iloc[0] == "truth" else "measured targets"
    sentence = (f"Against the {reference}, coherent high-frequency transfer, median over channels and test FOVs: "
                f"{model_a} {shown[model_a]}, {model_b} {shown[model_b]} ({where}). Plain power ratio: {model_a} "
                f"{means.loc[model_a, 'power']:.3f}, {model_b} {means.loc[model_b, 'power']:.3f}{calibration}. Where a "
                f"model's power ratio rises without its coherent transfer, the extra fine structure is not the truth's.")
    medians = {k: {m: float(v) for m, v in means[k].items()} for k in ("transfer", "power")}
    return per_channel, medians, sentence

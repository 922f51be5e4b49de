"""How well stage 03 denoised, in words that an interval decides: each method's mean PSNR/SSIM per
channel with its gain over the noisy input and its time (:func:`denoise_summary`), and the
sentences that compare Noise2Void with a classical baseline channel by channel, from paired
intervals over FOVs (:func:`channel_claims`, :func:`thesis_claim`; thesis 3.1.3).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.preprocess.classical import BASELINES

from .stats import n_fovs, paired_difference


def denoise_summary(ev: pd.DataFrame, tm: pd.DataFrame) -> pd.DataFrame:
    """Per channel and method: mean PSNR/SSIM over the volumes it ran on, the gain over the noisy
    input (same volumes), and the wall time: ``total_s`` (N2V: training + prediction of every
    volume; a baseline: its volumes), ``s_per_volume`` (denoising alone) and ``total_s_per_volume``
    (N2V's training spread over its volumes), so methods run on different numbers of volumes
    compare per volume."""
    m = ev.groupby(["channel", "method"])[["psnr", "ssim"]].mean().reset_index()
    noisy = ev[ev["method"] == "noisy"].set_index(["channel", "fov_id"])[["psnr", "ssim"]]
    for k in ("psnr", "ssim"):
        gain = ev.assign(base=[noisy[k].get((c, f), np.nan) for c, f in zip(ev["channel"], ev["fov_id"])])
        gain = (gain[k] - gain["base"]).groupby([ev["channel"], ev["method"]]).mean().rename(f"{k}_gain")
        m = m.merge(gain.reset_index(), on=["channel", "method"], how="left")
    cols = ["channel", "method", "n_volumes", "train_s", "total_s", "s_per_volume", "total_s_per_volume"]
    t = tm.assign(total_s=tm["train_s"] + tm["denoise_s"])
    t["total_s_per_volume"] = t["total_s"] / t["n_volumes"].clip(lower=1)
    m = m.merge(t[cols], on=["channel", "method"], how="left")
    order = {k: i for i, k in enumerate(TARGETS)}
    morder = {k: i for i, k in enumerate(("noisy", "n2v", *BASELINES))}
    m = m.sort_values(["channel", "method"], key=lambda s: s.map(order if s.name == "channel" else morder))
    return m.reset_index(drop=True)


def _paired_means(ev: pd.DataFrame, a: str, b: str, chans: list[str]) -> tuple[float, float, float, float, int]:
    """Mean PSNR and SSIM of methods ``a`` and ``b`` over the volumes both scored (per channel,
    then over channels), and how many volumes that is."""
    pa, pb = [], []
    n = 0
    for c in chans:
        d = ev[ev["channel"] == c].pivot_table(index="fov_id", columns="method", values=["psnr", "ssim"])
        d = d.dropna(subset=[("psnr", a), ("psnr", b)])
        n += len(d)
        pa.append((d[("psnr", a)].mean(), d[("ssim", a)].mean()))
        pb.append((d[("psnr", b)].mean(), d[("ssim", b)].mean()))
    (psa, ssa), (psb, ssb) = np.mean(pa, axis=0), np.mean(pb, axis=0)
    return float(psa), float(ssa), float(psb), float(ssb), n


def _comparison(summary: pd.DataFrame, ev: pd.DataFrame | None, baseline: str, label: str,
                psnr_tol: float, ssim_tol: float):
    s = summary.set_index(["channel", "method"])
    chans = [c for c in TARGETS if (c, "n2v") in s.index and (c, baseline) in s.index]
    if not chans:
        return None
    n2v, base = s.loc[[(c, "n2v") for c in chans]], s.loc[[(c, baseline) for c in chans]]
    if ev is not None:
        psa, ssa, psb, ssb, n_pair = _paired_means(ev, "n2v", baseline, chans)
        where = f"on the {n_pair} volumes both denoised"
    else:
        psa, ssa, psb, ssb = n2v["psnr"].mean(), n2v["ssim"].mean(), base["psnr"].mean(), base["ssim"].mean()
        where = "averaged over the volumes each ran on"
    dpsnr, dssim = psa - psb, ssa - ssb
    n_vol = int(n2v["n_volumes"].sum())
    t_n2v = float(n2v["total_s"].sum())
    t_base = float((base["s_per_volume"].values * n2v["n_volumes"].values).sum())  # per volume x N2V's volumes
    quality = dpsnr >= -psnr_tol and dssim >= -ssim_tol
    return dict(chans=chans, dpsnr=dpsnr, dssim=dssim, psnr_n2v=psa, psnr_base=psb, where=where, quality=quality,
                t_n2v=t_n2v, t_base=t_base, n_vol=n_vol, n_base=int(base["n_volumes"].sum()),
                pv_n2v=t_n2v / max(n_vol, 1),
                pv_pred=float((n2v["s_per_volume"] * n2v["n_volumes"]).sum()) / max(n_vol, 1),
                pv_base=t_base / max(n_vol, 1), label=label)


def _within(d, tol: float) -> str:
    """"holds" when the interval of an N2V-minus-baseline PSNR difference lies above ``-tol``,
    "does not hold" when it lies below, else "cannot be decided with n = ...".
    """
    if d.n >= 2 and np.isfinite(d.ci_low):
        if d.ci_low > -tol:
            return "holds"
        if d.ci_high < -tol:
            return "does not hold"
    return f"cannot be decided with {n_fovs(d.n).replace('FOV', 'volume')}"


def channel_claims(ev: pd.DataFrame, baseline: str = "bm3d", baseline_label: str = "BM3D",
                   psnr_tol: float = 1.0) -> tuple[list[str], str]:
    """Per channel, from the per-volume scores ``ev`` (``fov_id, channel, method, psnr``): N2V's PSNR
    against the noisy input and against the baseline on the volumes both denoised (paired means
    with bootstrap intervals), and whether "N2V denoises about as well as the baseline" (at most
    ``psnr_tol`` dB below it) holds there. Returns the sentences and the verdict over all channels:
    "holds" (every channel), "does not hold" (some channel) or "cannot be decided with n = ...".
    """
    sentences, states, ns = [], [], []
    for c in TARGETS:
        w = ev[ev["channel"] == c].pivot_table(index="fov_id", columns="method", values="psnr")
        if "n2v" not in w:
            continue
        text = f"{TARGET_LABELS[c]}: "
        if "noisy" in w:
            dn = paired_difference(w["noisy"], w["n2v"])
            text += f"N2V {dn.diff:+.2f} dB against the noisy input ({n_fovs(dn.n).replace('FOV', 'volume')}"
            text += (f", interval [{dn.ci_low:+.2f}, {dn.ci_high:+.2f}])" if np.isfinite(dn.ci_low) else ")")
        if baseline in w:
            db = paired_difference(w[baseline], w["n2v"])
            state = _within(db, psnr_tol)
            states.append(state)
            ns.append(db.n)
            text += f"; {db.diff:+.2f} dB against {baseline_label} on {db.n} volume(s): about as well {state}"
        sentences.append(text + ".")
    if not states:
        return sentences, f"cannot be decided: no volume was denoised by both N2V and {baseline_label}"
    if all(s == "holds" for s in states):
        return sentences, "holds"
    if any(s == "does not hold" for s in states):
        return sentences, "does not hold"
    return sentences, f"cannot be decided with {n_fovs(ns).replace('FOV', 'volume')} per channel"


def thesis_claim(summary: pd.DataFrame, ev: pd.DataFrame | None = None, baseline: str = "bm3d",
                 baseline_label: str = "BM3D", psnr_tol: float = 1.0, ssim_tol: float = 0.05) -> str:
    """A plain sentence, generated from the numbers, on the thesis' claim that Noise2Void denoises
    about as well as BM3D in a fraction of the time, plus the same numbers against non-local means.

    "About as well": mean PSNR at most ``psnr_tol`` dB and mean SSIM at most ``ssim_tol`` below the
    baseline's, over the channels both ran on, and (with ``ev``, the per-volume scores) over the
    volumes both denoised, since the baseline may be capped to a few. Time is per volume: N2V's
    training plus prediction spread over the volumes it was trained on and denoised, against the
    baseline's time per volume; "a fraction of the time" means less than the baseline's.
    """
    r = _comparison(summary, ev, baseline, baseline_label, psnr_tol, ssim_tol)
    if r is None:
        return (f"The thesis' claim cannot be checked on this run: no channel was denoised by both Noise2Void "
                f"and {baseline_label} (is bm3d_max_volumes 0?).")
    faster = r["t_n2v"] < r["t_base"]
    sentences, per_channel = channel_claims(ev, baseline, baseline_label, psnr_tol) if ev is not None else ([], "")
    if ev is None:
        verdict = "holds" if r["quality"] and faster else "does not hold"
    elif not faster or per_channel == "does not hold":
        verdict = "does not hold"
    else:
        verdict = per_channel
    parts = [
        f"N2V's mean PSNR is {r['dpsnr']:+.2f} dB ({r['psnr_n2v']:.2f} against {r['psnr_base']:.2f} dB) and its "
        f"SSIM {r['dssim']:+.3f} relative to {baseline_label} {r['where']} "
        f"({'within' if r['quality'] else 'outside'} the tolerance of {psnr_tol} dB / {ssim_tol})",
        f"N2V took {r['pv_n2v']:.2f} s per volume (training spread over its {r['n_vol']} volumes; prediction "
        f"alone {r['pv_pred']:.2f} s) against {r['pv_base']:.2f} s per volume for {baseline_label} "
        f"(timed on {r['n_base']} volumes), {r['t_n2v'] / max(r['t_base'], 1e-9):.2f} times its time",
    ]
    text = f"On this run the thesis' claim {verdict}: " + "; ".join(parts) + "."
    if sentences:
        text += " Per channel: " + " ".join(sentences)
    other = [b for b in BASELINES if b != baseline]
    for b in other:
        o = _comparison(summary, ev, b, "non-local means" if b == "nlm" else b, psnr_tol, ssim_tol)
        if o is not None:
            text += (f" For reference, against {o['label']} N2V's PSNR is {o['dpsnr']:+.2f} dB and its SSIM "
                     f"{o['dssim']:+.3f} ({o['where']}), at {o['t_n2v'] / max(o['t_base'], 1e-9):.2f} times "
                     f"its time ({o['pv_base']:.2f} s per volume).")
    return text

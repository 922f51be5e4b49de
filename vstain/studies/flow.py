"""The third family on the perception-distortion plane: a conditional flow against the U-Net and the
WGAN-GP(s), and its uncertainty checked against the clean truth.

Data flow: the processed set and the book's model folders -> the flow trained at the U-Net's
recipe and sampled (:func:`vstain.training.flow.run_flow_stage`) -> every model's per-FOV
distortion and perception on the test split (:func:`vstain.studies.sweep.sweep_values`) -> each
model's value with an interval and its paired difference from the U-Net and from the WGAN-GP
(:func:`plane_summaries`) -> the verdict (:func:`plane_verdict`). Beside it: the coverage of the
flow's and the flips' predictive intervals, the AUROC of their spreads for the largest errors and
for wrong nuclei (:func:`uncertainty_tables`, :func:`calibration_verdict`), and the cost of a sample
against one U-Net pass.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from vstain.channels import TARGETS
from vstain.evaluate import kid
from vstain.evaluate.calibration import LEVELS, calibration_summary, coverage_rows, object_auroc, object_rows
from vstain.evaluate.stats import format_ci, min_pairs, n_fovs
from vstain.inference.infer import predict_volume
from vstain.inference.tta import FLIPS, predict_tta
from vstain.preprocess.processed import load_fov, read_manifest
from vstain.training.flow import ONE_SAMPLE, SPREAD
from vstain.volumes import read_volume

from .sweep import MEASURES, sweep_summary

UNET, WGAN, WGAN_FT = "U-Net", "WGAN-GP", "WGAN-GP from U-Net"
TTA = "U-Net, flip spread"


def flow_names(k: int) -> tuple[str, str]:
    """The table names of one flow sample and of the mean of ``k``."""
    return "flow, one sample", f"flow, mean of {k}"


def model_dirs(flow_dir, k: int, unet_dir, wgan_dir=None, wgan_ft_dir=None) -> dict[str, Path]:
    """Model name -> folder holding ``predictions/``: the U-Net, the WGAN-GP(s) given, one flow
    sample and the flow's mean, in that order."""
    one, mean = flow_names(k)
    dirs = {UNET: unet_dir, WGAN: wgan_dir, WGAN_FT: wgan_ft_dir, one: Path(flow_dir) / ONE_SAMPLE, mean: flow_dir}
    return {m: Path(d) for m, d in dirs.items() if d}


def plane_summaries(values: pd.DataFrame, scores: pd.DataFrame, models: list[str], n_resamples: int = 9999,
                    confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """:func:`vstain.studies.sweep.sweep_summary` twice, paired against the U-Net and against the
    WGAN-GP (the first of ``models`` that is not the U-Net or a flow), in one long table with a
    ``control`` column. Each model's own value and interval is the same in both."""
    controls = [UNET] + [m for m in models if m.startswith(WGAN)][:1]
    parts = []
    for c in controls:
        order = [c] + [m for m in models if m != c]
        parts.append(sweep_summary(values, scores, order, n_resamples, confidence, seed).assign(control=c))
    return pd.concat(parts, ignore_index=True)


def _said(r) -> str:
    """``"better (+0.03 [0.01, 0.05], n = 24)"``, ``"worse (...)"``, ``"no detectable difference (...)"``
    or, with fewer FOVs than a paired interval needs, ``"undecided (...)"``."""
    text = format_ci(r["diff"], r["diff_low"], r["diff_high"], int(r["n"]))
    if int(r["n"]) < min_pairs():
        return f"undecided ({text}: a paired interval decides from {min_pairs()} FOVs on)"
    if not r["decided"]:
        return f"no detectable difference ({text})"
    return f"{'better' if (r['diff'] > 0) == r['higher_is_better'] else 'worse'} ({text})"


def plane_verdict(summary: pd.DataFrame, k: int) -> str:
    """Per flow model (one sample, the mean of ``k``) and per control, the paired change in every
    measure: where the flow is better, worse, or not detectably different, from 95% intervals over
    the test FOVs."""
    fid = "truth" if (summary["reference"] == "truth").any() else "target"
    lines = [f"Paired over the test FOVs ({n_fovs(summary['n'])}), 95% intervals of the flow minus the other model; "
             f"PCC and SSIM against the {'clean truth' if fid == 'truth' else 'measured targets'}:", ""]
    for flow in flow_names(k):
        for control, g in summary[(summary["model"] == flow)].groupby("control", sort=False):
            rows = g[(g["role"] != "distortion") | (g["reference"] == fid)]
            said = [(MEASURES[r["metric"]][1], _said(r)) for _, r in rows.iterrows()]
            better, worse, same, open_ = ([name for name, text in said if text.startswith(word)]
                                          for word in ("better", "worse", "no detectable", "undecided"))
            detail = "; ".join(f"{name} {text}" for name, text in said)
            head = (f"beats the {control} on {', '.join(better)}" if better else f"beats the {control} on no measure")
            tail = (f"; loses on {', '.join(worse)}" if worse else "") + \
                   (f"; no detectable difference on {', '.join(same)}" if same else "") + \
                   (f"; too few FOVs to decide {', '.join(open_)}" if open_ else "")
            lines.append(f"- **{flow}** {head}{tail}. ({detail}.)")
    return "\n".join(lines)


def uncertainty_tables(stage_in, flow_dir, k: int, unet, voxel_size_zyx, split: str = "test",
                       max_voxels: int | None = None, seed: int = 0, progress: bool = True):
    """The flow's spread (its ``spread/`` files, ``k`` samples) and the U-Net's flip spread
    (:func:`vstain.inference.tta.predict_tta`, four flips), each against the clean truth.

    Returns ``(rows, objects, cost)``: :func:`vstain.evaluate.calibration.coverage_rows` of both
    models for every FOV with a truth; :func:`vstain.evaluate.calibration.object_rows` of the DNA
    channel; and per FOV the seconds of one U-Net pass (``unet_seconds``)."""
    df = read_manifest(stage_in)
    df = df[df["split"] == split]
    flow = flow_names(k)[1]
    rows, objects, cost = [], [], []
    dna = TARGETS.index("dna")
    for _, r in tqdm(list(df.iterrows()), desc="uncertainty", disable=not progress):
        x, _, truth = load_fov(r)
        t = time.perf_counter()
        predict_volume(unet, x, max_voxels=max_voxels)
        cost.append({"fov_id": str(r["fov_id"]), "unet_seconds": time.perf_counter() - t})
        if truth is None:
            continue
        mean_f = read_volume(Path(flow_dir) / "predictions" / f"{r['fov_id']}.tif")
        sd_f = read_volume(Path(flow_dir) / SPREAD / f"{r['fov_id']}.tif")
        mean_t, sd_pop = predict_tta(unet, x, max_voxels=max_voxels)
        n = len(FLIPS)
        sd_t = sd_pop * np.sqrt(n / (n - 1))  # as the samples' spread: n - 1 degrees of freedom
        for model, mean, sd, kk in ((flow, mean_f, sd_f, k), (TTA, mean_t, sd_t, n)):
            rows += coverage_rows(model, r["fov_id"], mean, sd, truth, kk, seed=seed)
            if not np.isnan(truth[dna]).all():
                objects += object_rows(model, r["fov_id"], mean[dna], sd[dna], truth[dna], voxel_size_zyx)
    return pd.DataFrame(rows), pd.DataFrame(objects), pd.DataFrame(cost)


def calibration_table(rows: pd.DataFrame, objects: pd.DataFrame, n_resamples: int = 9999,
                      confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One long table: per model, channel and nominal ``level`` the observed ``coverage``; per model
    and channel the voxel ``auroc`` (``level`` NaN); per model the object-level ``object_auroc``
    (``channel`` ``"nuclei"``, ``n`` the objects): each ``value, low, high, n``."""
    summary = calibration_summary(rows, n_resamples, confidence, seed)
    obj = object_auroc(objects) if len(objects) else pd.DataFrame(columns=["model", "objects", "auroc"])
    extra = pd.DataFrame({"model": obj["model"], "channel": "nuclei", "level": np.nan, "measure": "object_auroc",
                          "value": obj["auroc"], "low": np.nan, "high": np.nan, "n": obj["objects"],
                          "missed": obj.get("missed"), "invented": obj.get("invented")})
    return pd.concat([summary, extra], ignore_index=True)


def calibration_verdict(table: pd.DataFrame) -> str:
    """Per model: the observed coverage of its nominal intervals (mean over channels and FOVs), the
    median voxel AUROC over channels, and the object-level AUROC."""
    parts = []
    for model, g in table.groupby("model", sort=False):
        cov = g[g["measure"] == "coverage"].groupby("level")["value"].mean()
        cover = ", ".join(f"{lv:.0%} intervals hold {cov[lv]:.0%}" for lv in LEVELS if lv in cov.index)
        auc = g.loc[g["measure"] == "auroc", "value"].median()
        obj = g[g["measure"] == "object_auroc"]
        objs = (f"; over {int(obj['n'].iloc[0])} nuclei ({int(obj['missed'].iloc[0])} missed, "
                f"{int(obj['invented'].iloc[0])} invented) the mean spread finds the wrong ones with AUROC "
                f"{obj['value'].iloc[0]:.2f}" if len(obj) and np.isfinite(obj["value"].iloc[0]) else
                "; too few wrong nuclei for an object-level AUROC")
        parts.append(f"- **{model}**: {cover} of the clean truth's voxels (mean over channels); its spread finds "
                     f"the largest tenth of the errors with a median AUROC of {auc:.2f} over channels{objs}.")
    calibrated = "A calibrated spread holds each nominal share; below it the intervals are too narrow " \
                 "(overconfident), above too wide. An AUROC of 0.5 is a spread that knows nothing of the errors."
    return "\n".join(parts + ["", calibrated])



def sampling_cost(sampling: pd.DataFrame, cost: pd.DataFrame, k: int, passes: int) -> tuple[pd.DataFrame, str]:
    """Per FOV the seconds of all its ``k`` samples (``seconds``, from
    :func:`vstain.training.flow.run_flow_stage`) beside one U-Net pass (``unet_seconds``), and a
    sentence with the means and their ratio."""
    t = sampling.assign(fov_id=sampling["fov_id"].astype(str)).merge(cost.assign(fov_id=cost["fov_id"].astype(str)),
                                                                      on="fov_id")
    t = t.dropna(subset=["seconds"])
    if t.empty:
        return t, "No FOV was sampled in this run (every sample was reused), so no sampling time was measured."
    flow_s, unet_s = t["seconds"].mean(), t["unet_seconds"].mean()
    return t, (f"Sampling a FOV {k} times took {flow_s:.1f} s on average ({passes} network passes), one U-Net pass "
               f"{unet_s:.2f} s: {flow_s / unet_s:.0f} times as long (mean over n = {len(t)} FOVs).")


def calibration_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`calibration_table` for reading: per model and channel the observed coverage at each
    nominal level, the voxel AUROC and (row ``nuclei``) the object-level AUROC, as
    ``"0.78 [0.74, 0.81]"``."""
    def cell(r):
        if not np.isfinite(r["low"]):
            return f"{r['value']:.2f}"
        return f"{r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"

    t = table.assign(column=[f"coverage {lv:.0%}" if m == "coverage" else ("voxel AUROC" if m == "auroc" else
                                                                         "object AUROC")
                             for m, lv in zip(table["measure"], table["level"])],
                     text=table.apply(cell, axis=1))
    wide = t.pivot_table(index=["model", "channel"], columns="column", values="text", aggfunc="first", sort=False)
    cols = [c for c in [f"coverage {lv:.0%}" for lv in LEVELS] + ["voxel AUROC", "object AUROC"] if c in wide]
    return wide[cols].fillna("–")


def kid_scores(clf, clf_cfg, stage_in, dirs: dict[str, Path], split: str = "test", reference: str = "target",
               n_resamples: int = 999, confidence: float = 0.95, seed: int = 0, device: str = "cpu",
               precision: str = "32-true") -> pd.DataFrame:
    """Every model's KID to the measured patches in the classifier's feature space
    (:func:`vstain.evaluate.kid.kid_table`), paired against the U-Net."""
    meta, vectors = kid.patch_embeddings(clf, clf_cfg, stage_in, {m: Path(d) / "predictions" for m, d in dirs.items()},
                                         split, reference, device, precision)
    return kid.kid_table(meta, vectors, list(dirs), control=UNET, n_resamples=n_resamples, confidence=confidence,
                         seed=seed)


def kid_verdict(table: pd.DataFrame) -> str:
    """Over all channels: each model's KID with its interval and, against the U-Net, whether it is
    lower (more realistic), higher, or not detectably different."""
    at = table[table["channel"] == kid.ALL]
    parts = []
    for _, r in at.iterrows():
        head = f"**{r['model']}** {r['kid']:.3g} [{r['low']:.3g}, {r['high']:.3g}]"
        if r["model"] != UNET:
            said = ("lower than the U-Net's" if r["diff"] < 0 else "higher than the U-Net's") if r["decided"] else \
                "no detectable difference from the U-Net"
            head += f" ({said}: {r['diff']:+.3g} [{r['diff_low']:.3g}, {r['diff_high']:.3g}])"
        parts.append(head)
    n = int(at["n"].max()) if len(at) else 0
    return (f"KID over all channels' patches (lower: closer to the measured patches' distribution; 95% intervals "
            f"resampling the n = {n} test FOVs): " + "; ".join(parts) + ".")

"""Controls for the realism measures: the clean truth degraded in known ways, scored as if it were a
model, so that each measure shows what it rewards.

- **Blur** (Gaussian, ``sigma`` voxels in Y and X): a measure of realism or sharpness that does not
  get worse when the truth is blurred cannot judge the blur that pixel losses are known for.
- **Shift** (the structures moved by a quarter of the field in Y and X, wrapping round): every
  structure keeps its look, but no longer sits in its own cell. A distribution-level measure of
  realism (F1clf, KID) should barely notice; a measure of correspondence (PCC, SSIM, the per-target
  perceptual distance) should collapse.

:func:`write_controls` writes each control as a model folder (``<name>/predictions/<fov_id>.tif``),
so every scoring function of the study reads it as it reads a model's predictions.
:func:`control_findings` turns the measures' paired differences from the undegraded truth into what
each measure can and cannot judge.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from vstain.channels import TARGETS
from vstain.preprocess import processed
from vstain.volumes import made_from, mark_source, read_volume, sha256, write_volume

from .fovpool import map_fovs
from .stats import min_pairs

TRUTH = "truth"
BLUR_SIGMAS = (1.0, 2.0, 4.0)  # voxels in Y and X: 1 softens, 4 erases structures finer than ~10 voxels
SHIFT = "shifted"
SHIFT_FRACTION = 0.25  # of the field in Y and X: several cell diameters on the book's fields


def blur_name(sigma: float) -> str:
    return f"blur {sigma:g}"


def control_names(sigmas=BLUR_SIGMAS) -> list[str]:
    """The controls in the order of :func:`write_controls`: the truth first (the reference)."""
    return [TRUTH, *(blur_name(s) for s in sigmas), SHIFT]


def blurred(vol: np.ndarray, sigma: float) -> np.ndarray:
    """``[C, Z, Y, X]`` blurred in Y and X with a Gaussian of ``sigma`` voxels (Z untouched, so a
    slice keeps its focus)."""
    return ndimage.gaussian_filter(vol.astype(np.float32), sigma=(0, 0, float(sigma), float(sigma)), mode="reflect")


def shifted(vol: np.ndarray, fraction: float = SHIFT_FRACTION) -> np.ndarray:
    """``[C, Z, Y, X]`` rolled by ``fraction`` of the field in Y and X."""
    dy, dx = (int(round(fraction * n)) for n in vol.shape[-2:])
    return np.roll(vol, shift=(dy, dx), axis=(-2, -1))


def write_controls(stage_in, out_dir, split: str = "test", sigmas=BLUR_SIGMAS) -> dict[str, Path]:
    """Write the truth and its controls for every FOV of ``split`` and return ``name -> folder``
    (each holding ``predictions/<fov_id>.tif``). FOVs already written from the same truth file
    (its SHA-256 in ``sources/<fov_id>.sha256``) are kept, so an interrupted run resumes and a new
    simulation is written afresh. Needs the simulator's clean truth."""
    df = processed.read_manifest(stage_in)
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"{stage_in}: no FOV in split {split!r}")
    out_dir = Path(out_dir)
    dirs = {name: out_dir / name.replace(" ", "_") for name in control_names(sigmas)}
    for _, r in df.iterrows():
        if not (isinstance(r["truth_path"], str) and r["truth_path"]):
            raise ValueError(f"{r['path']}: FOV {r['fov_id']} has no clean truth; the controls need the simulator's")

    def one_fov(r) -> None:
        rel = Path("predictions") / f"{r['fov_id']}.tif"
        source, marker = sha256(r["truth_path"]), out_dir / "sources" / f"{r['fov_id']}.sha256"
        if all((d / rel).exists() for d in dirs.values()) and made_from(marker, source):
            return  # written from this very truth file (a new simulation writes new truths under the same ids)
        truth = read_volume(r["truth_path"]).astype(np.float32)
        vols = {TRUTH: truth, **{blur_name(s): blurred(truth, s) for s in sigmas}, SHIFT: shifted(truth)}
        for name, vol in vols.items():
            write_volume(dirs[name] / rel, vol, list(TARGETS))
        mark_source(marker, source)

    map_fovs(one_fov, [r for _, r in df.iterrows()])
    return dirs


def control_findings(summary: pd.DataFrame, sigmas=BLUR_SIGMAS) -> pd.DataFrame:
    """What each measure shows under the controls, from a :func:`vstain.studies.sweep.sweep_summary`
    of the controls (the truth as the control, ``higher_is_better`` per measure).

    Returns one row per ``(metric, reference)``: ``label``, ``penalises_blur`` (the largest blur is
    decided worse than the truth), ``monotone_in_blur`` (each larger blur scores no better than the
    smaller one), ``penalises_shift`` (the shifted truth is decided worse), and ``judges``: what the
    measure can be used for (``"realism"`` when blur costs and the shifted truth still scores better
    than the mildest blur, ``"correspondence"`` when the shift costs more than that, ``"nothing of
    blur"`` when blur does not cost, ``"undecided"`` with fewer FOVs than
    :func:`vstain.evaluate.stats.min_pairs`)."""
    rows = []
    blurs = [blur_name(s) for s in sigmas]
    for (metric, ref), g in summary.groupby(["metric", "reference"], sort=False):
        g = g.set_index("model")
        better = 1.0 if bool(g["higher_is_better"].iloc[0]) else -1.0

        def worse(model: str) -> bool:
            r = g.loc[model]
            return bool(r["decided"]) and better * r["diff"] < 0

        est = [better * g.loc[b, "estimate"] for b in blurs]
        blur_cost, shift_cost = worse(blurs[-1]), worse(SHIFT)
        # realism: a sharp structure in the wrong cell still scores better than the mildest blur
        sharp_first = better * g.loc[SHIFT, "estimate"] > est[0]
        judges = ("nothing of blur" if not blur_cost else "realism" if (not shift_cost or sharp_first)
                  else "correspondence")
        if int(g["n"].min()) < min_pairs():
            judges = "undecided"
        rows.append({"metric": metric, "reference": ref, "label": g["label"].iloc[0],
                     "penalises_blur": blur_cost, "monotone_in_blur": bool(np.all(np.diff(est) <= 1e-12)),
                     "penalises_shift": shift_cost, "judges": judges})
    return pd.DataFrame(rows)


def controls_sentence(findings: pd.DataFrame) -> str:
    """The controls' verdict in words: which measures judge realism, which correspondence with the
    truth, and which do not see blur."""
    phrases = {  # (one measure, several measures)
        "realism": ("gets worse under blur, and a sharp structure moved away from its cell still scores better "
                    "than the mildest blur, so it judges realism", "get worse under blur, and a sharp structure "
                    "moved away from its cell still scores better than the mildest blur, so they judge realism"),
        "correspondence": ("gets worse under blur and under the shift, so it measures correspondence with "
                           "the truth (distortion), not realism alone", "get worse under blur and under the "
                           "shift, so they measure correspondence with the truth (distortion), not realism alone"),
        "nothing of blur": ("does not get worse under the strongest blur, so it cannot judge sharpness",
                            "do not get worse under the strongest blur, so they cannot judge sharpness"),
    }
    phrases["undecided"] = (f"cannot be read: fewer than {min_pairs()} FOVs decide nothing",
                            f"cannot be read: fewer than {min_pairs()} FOVs decide nothing")
    parts = []
    for judges, (one, several) in phrases.items():
        labels = list(dict.fromkeys(findings.loc[findings["judges"] == judges, "label"]))
        if labels:
            parts.append(f"{', '.join(labels)} {one if len(labels) == 1 else several}")
    return ("; ".join(parts) + ".") if parts else "No measure was scored on the controls."

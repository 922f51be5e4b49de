"""How real is the simulated world? Its measured properties beside published values, what its
geometry alone gives away, and whether it ranks the channels as the thesis' real data do.

* :func:`measure_world` simulates FOVs with a stage's geometry and measures, per cell and per FOV,
  what the literature reports: volumes and their ratio, heights and diameters, nucleoli, the
  mitotic fraction, organelle volume fractions, refractive indices, and each fluorescence
  channel's signal-to-noise ratio and noise ceiling.
* :func:`geometry_predictability` predicts every channel from the true instance labels alone (a
  lookup of the mean signal by distance to the nearest wall and to the nucleus), once from the
  cells and nuclei and once from the nuclei only (walls of their Voronoi partition): a channel the
  nuclei alone predict is given away by whatever shows the nuclei.
* :func:`run_realism_stage` adds the learnability ordering (:mod:`vstain.evaluate.learnability`):
  the U-Net's per-channel PCC beside the thesis' Table 4.1, and the budget it is measured at.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats
from scipy.spatial import cKDTree

from vstain.channels import TARGET_LABELS, TARGETS
from vstain.data import optics, stage
from vstain.data.simulate import PHASES, SimConfig, index_terms, simulate_fov

from .downstream import noise_ceiling
from .learnability import channel_budget, learnability
from .published import GEOMETRY, INDEX, compare, psf_table

COMPARTMENTS = ("cytoplasm", "nucleus", "nucleoli", "mito", "lipid", "vesicles")


def walls(label: np.ndarray) -> np.ndarray:
    """Voxels where the label changes within one voxel (a 2D or 3D label image)."""
    return ndimage.maximum_filter(label, 3) != ndimage.minimum_filter(label, 3)


def nuclear_voronoi(nuclei: np.ndarray, pixel_size: tuple[float, float, float]) -> np.ndarray:
    """The partition ``[Z, Y, X]`` that the nuclei alone imply: every voxel to the nearest nucleus
    centroid in its slice's (y, x) (the cell walls a brightfield that shows only nuclei gives)."""
    ids = np.unique(nuclei)[1:]
    if ids.size == 0:
        return np.zeros_like(nuclei)
    centres = np.array(ndimage.center_of_mass(nuclei > 0, nuclei, ids))[:, 1:] * np.array(pixel_size[1:])
    ny, nx = nuclei.shape[1:]
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * pixel_size[1], (np.arange(nx) + 0.5) * pixel_size[2], indexing="ij")
    vor = ids[cKDTree(centres).query(np.stack([yy.ravel(), xx.ravel()], -1))[1]].reshape(ny, nx)
    return np.broadcast_to(vor, nuclei.shape)


def wall_offset_um(cells: np.ndarray, nuclei: np.ndarray, pixel_size: tuple[float, float, float]) -> float:
    """Median distance (µm) from the true walls between two cells that both show their nucleus in
    the FOV to the walls of the nuclei's Voronoi partition: 0 when the walls follow from the
    nuclei alone."""
    vor = nuclear_voronoi(nuclei, pixel_size)
    hi, lo = ndimage.maximum_filter(cells, 3), ndimage.minimum_filter(cells, 3)
    has_nucleus = np.zeros(int(cells.max()) + 1, bool)
    has_nucleus[np.unique(nuclei)] = True
    has_nucleus[0] = False
    true_walls = (hi != lo) & has_nucleus[hi] & has_nucleus[lo]
    vor_walls = walls(vor)
    if not true_walls.any() or not vor_walls.any():
        return float("nan")
    dist = ndimage.distance_transform_edt(~vor_walls, sampling=(1e3, *pixel_size[1:]))  # per slice
    return float(np.median(dist[true_walls]))


def _cell_rows(f: dict, fov: int) -> pd.DataFrame:
    """Per whole (uncut) cell: volumes, N/C ratio, height, diameter, nucleoli."""
    t = f["instances"].copy()
    px = f["pixel_size"]
    nucleoli = f["density"]["nucleoli"] > 0.5
    comp, n_comp = ndimage.label(nucleoli)
    owner = ndimage.maximum(f["labels"]["cells"], comp, np.arange(1, n_comp + 1)) if n_comp else np.array([])
    size = ndimage.sum(nucleoli, comp, np.arange(1, n_comp + 1)) * float(np.prod(px)) if n_comp else np.array([])
    t["nucleoli"] = [int((owner == i).sum()) for i in t["id"]]
    in_cell = np.bincount(f["labels"]["cells"][nucleoli], minlength=int(t["id"].max()) + 1) * float(np.prod(px))
    t["nucleoli_fraction"] = in_cell[t["id"].to_numpy()] / t["nucleus_um3"].clip(lower=1e-6)
    t["nucleolus_diameter_um"] = [float(np.mean(2 * (3 * size[owner == i] / (4 * np.pi)) ** (1 / 3)))
                                  if (owner == i).any() else np.nan for i in t["id"]]
    cells = f["labels"]["cells"]
    area = np.array([(cells == i).any(0).sum() for i in t["id"]]) * px[1] * px[2]
    t["diameter_um"] = 2 * np.sqrt(area / np.pi)
    t["nc_ratio"] = t["nucleus_um3"] / (t["cell_um3"] - t["nucleus_um3"]).clip(lower=1e-6)
    t.insert(0, "fov", fov)
    return t[~t["cut"]]


def _index_rows(f: dict, cfg: SimConfig) -> dict:
    """The refractive index (absolute) of each compartment: the median in the core of the
    cytoplasm, nucleus and nucleoli; for the organelles, which fill voxels only partly, the index of
    their material, ``n_cytoplasm + (n_voxel - n_cytoplasm) / fraction`` over voxels they fill by
    at least a third."""
    d, n = f["density"], f["refractive_index"] + cfg.n_medium
    organelles = d["mito"] + d["lipid"] + d["vesicles"]
    core = {"cytoplasm": (d["cytoplasm"] > 0.95) & (organelles < 0.02),
            "nucleus": (d["nucleus"] > 0.95) & (d["nucleoli"] < 0.05), "nucleoli": d["nucleoli"] > 0.95}
    out = {k: float(np.median(n[m])) if m.any() else np.nan for k, m in core.items()}
    for k in ("mito", "lipid", "vesicles"):
        m = (d[k] > 1 / 3) & (d[k] > 0.95 * organelles) & (d["cytoplasm"] > 0.95)
        out[k] = float(np.median(out["cytoplasm"] + (n[m] - out["cytoplasm"]) / d[k][m])) if m.any() else np.nan
    return out


def _snr_rows(f: dict, cfg: SimConfig) -> list[dict]:
    """Per target: signal-to-noise ratio (mean signal above background inside the structure over
    the noise's standard deviation there) and noise ceiling (:func:`downstream.noise_ceiling` of one
    image from the simulator's camera against the clean signal), in the cell layer."""
    lo, hi = f["focus_z_lo"], f["focus_z_hi"]
    rng = np.random.default_rng(0)
    clean = f["truth"][:, lo:hi]
    noisy = np.stack([optics.camera(c / cfg.gain, rng, gain=cfg.gain, offset=cfg.offset, read_noise=cfg.read_noise)
                      for c in clean]).astype(np.float32)
    ceiling = noise_ceiling(noisy, clean, TARGETS)
    rows = []
    for i, name in enumerate(TARGETS):
        signal = clean[i] - np.median(clean[i])
        inside = signal > 0.5 * np.quantile(signal, 0.999)
        noise = np.sqrt(cfg.gain * clean[i][inside] + cfg.read_noise**2).mean()
        rows.append({"channel": name, "snr": float(signal[inside].mean() / noise), "noise_ceiling": ceiling[name]})
    return rows


def brightfield_shares(f: dict, cfg: SimConfig) -> dict[str, float]:
    """Each compartment's share of the brightfield's fine-scale variance in the cell layer.

    The brightfield model is linear in the refractive index, so the stack is the sum of the stacks
    of each compartment's index term (:func:`vstain.data.simulate.index_terms`); each is imaged
    alone, band-passed (Gaussians of 1 and 4 voxels laterally: the scale of organelles and walls),
    and its variance taken over the in-focus slices. The shares add up to about 1 (cross terms
    aside)."""
    lo, hi = f["focus_z_lo"], f["focus_z_hi"]
    out = {}
    for name, dn in index_terms(cfg, f["density"]).items():
        phase = (2 * np.pi * cfg.pixel_size[0] / cfg.bf_wavelength * dn).astype(np.float32)
        image = optics.brightfield_stack(phase, np.zeros_like(phase), cfg.pixel_size, wavelength_um=cfg.bf_wavelength,
                                         na_objective=cfg.na_objective, na_condenser=cfg.na_condenser,
                                         n_medium=cfg.n_medium)[lo:hi]
        band = ndimage.gaussian_filter(image, (0, 1, 1)) - ndimage.gaussian_filter(image, (0, 4, 4))
        out[name] = float(band.var())
    total = sum(out.values()) or 1.0
    return {k: v / total for k, v in out.items()}


def brightfield_sentence(shares: pd.DataFrame) -> str:
    """The brightfield shares (mean, min, max over FOVs per compartment) in words, largest first."""
    t = shares.sort_values("mean", ascending=False)
    parts = [f"{r.compartment} {r.mean:.0%} ({r.min:.0%}-{r.max:.0%})" for r in t.itertuples()]
    return "Share of the brightfield's fine-scale variance, mean (range over FOVs): " + "; ".join(parts) + "."


def measure_world(cfg: SimConfig, n_fovs: int = 4, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Simulate ``n_fovs`` FOVs (cycling the tagged structures) and measure them.

    Returns tables: ``cells`` (one row per whole cell), ``fovs`` (per FOV: mitotic fraction,
    organelle volume fractions, wall offset from the nuclei's Voronoi walls), ``index`` (per FOV and
    compartment, the refractive index), ``snr`` (per FOV and channel), ``brightfield`` (per FOV and
    compartment, its share of the brightfield's fine-scale variance)."""
    cells, fovs, index, snr, bright = [], [], [], [], []
    structures = ("mito", "envelope", "actomyosin", "nucleoli")
    for k in range(n_fovs):
        f = simulate_fov(cfg, structures[k % 4], seed * 1000 + k)
        cells.append(_cell_rows(f, k))
        d, inst = f["density"], f["instances"]
        cyto = d["cytoplasm"].sum()
        fovs.append({"fov": k, "cells": len(inst), "mitotic_fraction": float((inst["phase"] == "M").mean()),
                     "mito_fraction": float(d["mito"].sum() / cyto), "lipid_fraction": float(d["lipid"].sum() / cyto),
                     "vesicle_fraction": float(d["vesicles"].sum() / cyto),
                     "wall_offset_um": wall_offset_um(f["labels"]["cells"], f["labels"]["nuclei"], f["pixel_size"])})
        index.append({"fov": k, **_index_rows(f, cfg)})
        snr += [{"fov": k, **r} for r in _snr_rows(f, cfg)]
        bright += [{"fov": k, "compartment": c, "share": v} for c, v in brightfield_shares(f, cfg).items()]
    return {"cells": pd.concat(cells, ignore_index=True), "fovs": pd.DataFrame(fovs),
            "index": pd.DataFrame(index), "snr": pd.DataFrame(snr), "brightfield": pd.DataFrame(bright)}


def cycle_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The share of each cell-cycle phase among the whole cells measured."""
    share = cells["phase"].value_counts(normalize=True).reindex(list(PHASES), fill_value=0.0)
    return pd.DataFrame({"phase": share.index, "share": share.values, "n": len(cells)})


# ---------------------------------------------------------------------------------------------
# What the geometry alone gives away
# ---------------------------------------------------------------------------------------------
WALL_BINS = np.arange(0, 3.01, 0.2)  # µm to the nearest wall
NUCLEUS_BINS = np.arange(-3, 3.01, 0.2)  # µm signed distance to the nucleus (< 0 inside)
HEIGHT_BIN = 0.6  # µm


def _features(cells: np.ndarray, nuclei: np.ndarray, pixel_size, lo: int, nuclei_only: bool) -> np.ndarray:
    """Per voxel of the focus window ``[lo:]``: one bin index of (wall distance, nucleus distance, height)."""
    boundary = walls(nuclear_voronoi(nuclei, pixel_size) if nuclei_only else cells)
    d_wall = ndimage.distance_transform_edt(~boundary, sampling=pixel_size)
    inside = nuclei > 0
    s_nuc = (ndimage.distance_transform_edt(~inside, sampling=pixel_size)
             - ndimage.distance_transform_edt(inside, sampling=pixel_size))
    h = ((np.arange(cells.shape[0]) - lo) * pixel_size[0] / HEIGHT_BIN).astype(int)
    h = np.broadcast_to(np.clip(h, 0, 20)[:, None, None], cells.shape)
    bw = np.digitize(d_wall, WALL_BINS)
    bn = np.digitize(s_nuc, NUCLEUS_BINS)
    return (bw * (len(NUCLEUS_BINS) + 1) + bn) * 21 + h


def geometry_predictability(fovs: list[tuple[np.ndarray, dict, tuple, tuple]]) -> pd.DataFrame:
    """Predict every channel of the clean truth from the true instances alone.

    Args:
        fovs: ``(truth [6, Z, Y, X], labels {"cells", "nuclei"}, pixel_size, (lo, hi))`` per FOV.

    The predictor is a lookup of the mean (per-FOV standardised) signal per bin of wall distance,
    nucleus distance and height, fitted on the even FOVs and scored (PCC) on the odd ones. Returns
    one row per channel and source (``"cells and nuclei"``, ``"nuclei only"``): ``pcc`` (mean over
    the scored FOVs), ``n``."""
    if len(fovs) < 2:
        raise ValueError(f"geometry_predictability needs at least 2 FOVs (one to fit, one to score), got {len(fovs)}")
    rows = []
    for source, nuclei_only in (("cells and nuclei", False), ("nuclei only", True)):
        feats = [_features(lab["cells"][lo:hi], lab["nuclei"][lo:hi], px, 0, nuclei_only).ravel()
                 for _, lab, px, (lo, hi) in fovs]
        size = max(int(f.max()) for f in feats) + 1
        for c, name in enumerate(TARGETS):
            vals = []
            for _, (t, _, _, (lo, hi)) in enumerate(fovs):
                v = t[c, lo:hi].ravel()
                vals.append((v - v.mean()) / (v.std() + 1e-9))
            total, count = np.zeros(size), np.zeros(size)
            for f, v in list(zip(feats, vals))[::2]:
                total += np.bincount(f, v, size)
                count += np.bincount(f, None, size)
            table = total / np.maximum(count, 1)
            pcc = [stats.pearsonr(table[f], v)[0] for f, v in list(zip(feats, vals))[1::2]]
            rows.append({"channel": name, "source": source, "pcc": float(np.nanmean(pcc)), "n": len(pcc)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def stage_config(stage01: str | Path) -> SimConfig:
    """The simulator's configuration of a run: the FOV shape and voxel size of its ``01_data``."""
    first = stage.read_stage_fov(stage.read_fovs(stage01).iloc[0])
    return SimConfig(shape=tuple(first.bf.shape[1:]), pixel_size=first.pixel_size)


def predictability_sentence(table: pd.DataFrame) -> str:
    """What the geometry-only predictor says, per channel, in words."""
    p = table.set_index(["channel", "source"])["pcc"]
    parts = [f"{TARGET_LABELS[c]} {p[c, 'nuclei only']:.2f} from the nuclei alone and {p[c, 'cells and nuclei']:.2f} "
             f"with the true cells" for c in TARGETS]
    free = [TARGET_LABELS[c] for c in TARGETS if c not in ("dna", "envelope") and p[c, "nuclei only"] > 0.6]
    verdict = ("Beyond DNA and the envelope, which are the nuclei, no channel is given away by the nuclei "
               "(none above PCC 0.6 from them)." if not free else
               f"Given away by the nuclei alone (PCC above 0.6): {', '.join(free)}.")
    return f"Geometry-only PCC: {'; '.join(parts)}. {verdict}"


def run_realism_stage(out_dir: str | Path, stage01: str | Path, pixel_metrics: str | Path | None,
                      n_fovs: int = 4, n_predict_fovs: int = 8, model: str = "U-Net", n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0, stage03: str | Path | None = None,
                      snapshot_predictions: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Measure the simulated world of a run and compare it with the literature and the thesis.

    Args:
        out_dir: the stage folder; every table is written there as ``<name>.csv``.
        stage01: the run's ``01_data`` folder: its geometry (FOV shape, voxel size) is simulated
            anew for :func:`measure_world`, and its FOVs (truth and true instances) feed
            :func:`geometry_predictability`.
        pixel_metrics: the run's ``07_results/pixel_metrics.csv`` (per-FOV scores against the
            measured targets), or None to skip the learnability ordering.
        n_fovs: FOVs simulated for the measurements; n_predict_fovs: stage-01 FOVs for the
            geometry-only predictor (half fit, half scored).
        stage03, snapshot_predictions: the run's ``03_denoising`` folder and the learning curves'
            ``07_results/curves/snapshot_predictions.csv``, for :func:`channel_budget` (the
            ``budget`` table, and ``channel_curves``: the model's per-channel PCC at every snapshot,
            from the ``curves.csv`` beside it); None skips them.

    Returns the tables: ``geometry``, ``index`` (published vs simulated), ``psf``, ``cycle``,
    ``snr`` (per channel, mean over FOVs), ``brightfield`` (each compartment's share of the
    brightfield's fine-scale variance: mean, min and max over FOVs), ``predictability`` and, with pixel metrics,
    ``learnability`` and ``rho``, and with the snapshots ``budget`` and ``channel_curves``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fovs = stage.read_fovs(stage01)
    if (fovs["truth_path"] == "").any():
        raise ValueError(f"{stage01}: the realism page measures simulated FOVs; these FOVs have no clean truth")
    cfg = stage_config(stage01)
    world = measure_world(cfg, n_fovs, seed)
    chosen = fovs.iloc[:: max(1, len(fovs) // n_predict_fovs)].head(n_predict_fovs)
    sample = []
    for _, row in chosen.iterrows():
        f = stage.read_stage_fov(row)
        sample.append((f.truth, {"cells": f.labels[0], "nuclei": f.labels[1]}, f.pixel_size, f.focus_z))
    snr = world["snr"].groupby("channel", sort=False)[["snr", "noise_ceiling"]].mean().reset_index()
    shares = world["brightfield"].groupby("compartment", sort=False)["share"].agg(["mean", "min", "max"]).reset_index()
    tables = {"geometry": compare(GEOMETRY, world), "index": compare(INDEX, world), "psf": psf_table(cfg),
              "cycle": cycle_table(world["cells"]), "snr": snr, "brightfield": shares,
              "predictability": geometry_predictability(sample), "cells": world["cells"], "fovs": world["fovs"]}
    if pixel_metrics is not None:
        tables["learnability"], tables["rho"] = learnability(pd.read_csv(pixel_metrics, dtype={"fov_id": str}), model,
                                                             n_resamples, confidence, seed)
    if stage03 is not None and snapshot_predictions is not None:
        tables["budget"] = channel_budget(stage03, snapshot_predictions, model, confidence=confidence)
        curves = pd.read_csv(Path(snapshot_predictions).parent / "curves.csv")  # the same folder's curves
        tables["channel_curves"] = curves[(curves["model"] == model) & (curves["metric"] == "pcc")
                                          & curves["channel"].isin(TARGETS)].reset_index(drop=True)
    for name, t in tables.items():
        t.to_csv(out / f"{name}.csv", index=False)
    return tables

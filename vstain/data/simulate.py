"""Simulated hiPSC colony FOVs in the Allen Cell dataset layout: the study's offline default.

The real data (Viana et al. 2023; thesis 2.1) are z-stacks of tightly packed, epithelial-like
hiPSC monolayers, each FOV one cell line: brightfield, one FP-tagged structure, a DNA dye and a
membrane dye. :func:`simulate_fov` builds such a FOV from a 3D cell model and images it:

1. :mod:`vstain.data.cells` partitions the FOV into cells (irregular, tilted walls; off-centre
   nuclei; a cell-cycle phase per cell, a few percent in mitosis);
2. :mod:`vstain.data.organelles` fills them (nucleus, nucleoli, envelope, DNA, mitochondria,
   lipid droplets and vesicles, actomyosin, a membrane dye with uneven uptake);
3. this module images them: the brightfield from the refractive index of every compartment
   through :mod:`vstain.data.optics`, the six fluorescence channels through their PSFs, and a
   camera.

Every parameter is a physical quantity in :class:`~vstain.data.simconfig.SimConfig`, with its
source. :mod:`vstain.data.registry` writes FOVs as OME-TIFFs plus a per-cell ``metadata.csv`` and
publishes them as a local quilt3 registry that :mod:`vstain.data.allen` reads exactly as it reads
the real one. Unlike the real data, every FOV also carries its clean six-channel ground truth, its
true instances and its true in-focus z-range.

Random streams: one generator per concern, seeded by ``(seed, k)``: the cells (drawn in µm, so the
same seed builds the same cells at any voxel size), the organelles' positions, the textures, and
the imaging noise.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from vstain.channels import TARGETS

from . import optics
from .cells import colony
from .fields import draw
from .organelles import structures
from .simconfig import REAL_PIXEL_SIZE, SimConfig

__all__ = ["STRUCTURES", "REAL_PIXEL_SIZE", "SimConfig", "simulate_fov", "refractive_index", "index_terms"]

STRUCTURES: tuple[str, ...] = ("mito", "envelope", "actomyosin", "nucleoli")
PLASMA_SHELL_UM = 0.1 * np.sqrt(2 * np.pi)  # the integral across the plasma membrane's Gaussian shell


# ----------------------------------------------------------------------------------------------
# Imaging


def index_terms(cfg: SimConfig, d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each compartment's share of the refractive index above the medium ``[Z, Y, X]``: its
    index step where it is, the organelles by their volume fraction, the plasma membrane by its
    bilayer's optical thickness (``membrane_dn_um`` per wall), a metaphase plate by its compaction.
    The terms add up to :func:`refractive_index`."""
    cyto = cfg.n_cytoplasm
    chromosomes = (cfg.n_nucleus - cfg.n_medium) * cfg.chromatin_compaction + cfg.n_medium
    return {"cytoplasm": (cyto - cfg.n_medium) * d["cell"], "nucleus": (cfg.n_nucleus - cyto) * d["nucleus"],
            "chromosomes": (chromosomes - cyto) * d["chromosomes"],
            "nucleoli": (cfg.n_nucleoli - cfg.n_nucleus) * d["nucleoli"], "mito": (cfg.n_mito - cyto) * d["mito"],
            "lipid": (cfg.n_lipid - cyto) * d["lipid"], "vesicles": (cfg.n_vesicle - cyto) * d["vesicles"],
            "actomyosin": (cfg.n_actomyosin - cyto) * np.clip(d["actomyosin"], 0, 1),
            "membrane": cfg.membrane_dn_um / PLASMA_SHELL_UM * d["plasma"]}


def refractive_index(cfg: SimConfig, d: dict[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
    """The refractive index above the medium ``[Z, Y, X]``: the sum of :func:`index_terms`."""
    return (scale * sum(index_terms(cfg, d).values())).astype(np.float32)


def _brightfield(cfg: SimConfig, d: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The brightfield z-stack (photons) of the refractive-index and absorption model."""
    dz = cfg.pixel_size[0]
    dn = refractive_index(cfg, d, draw(rng, cfg.n_scale))
    mu = cfg.mu_cytoplasm * d["cell"] + cfg.mu_nucleoli * d["nucleoli"]
    phase = 2 * np.pi * dz * dn / cfg.bf_wavelength
    intensity = optics.brightfield_stack(phase, mu * dz, cfg.pixel_size, wavelength_um=cfg.bf_wavelength,
                                         na_objective=cfg.na_objective, na_condenser=cfg.na_condenser,
                                         n_medium=cfg.n_medium)
    field = optics.illumination_field(cfg.shape[1:], draw(rng, cfg.illumination), rng)
    flicker = 1 + rng.normal(0, 0.003, cfg.shape[0]).astype(np.float32)[:, None, None]  # lamp
    return np.clip(intensity, 0, None) * field * flicker * draw(rng, cfg.bf_photons)


def _fluorescence(cfg: SimConfig, d: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Clean camera signal (ADU above offset) ``[6, Z, Y, X]`` of all targets: density x
    brightness + background, through the confocal PSF of each channel's excitation."""
    bright, excitation = dict(cfg.brightness), dict(cfg.excitation_um)
    truth = np.empty((len(TARGETS), *cfg.shape), np.float32)
    for i, name in enumerate(TARGETS):
        photons = d[name] * draw(rng, bright[name]) + draw(rng, cfg.background)
        sz, sxy = optics.confocal_psf_sigmas(excitation[name], cfg.na_objective, cfg.n_medium)
        truth[i] = cfg.gain * optics.blur(photons, (sz, sxy, sxy), cfg.pixel_size)
    return truth


def _instance_labels(site: np.ndarray, cell: np.ndarray, nucleus: np.ndarray) -> dict[str, np.ndarray]:
    """True instances as uint16 ``[Z, Y, X]`` label images: ``cells`` numbers the lattice sites that
    have a cell voxel in the FOV 1..N in site order (0 = background); ``nuclei`` carries the id of
    the cell it lies in, so the nucleus of cell k has id k. Uses no random numbers."""
    sites = np.broadcast_to(site, cell.shape)
    present = np.unique(sites[cell])
    if len(present) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(present)} cells in one FOV do not fit uint16 instance labels")
    lut = np.zeros(int(site.max()) + 1, np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    cells = np.where(cell, lut[sites], 0).astype(np.uint16)
    return {"cells": cells, "nuclei": np.where(nucleus, cells, 0).astype(np.uint16)}


PHASES = ("G1", "S", "G2", "M")


def _instance_table(labels: dict[str, np.ndarray], site: np.ndarray, col, pixel_size) -> pd.DataFrame:
    """One row per true instance: its site, cell-cycle phase, DNA content, cell and nucleus volume
    (µm³), apex height (µm) and whether the FOV's lateral border cuts it."""
    cells, nuclei = labels["cells"], labels["nuclei"]
    n = int(cells.max())
    voxel = float(np.prod(pixel_size))
    ids = np.arange(1, n + 1)
    cell_v = np.bincount(cells.ravel(), minlength=n + 1)[1:] * voxel
    nuc_v = np.bincount(nuclei.ravel(), minlength=n + 1)[1:] * voxel
    sites = np.zeros(n + 1, np.int64)
    sites[cells.ravel()] = np.broadcast_to(site, cells.shape).ravel()
    sites = sites[1:]
    edge = np.zeros(n + 1, bool)
    for face in (cells[:, 0], cells[:, -1], cells[:, :, 0], cells[:, :, -1]):
        edge[np.unique(face)] = True
    return pd.DataFrame({"id": ids, "site": sites, "phase": [PHASES[k] for k in col.phase[sites]],
                         "dna_content": col.content[sites], "cell_um3": cell_v, "nucleus_um3": nuc_v,
                         "height_um": col.height[sites], "cut": edge[1:]})


def simulate_fov(cfg: SimConfig, structure: str, seed: int) -> dict:
    """One simulated FOV of the cell line whose tagged structure is ``structure``.

    Args:
        cfg: the simulator's configuration.
        structure: the FP-tagged structure, one of :data:`STRUCTURES` (a TARGETS key).
        seed: the FOV is a deterministic function of ``(cfg, seed)``; ``structure`` only picks
            which channel is measured.

    Returns:
        dict with ``brightfield``, ``dna``, ``membrane``, ``struct``: uint16 ``[Z, Y, X]`` camera
        images (offset ``cfg.offset``); ``truth``: float32 ``[6, Z, Y, X]`` the clean, PSF-blurred,
        noise-free signal of all six targets in TARGETS order, in ADU above the camera offset (the
        mean of each measured channel is ``truth + offset``); ``focus_z_lo``, ``focus_z_hi``: the
        slices ``[lo, hi)`` that hold the cell layer; ``cells``: a table of the cells in the FOV
        (centre inside, or a third of the cell visible; ``cell``, ``y_um``, ``x_um``);
        ``masks``: bool ``cell``, ``nucleus`` (chromatin: a nucleus or a metaphase plate) and the
        int ``label`` (the site of each voxel), all ``[Z, Y, X]`` (for tests and figures);
        ``labels``: the true instances, uint16 ``cells`` and ``nuclei`` ``[Z, Y, X]`` (0 =
        background, 1..N; the nucleus of cell k has id k; every cell with a voxel in the FOV, cut
        or not); ``instances``: :func:`_instance_table`; ``density``: the model's density fields
        (float32 ``[Z, Y, X]`` per compartment); ``refractive_index``: the index above the medium;
        ``pixel_size``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}: the tagged structure must be one of {STRUCTURES}")
    cells_rng, organelle_rng, texture_rng, imaging_rng = (np.random.default_rng([seed, k]) for k in range(4))
    col = colony(cfg, cells_rng)
    dens = structures(cfg, col, texture_rng, organelle_rng)
    truth = _fluorescence(cfg, dens, imaging_rng)
    bf = _brightfield(cfg, dens, imaging_rng)
    cam = dict(gain=cfg.gain, offset=cfg.offset, read_noise=cfg.read_noise)
    out = {"brightfield": optics.camera(bf, imaging_rng, **cam)}
    for key, name in (("dna", "dna"), ("membrane", "membrane"), ("struct", structure)):
        out[key] = optics.camera(truth[TARGETS.index(name)] / cfg.gain, imaging_rng, **cam)
    cell = dens["cell"] > 0.5
    chromatin = (dens["nucleus"] + dens["chromosomes"]) > 0.5
    zs = np.flatnonzero(cell.any(axis=(1, 2)))
    if zs.size == 0:  # a FOV that shows only a gap in the colony: the layer's designed slices
        zs = np.arange(int(col.z_basal / cfg.pixel_size[0]),
                       int(np.ceil((col.z_basal + col.height.max()) / cfg.pixel_size[0])))
    extent = cfg.extent[1:]
    # the cells of the metadata: centre in the FOV, or at least a third of a cell's area visible
    # (so a FOV smaller than a cell still has its rows)
    mid = col.label[min(max(int((col.z_basal + col.height.mean() / 2) / cfg.pixel_size[0]), 0), cfg.shape[0] - 1)]
    area = np.bincount(mid.ravel(), minlength=len(col.seeds)) * np.prod(cfg.pixel_size[1:])
    centred = np.all((col.seeds >= 0) & (col.seeds < extent), axis=1)
    inside = col.alive & (centred | (area > np.pi * col.r_in ** 2 / 3))
    if not inside.any():
        inside[np.argmax(area * col.alive)] = True
    cells = pd.DataFrame({"cell": np.flatnonzero(inside), "y_um": col.seeds[inside, 0],
                          "x_um": col.seeds[inside, 1]})
    labels = _instance_labels(col.label, cell, chromatin)
    out.update(truth=truth, focus_z_lo=int(zs.min()), focus_z_hi=int(zs.max()) + 1, cells=cells,
               masks={"cell": cell, "nucleus": chromatin, "label": col.label}, labels=labels,
               instances=_instance_table(labels, col.label, col, cfg.pixel_size), density=dens,
               refractive_index=refractive_index(cfg, dens), pixel_size=tuple(cfg.pixel_size))
    return out


# ----------------------------------------------------------------------------------------------
# The Allen layout as a local quilt3 registry

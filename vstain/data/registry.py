"""The simulated FOVs written as the real dataset is laid out: a local quilt3 registry in the Allen
Cell layout (:func:`write_registry`), which :mod:`vstain.data.allen` reads exactly as it reads the
real one, and a single FOV as a microscope would save it (:func:`write_plain_fov`).
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from vstain.channels import ALLEN_PACKAGE, CHANNEL_COLUMNS, DEFAULT_GENE_MAP, LABEL_CHANNELS, TARGETS
from vstain.volumes import write_ome

from .allen import publish_local
from .simulate import STRUCTURES, SimConfig, simulate_fov

# Channel orders of the written FOVs, cycled so the loader must use the ChannelNumber* columns.
CHANNEL_ORDERS: tuple[tuple[str, ...], ...] = (
    ("brightfield", "struct", "membrane", "dna"),
    ("membrane", "struct", "dna", "brightfield"),
    ("dna", "brightfield", "membrane", "struct"),
)
CHANNEL_NAMES = {"brightfield": "Bright", "struct": "EGFP", "membrane": "CMDRP", "dna": "H3342"}


def _genes(gene_map: dict[str, str] | None) -> dict[str, str]:
    """structure -> gene: the first gene that ``gene_map`` (gene -> structure) lists for it."""
    genes: dict[str, str] = {}
    for gene, target in (gene_map or DEFAULT_GENE_MAP).items():
        genes.setdefault(target, gene)
    return genes


PARALLEL_FROM = 8  # FOVs from which the simulation runs in worker processes (their start-up costs ~1 s)


def _write_fov(folder: Path, cfg: SimConfig, structure: str, seed: int, fov_id: int) -> dict:
    """Simulate FOV ``fov_id`` and write its three files; returns what its metadata rows need."""
    fov = simulate_fov(cfg, structure, np.random.SeedSequence([seed, fov_id]).generate_state(1)[0])
    order = CHANNEL_ORDERS[fov_id % len(CHANNEL_ORDERS)]
    keys = {"fov": f"fov_path/{fov_id}.ome.tiff", "truth": f"truth_path/{fov_id}_truth.ome.tiff",
            "labels": f"truth_labels_path/{fov_id}_labels.ome.tiff"}
    write_ome(folder / keys["fov"], np.stack([fov[c] for c in order]), [CHANNEL_NAMES[c] for c in order],
              cfg.pixel_size)
    write_ome(folder / keys["truth"], fov["truth"], list(TARGETS), cfg.pixel_size)
    write_ome(folder / keys["labels"], np.stack([fov["labels"][c] for c in LABEL_CHANNELS]), list(LABEL_CHANNELS),
              cfg.pixel_size)
    return {"fov_id": fov_id, "structure": structure, "order": order, "keys": keys, "cells": fov["cells"],
            "focus": (fov["focus_z_lo"], fov["focus_z_hi"])}


def write_registry(out_dir: str | Path, n_per_structure: int, cfg: SimConfig | None = None, seed: int = 0,
                   structures: Sequence[str] = STRUCTURES, gene_map: dict[str, str] | None = None,
                   workers: int | None = None, progress: bool = False) -> str:
    """Simulate FOVs and publish them in the Allen layout as a local quilt3 registry.

    Args:
        out_dir: the registry's root; the package's files go to ``out_dir/<ALLEN_PACKAGE>/``
            (replaced if present): ``metadata.csv``, ``fov_path/<FOVId>.ome.tiff`` (uint16
            ``[4, Z, Y, X]``, channel order cycling through :data:`CHANNEL_ORDERS`) and
            ``truth_path/<FOVId>_truth.ome.tiff`` (float32 ``[6, Z, Y, X]``, TARGETS order) and
            ``truth_labels_path/<FOVId>_labels.ome.tiff`` (uint16 ``[2, Z, Y, X]``: the true
            ``cells`` and ``nuclei`` instances of :func:`simulate_fov`).
        n_per_structure: FOVs per tagged structure.
        cfg: the simulator configuration (default :class:`SimConfig`).
        seed: FOV ``i`` is simulated with seed ``(seed, i)``.
        structures: the tagged structures (TARGETS keys of :data:`STRUCTURES`).
        gene_map: gene -> structure as :data:`vstain.channels.DEFAULT_GENE_MAP`; the first gene listed
            for a structure names its cell line (``structure_name``).
        workers: processes that simulate FOVs side by side (None: one per CPU core from
            :data:`PARALLEL_FROM` FOVs on, else 1). Every FOV depends on its seed only, so the
            registry is the same for any number of workers.
        progress: show a progress bar over the FOVs.

    Returns:
        The registry URI: ``quilt3.Package.browse(ALLEN_PACKAGE, registry=uri)`` reads it offline.
        ``metadata.csv`` has one row per cell (``CellId, FOVId, structure_name, fov_path,
        ChannelNumberBrightfield, ChannelNumberStruct, ChannelNumber405, ChannelNumber638,
        outlier``, plus the simulator's ``truth_path, truth_labels_path, focus_z_lo, focus_z_hi,
        PixelScaleZ/Y/X, cell_y_um, cell_x_um``).
    """
    cfg = cfg or SimConfig()
    genes = _genes(gene_map)
    bad = [s for s in structures if s not in STRUCTURES or s not in genes]
    if bad:
        raise ValueError(f"unknown structure(s) {bad}: each must be one of {STRUCTURES} with a gene in gene_map")
    if n_per_structure < 1:
        raise ValueError(f"n_per_structure must be >= 1, got {n_per_structure}")
    folder = Path(out_dir) / ALLEN_PACKAGE
    shutil.rmtree(folder, ignore_errors=True)
    jobs = [(folder, cfg, structure, seed, k) for k, structure in
            enumerate(s for s in structures for _ in range(n_per_structure))]
    if workers is None:
        workers = min(os.cpu_count() or 1, len(jobs)) if len(jobs) >= PARALLEL_FROM else 1
    bar = dict(total=len(jobs), desc="simulate", unit="FOV", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            written = list(tqdm(pool.map(_write_fov, *zip(*jobs)), **bar))
    else:
        written = [_write_fov(*job) for job in tqdm(jobs, **bar)]
    rows, cell_id = [], 0
    for w in written:
        outlier_rng = np.random.default_rng([seed, w["fov_id"], 1])
        for j, c in enumerate(w["cells"].itertuples()):
            rows.append({
                "CellId": cell_id, "FOVId": w["fov_id"], "structure_name": genes[w["structure"]],
                "fov_path": w["keys"]["fov"], **{CHANNEL_COLUMNS[ch]: w["order"].index(ch) for ch in w["order"]},
                "outlier": "Yes" if j > 0 and outlier_rng.random() < 0.05 else "No",
                "truth_path": w["keys"]["truth"], "truth_labels_path": w["keys"]["labels"],
                "focus_z_lo": w["focus"][0], "focus_z_hi": w["focus"][1],
                "PixelScaleZ": cfg.pixel_size[0], "PixelScaleY": cfg.pixel_size[1],
                "PixelScaleX": cfg.pixel_size[2], "cell_y_um": round(c.y_um, 3), "cell_x_um": round(c.x_um, 3)})
            cell_id += 1
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return publish_local(folder, out_dir, ALLEN_PACKAGE)


def write_plain_fov(path: str | Path, cfg: SimConfig | None = None, structure: str = "nucleoli", seed: int = 0,
                    order: Sequence[str] = ("dna", "brightfield", "struct", "membrane")) -> dict:
    """One simulated FOV as a plain single-file OME-TIFF, the way a microscope would save it:
    uint16 channels in ``order`` (named as :data:`CHANNEL_NAMES`: brightfield is ``"Bright"``) with
    the physical pixel sizes, and no metadata table. Returns :func:`simulate_fov`'s dict (the clean
    truth and the true in-focus range among it), so a prediction of the file can be scored."""
    cfg = cfg or SimConfig()
    if sorted(order) != sorted(CHANNEL_NAMES):
        raise ValueError(f"order must name each of {sorted(CHANNEL_NAMES)} once, got {list(order)}")
    fov = simulate_fov(cfg, structure, seed)
    write_ome(path, np.stack([fov[c] for c in order]), [CHANNEL_NAMES[c] for c in order], cfg.pixel_size)
    return fov

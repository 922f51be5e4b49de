"""The simulated FOVs written as the real dataset is laid out: a local quilt3 registry in the Allen
Cell layout (:func:`write_registry`), which :mod:`vstain.data.allen` reads exactly as it reads the
real one, and a single FOV as a microscope would save it (:func:`write_plain_fov`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

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


def write_registry(out_dir: str | Path, n_per_structure: int, cfg: SimConfig | None = None, seed: int = 0,
                   structures: Sequence[str] = STRUCTURES, gene_map: dict[str, str] | None = None) -> str:
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
    rows, cell_id, fov_id = [], 0, 0
    for structure in structures:
        for _ in range(n_per_structure):
            fov = simulate_fov(cfg, structure, np.random.SeedSequence([seed, fov_id]).generate_state(1)[0])
            order = CHANNEL_ORDERS[fov_id % len(CHANNEL_ORDERS)]
            key, tkey = f"fov_path/{fov_id}.ome.tiff", f"truth_path/{fov_id}_truth.ome.tiff"
            lkey = f"truth_labels_path/{fov_id}_labels.ome.tiff"
            write_ome(folder / key, np.stack([fov[c] for c in order]),
                      [CHANNEL_NAMES[c] for c in order], cfg.pixel_size)
            write_ome(folder / tkey, fov["truth"], list(TARGETS), cfg.pixel_size)
            write_ome(folder / lkey, np.stack([fov["labels"][c] for c in LABEL_CHANNELS]), list(LABEL_CHANNELS),
                      cfg.pixel_size)
            outlier_rng = np.random.default_rng([seed, fov_id, 1])
            for j, c in enumerate(fov["cells"].itertuples()):
                rows.append({
                    "CellId": cell_id, "FOVId": fov_id, "structure_name": genes[structure], "fov_path": key,
                    **{CHANNEL_COLUMNS[ch]: order.index(ch) for ch in order},
                    "outlier": "Yes" if j > 0 and outlier_rng.random() < 0.05 else "No",
                    "truth_path": tkey, "truth_labels_path": lkey,
                    "focus_z_lo": fov["focus_z_lo"], "focus_z_hi": fov["focus_z_hi"],
                    "PixelScaleZ": cfg.pixel_size[0], "PixelScaleY": cfg.pixel_size[1],
                    "PixelScaleX": cfg.pixel_size[2], "cell_y_um": round(c.y_um, 3),
                    "cell_x_um": round(c.x_um, 3)})
                cell_id += 1
            fov_id += 1
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

"""Published values of what the simulator models, and the simulated world measured beside them.

Each row names a quantity, its published range (or ``None`` where nothing is published: the
simulator's value is then an assumption), the source (a key of ``book/references.bib``) and how
the simulated FOVs measure it (:func:`vstain.evaluate.realism.measure_world`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vstain.data import optics
from vstain.data.simconfig import SimConfig


@dataclass(frozen=True)
class Published:
    """One quantity: its published range and source, and the measured column it is compared with."""

    quantity: str
    unit: str
    lo: float | None
    hi: float | None
    source: str  # bib key(s), or "assumption"
    table: str  # which table of measure_world holds the measurement
    column: str
    pooled: bool = False  # a per-FOV fraction of cells: pooled over all cells (weighted by the FOV's "cells")


GEOMETRY = (
    Published("cell volume (interphase)", "µm³", 1160, 2320, "allen_sizescaling", "cells", "cell_um3"),
    Published("cell height", "µm", 8, 15, "allencell_methods", "cells", "height_um"),
    Published("cell diameter", "µm", 11, 17, "allen_sizescaling", "cells", "diameter_um"),
    Published("nucleus / cytoplasm volume", "", None, None, "thomson1998 (high; no value published)", "cells",
              "nc_ratio"),
    Published("nucleoli per nucleus", "", 1, 3, "esc_nucleolus2020 (mostly one in pluripotent cells)", "cells",
              "nucleoli"),
    Published("nucleolus diameter", "µm", None, None, "none for hiPSC: 1-2 µm in differentiated cells "
              "(jastrow_nucleolus), larger in pluripotent ones (esc_nucleolus2020)", "cells", "nucleolus_diameter_um"),
    Published("nucleoli / nucleus volume", "", 0, 0.25, "jastrow_nucleolus (up to ~25 %)", "cells",
              "nucleoli_fraction"),
    Published("mitotic fraction", "", 0.033, 0.045, "becker2006 (15.8 h cycle, ~1 h mitosis)", "fovs",
              "mitotic_fraction", pooled=True),
    Published("mitochondria / cytoplasm volume", "", 0.04, 0.072, "rossmel1972, facucho2009", "fovs", "mito_fraction"),
    Published("lipid droplets / cytoplasm volume", "", None, None, "assumption", "fovs", "lipid_fraction"),
    Published("vesicles / cytoplasm volume", "", None, None, "assumption", "fovs", "vesicle_fraction"),
)

INDEX = (
    Published("cytoplasm", "", 1.36, 1.38, "liu2016", "index", "cytoplasm"),
    Published("nucleus", "", 1.355, 1.365, "schurmann2016, steelman2017", "index", "nucleus"),
    Published("nucleoli", "", 1.37, 1.39, "liu2016", "index", "nucleoli"),
    Published("mitochondria", "", 1.40, 1.42, "haseda2015", "index", "mito"),
    Published("lipid droplets", "", 1.46, 1.48, "kim2016lipid", "index", "lipid"),
    Published("vesicles", "", None, None, "assumption", "index", "vesicles"),
)


def _fmt(v: float | None) -> str:
    return "none published" if v is None else f"{v:.4g}"


def compare(rows: tuple[Published, ...], world: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Each quantity's published range (or the assumed one, where its source is an assumption)
    beside the simulated median (for a pooled row, the share among all cells) and 10-90 % range,
    with ``n`` (cells or FOVs measured) and whether that value lies in the range."""
    out = []
    for r in rows:
        v = world[r.table][r.column].dropna()
        if r.table == "cells" and r.column == "cell_um3" and "phase" in world["cells"]:
            v = world["cells"].loc[world["cells"]["phase"] != "M", r.column].dropna()
        med = float(v.median()) if len(v) else np.nan
        if r.pooled and len(v):  # the share among all cells measured, not the median FOV's
            cells = world[r.table].loc[v.index, "cells"]
            med = float((v * cells).sum() / cells.sum())
        inside = None if r.lo is None else bool(r.lo <= med <= r.hi)
        out.append({"quantity": r.quantity, "unit": r.unit,
                    "published": ("none published" if r.lo is None else
                                  f"{'assumed ' if 'assumption' in r.source else ''}{_fmt(r.lo)} - {_fmt(r.hi)}"),
                    "source": r.source, "simulated median": med,
                    "simulated 10-90 %": f"{v.quantile(0.1):.3g} - {v.quantile(0.9):.3g}" if len(v) else "",
                    "n": len(v), "in range": {None: "", True: "yes", False: "no"}[inside]})
    return pd.DataFrame(out)


# emission peaks (µm) of the Allen dyes and tag: NucBlue (Hoechst 33342), mEGFP, CellMask Deep Red
EMISSION_UM = {"dna": 0.461, "membrane": 0.686, "mito": 0.509, "envelope": 0.509, "actomyosin": 0.509,
               "nucleoli": 0.509}


def psf_table(cfg: SimConfig) -> pd.DataFrame:
    """Per fluorescence channel: the confocal PSF the simulator uses (FWHM, µm, at the excitation
    wavelength) beside the widefield PSF of the same objective (at the emission wavelength)."""
    rows = []
    k = optics.FWHM_PER_SIGMA
    for name, ex in cfg.excitation_um:
        cz, cxy = optics.confocal_psf_sigmas(ex, cfg.na_objective, cfg.n_medium)
        wz, wxy = optics.widefield_psf_sigmas(EMISSION_UM[name], cfg.na_objective, cfg.n_medium)
        rows.append({"channel": name, "excitation (nm)": round(ex * 1000),
                     "emission (nm)": round(EMISSION_UM[name] * 1000),
                     "confocal FWHM xy": cxy * k, "confocal FWHM z": cz * k,
                     "widefield FWHM xy": wxy * k, "widefield FWHM z": wz * k})
    return pd.DataFrame(rows)

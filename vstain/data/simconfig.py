"""The simulator's configuration: every parameter a physical quantity with its source.

Each value carries, in its comment, the published value it comes from (a key of
``book/references.bib``) or says that it is an assumption and why. The realism page (notebook
``10_realism``) tabulates them beside what the simulated FOVs measure.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from vstain.channels import TARGETS

from .fields import Range

REAL_PIXEL_SIZE = (0.29, 0.108, 0.108)  # µm (z, y, x) of the Allen FOVs (viana2023)
MITOTIC_PHASE = 3  # index of M in SimConfig.cycle_fractions (G1, S, G2, M)


@dataclass(frozen=True)
class SimConfig:
    """Geometry, optics and camera of the simulated FOVs. Ranges ``(lo, hi)`` are drawn uniformly
    (per FOV or per cell, as the comment says), so cells and FOVs vary. Lengths in µm, refractive
    indices absolute, intensities in photons.

    Args:
        shape: FOV shape ``(Z, Y, X)``, each >= 8.
        pixel_size: voxel size ``(z, y, x)`` in µm. The real FOVs are sampled at
            :data:`REAL_PIXEL_SIZE`; the default is coarser so that a small crop holds whole cells
            on a CPU. Structure sizes are in µm, so the same seed builds the same cells at any
            voxel size (only the sampling differs).
        margin_slices: minimum empty slices above and below the cell layer.
    """

    shape: tuple[int, int, int] = (32, 96, 96)
    pixel_size: tuple[float, float, float] = (0.6, 0.3, 0.3)
    margin_slices: int = 2
    # --- colony geometry (per FOV unless said) ---
    # mean lateral spacing: 1160-2320 µm³ interphase cells (allen_sizescaling) at these heights
    cell_diameter: Range = (13.0, 16.0)
    cell_height: Range = (8.0, 11.0)  # apex height inside a colony; hiPSCs are up to 20 µm tall (allencell_methods)
    height_cv: float = 0.08  # per-cell spread of the apex height, clipped at 2 sd (assumption)
    dome_edge: Range = (0.75, 0.9)  # apical height at a cell's edge / its apex: flat-topped colonies (assumption)
    fill: Range = (0.92, 1.0)  # fraction of lattice sites holding a cell: tightly packed colonies (viana2023)
    size_cv: float = 0.18  # per-cell spread of the lateral size (power-diagram radius) (assumption)
    wall_tilt_deg: float = 15.0  # largest tilt of a cell's axis from the vertical (assumption)
    wall_wobble: float = 0.6  # µm amplitude of the walls' lateral undulation (assumption)
    wall_wobble_corr: float = 2.0  # µm correlation length of that undulation (assumption)
    nucleus_offset: float = 1.5  # µm largest lateral offset of a nucleus from its cell's centre (assumption)
    nucleus_lateral: Range = (0.85, 1.05)  # nucleus lateral semi-axis / inscribed cell radius, clipped by the walls
    nucleus_axial: Range = (0.36, 0.42)  # nucleus axial semi-axis / cell height: nuclei span most of the height
    wall_gap: float = 0.5  # µm of cytoplasm kept between a nucleus and its cell's wall (assumption)
    # P(1, 2, 3 nucleoli) per nucleus: pluripotent cells mostly hold a single large nucleolus, differentiated
    # cells more and smaller ones (esc_nucleolus2020; the shares are an assumption)
    nucleoli_count: tuple[float, float, float] = (0.45, 0.35, 0.2)
    # nucleolar / nuclear volume per nucleus: nucleoli take up to ~25 % of a nucleus (jastrow_nucleolus) and are
    # large in pluripotent cells (esc_nucleolus2020); nucleolar size scales with cell size (weber2015); the range is an
    # assumption (no hiPSC value published)
    nucleoli_fraction: Range = (0.04, 0.12)
    nucleolar_dna: float = 1 / 3  # DNA density in nucleoli / nucleoplasm: 3-fold lower (proteinatlas_nucleoli)
    # --- cell cycle ---
    # G1 19 %, S 65.5 %, G2/M 15.5 % in hESC (becker2006); M ~4 % of a 15.8 h cycle with a ~1 h
    # mitosis (assumption: 2^(1/15.8) - 1)
    cycle_fractions: tuple[float, float, float, float] = (0.19, 0.655, 0.115, 0.04)
    chromatin_compaction: float = 3.0  # metaphase chromatin density / interphase (assumption)
    mitotic_rounding: float = 1.2  # mitotic cell height / interphase height: cells round up (stewart2011; assumption)
    # --- organelles ---
    # 7.2 % of the non-nuclear volume in cultured cells (rossmel1972); fewer in pluripotent cells (facucho2009)
    mito_volume_fraction: Range = (0.04, 0.072)
    mito_radius: float = 0.2  # µm: tubes 0.25-0.5 µm wide, near the resolution limit (jakobs2014)
    mito_length: Range = (1.0, 6.0)  # µm per tube: small, some tubular (facucho2009)
    lipid_per_cell: float = 10.0  # mean lipid droplets per cell (assumption: 0-20 per cell; none published for hPSC)
    lipid_radius: Range = (0.15, 0.5)  # µm: 0.1-2 µm droplets outside adipocytes, skewed small (assumption)
    vesicles_per_cell: float = 60.0  # mean vesicles and endosomes per cell (assumption)
    vesicle_radius: Range = (0.05, 0.25)  # µm: endosomes 0.1-0.5 µm wide (assumption)
    # --- refractive indices (liu2016 review unless said) ---
    n_medium: float = 1.335  # culture medium at ~700 nm: water 1.331 plus solutes (assumption)
    n_cytoplasm: float = 1.365  # 1.36-1.38 (liu2016)
    n_nucleus: float = 1.358  # below the cytoplasm (schurmann2016, steelman2017)
    n_nucleoli: float = 1.375  # the densest nuclear body, 1.37-1.39 (liu2016)
    n_mito: float = 1.41  # an isolated mitochondrion, 1.41 +- 0.01 (haseda2015)
    n_lipid: float = 1.47  # neutral-lipid core, 1.46-1.48 (kim2016lipid)
    n_vesicle: float = 1.38  # endosomes and lysosomes (assumption; none published)
    n_actomyosin: float = 1.39  # dense protein bundles (assumption: 0.18 mL/g at ~0.3 g/mL, barer1952)
    membrane_dn_um: float = 0.0005  # µm optical thickness per wall: (1.46 - 1.365) x 5 nm bilayer (assumption)
    n_scale: Range = (0.9, 1.1)  # per-FOV factor on all index increments (cell-density variation)
    mu_cytoplasm: float = 0.002  # 1/µm amplitude attenuation: cells are nearly transparent (assumption)
    mu_nucleoli: float = 0.006  # 1/µm (assumption)
    # --- fluorescence: photons per voxel at density 1 (per FOV), PSF and emission ---
    # (no photon counts are published for the Allen channels: assumption, kept from the first
    # simulator; CellMask is the dimmest dye)
    brightness: tuple[tuple[str, Range], ...] = (
        ("dna", (150.0, 400.0)), ("membrane", (60.0, 200.0)), ("mito", (60.0, 200.0)),
        ("envelope", (60.0, 200.0)), ("actomyosin", (50.0, 160.0)), ("nucleoli", (80.0, 250.0)))
    background: Range = (3.0, 10.0)  # photons per voxel (autofluorescence, out-of-focus haze)
    membrane_uptake_cv: float = 0.3  # per-cell spread of CellMask uptake (assumption)
    membrane_internalised: float = 0.25  # share of CellMask endocytosed into puncta over time (assumption)
    # spinning-disk confocal, pinhole ~1 Airy unit: FWHM 0.51 lambda_ex / NA laterally and
    # 0.88 lambda_ex / (n - sqrt(n^2 - NA^2)) axially (wilhelm_clsm), per channel's excitation
    excitation_um: tuple[tuple[str, float], ...] = (
        ("dna", 0.405), ("membrane", 0.638), ("mito", 0.488), ("envelope", 0.488),
        ("actomyosin", 0.488), ("nucleoli", 0.488))
    # --- brightfield ---
    bf_wavelength: float = 0.706  # µm, Allen 706/95 nm transmitted-light filter
    na_objective: float = 1.25
    na_condenser: float = 0.55
    bf_photons: Range = (2000.0, 4000.0)  # mean photons per brightfield pixel
    illumination: Range = (0.05, 0.15)  # strength of the uneven illumination field
    # --- camera ---
    gain: float = 1.0  # ADU per photon
    offset: float = 100.0  # ADU
    read_noise: float = 2.0  # ADU

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be (Z, Y, X) with each >= 8, got {self.shape}")
        if len(self.pixel_size) != 3 or min(self.pixel_size) <= 0:
            raise ValueError(f"pixel_size must be three positive µm values (z, y, x), got {self.pixel_size}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "Range" and not (len(v) == 2 and 0 <= v[0] <= v[1]):
                raise ValueError(f"{f.name} must be a range (lo, hi) with 0 <= lo <= hi, got {v}")
        if set(dict(self.brightness)) != set(TARGETS) or set(dict(self.excitation_um)) != set(TARGETS):
            raise ValueError(f"brightness and excitation_um need one entry per target {TARGETS}")
        for name in ("cycle_fractions", "nucleoli_count"):
            p = np.asarray(getattr(self, name))
            if (p < 0).any() or abs(p.sum() - 1) > 1e-6:
                raise ValueError(f"{name} must be probabilities that sum to 1, got {tuple(p)}")
        tallest = self.tallest_um
        layer = int(np.ceil(tallest / self.pixel_size[0])) + 1
        if layer + 2 * self.margin_slices > self.shape[0]:
            raise ValueError(
                f"a cell layer up to {tallest:.1f} µm tall (a rounded "
                f"mitotic cell) is {layer} slices of {self.pixel_size[0]} µm; with {self.margin_slices} empty "
                f"slices above and below it needs Z >= {layer + 2 * self.margin_slices}, got Z = {self.shape[0]}")

    @property
    def tallest_um(self) -> float:
        """The tallest cell the ranges allow: a rounded mitotic cell 2 sd above the height."""
        return self.cell_height[1] * float(np.exp(2 * self.height_cv)) * self.mitotic_rounding

    @property
    def extent(self) -> np.ndarray:
        """The FOV's size ``(z, y, x)`` in µm."""
        return np.array(self.shape) * np.array(self.pixel_size)

"""Simulated hiPSC colony FOVs in the Allen Cell dataset layout: the study's offline default.

The real data (Viana et al. 2023; thesis 2.1) are z-stacks of tightly packed, epithelial-like
hiPSC monolayers, each FOV one cell line: brightfield, one FP-tagged structure, a DNA dye and a
membrane dye. :func:`simulate_fov` builds such a FOV from a 3D cell model and images it with
:mod:`vstain.data.optics`; :mod:`vstain.data.registry` writes FOVs as OME-TIFFs plus a per-cell
``metadata.csv`` and publishes them as a local quilt3 registry that :mod:`vstain.data.allen` reads
exactly as it reads the real one. Unlike the real data, every FOV also carries its clean
six-channel ground truth and its true in-focus z-range.

The cell model, per FOV:

* **Monolayer**: Voronoi cells on a jittered hexagonal lattice (a few sites left empty), a flat
  basal side on the coverslip and a dome-shaped apical surface per cell, in a z-stack with empty
  margins above and below.
* **Per cell**: an ellipsoidal nucleus with chromatin texture (DNA), the plasma membrane, the
  nuclear envelope (a shell of the nucleus), 1-3 nucleoli (DNA is low inside them), mitochondria
  (persistent random-walk tubes that branch, confined to the cytoplasm) and actomyosin bundles
  (strands along the cell periphery plus a few basal fibres, near the basal side).

Pixel size: the real FOVs are sampled at (0.29, 0.108, 0.108) µm (z, y, x). The simulator samples
coarser, (0.5, 0.3, 0.3) µm by default, so that a 64 x 64 crop (19 µm) holds a few whole cells and
a 16-slice focus window (8 µm) holds the whole cell layer: the quick CPU profile then learns from
whole cells in small crops. The pixel size is a parameter; structure sizes are in µm.

The cell model is kept in one file because its steps share one random stream per FOV: the order
of the draws, and so every simulated FOV, depends on reading it top to bottom as written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from vstain.channels import TARGETS

from . import optics

STRUCTURES: tuple[str, ...] = ("mito", "envelope", "actomyosin", "nucleoli")
Range = tuple[float, float]


@dataclass(frozen=True)
class SimConfig:
    """Geometry, optics and camera of the simulated FOVs. Ranges ``(lo, hi)`` are drawn per FOV
    (uniformly), so cell size, density and intensity vary from FOV to FOV. Lengths in µm,
    intensities in photons at density 1.

    Args:
        shape: FOV shape ``(Z, Y, X)``, each >= 8.
        pixel_size: voxel size ``(z, y, x)`` in µm (see the module docstring for why it is coarser
            than the real 0.29/0.108 µm).
        cell_diameter: mean cell diameter (lattice spacing); hiPSCs in colonies are 8-12 µm wide.
        cell_height: height of the cell layer at the cell centres (the dome apex).
        dome_edge: apical height at a cell's edge as a fraction of its apex height.
        fill: fraction of lattice sites holding a cell (the rest are gaps in the colony).
        nucleus_fraction: nucleus lateral radius / inscribed cell radius (hiPSCs: large nuclei).
        margin_slices: minimum empty slices above and below the cell layer.
    """

    shape: tuple[int, int, int] = (32, 96, 96)
    pixel_size: tuple[float, float, float] = (0.5, 0.3, 0.3)
    # geometry
    cell_diameter: Range = (8.0, 11.0)
    cell_height: Range = (5.0, 6.8)  # 8 µm focus window (16 slices) holds the layer
    dome_edge: Range = (0.6, 0.8)
    fill: Range = (0.85, 1.0)
    nucleus_fraction: Range = (0.72, 0.85)
    margin_slices: int = 4
    nucleoli_radius: Range = (0.45, 0.85)
    mito_walks_per_100um3: float = 6.0  # tubes started per 100 µm^3 of cytoplasm
    mito_length: Range = (2.0, 6.0)  # µm per tube
    # fluorescence: brightness (photons at density 1) per target channel, background, PSF
    brightness: tuple[tuple[str, Range], ...] = (
        ("dna", (150.0, 400.0)), ("membrane", (60.0, 200.0)), ("mito", (60.0, 200.0)),
        ("envelope", (60.0, 200.0)), ("actomyosin", (50.0, 160.0)), ("nucleoli", (80.0, 250.0)))
    background: Range = (3.0, 10.0)  # photons per voxel (autofluorescence, out-of-focus haze)
    psf_sigma_xy: float = 0.20  # µm at 520 nm (Zhang 2007 gives 0.09 for NA 1.25; aberrations)
    psf_sigma_z: float = 0.60  # µm at 520 nm, 3x lateral
    emission_um: tuple[tuple[str, float], ...] = (  # PSF width scales with the emission wavelength
        ("dna", 0.46), ("membrane", 0.70), ("mito", 0.52), ("envelope", 0.52),
        ("actomyosin", 0.52), ("nucleoli", 0.52))
    # brightfield: refractive index above the medium, absorption per µm
    dn_cytoplasm: float = 0.016
    dn_nucleus: float = 0.005  # nuclei are less dense than cytoplasm (Schuermann et al. 2016)
    dn_nucleoli: float = 0.020  # on top of the nucleus: dense, clear in brightfield
    dn_mito: float = 0.010  # small volume: faint
    dn_membrane: float = 0.004  # thin: subtle
    dn_actomyosin: float = 0.005
    mu_cytoplasm: float = 0.002  # 1/µm amplitude attenuation: cells are nearly transparent
    mu_nucleoli: float = 0.006
    dn_scale: Range = (0.8, 1.2)  # per-FOV factor on all index increments
    bf_wavelength: float = 0.706  # µm, Allen 706/95 nm transmitted-light filter
    na_objective: float = 1.25
    na_condenser: float = 0.55
    n_medium: float = 1.335
    bf_photons: Range = (2000.0, 4000.0)  # mean photons per brightfield pixel
    illumination: Range = (0.05, 0.15)  # strength of the uneven illumination field
    # camera
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
        if set(dict(self.brightness)) != set(TARGETS) or set(dict(self.emission_um)) != set(TARGETS):
            raise ValueError(f"brightness and emission_um need one entry per target {TARGETS}")
        layer = int(np.ceil(self.cell_height[1] / self.pixel_size[0])) + 1
        if layer + 2 * self.margin_slices > self.shape[0]:
            raise ValueError(
                f"a cell layer up to {self.cell_height[1]} µm tall is {layer} slices of "
                f"{self.pixel_size[0]} µm; with {self.margin_slices} empty slices above and below it "
                f"needs Z >= {layer + 2 * self.margin_slices}, got Z = {self.shape[0]}")


# ----------------------------------------------------------------------------------------------
# Helpers: soft masks, lattice, splatting


def _step(x: np.ndarray, width: float) -> np.ndarray:
    """A soft Heaviside step (0 -> 1 across ``width`` µm): partial-volume edges, no aliasing."""
    return (0.5 * (1 + np.tanh(x / width))).astype(np.float32)


def _shell(x: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian ridge of width ``sigma`` µm at ``x == 0``."""
    return np.exp(-0.5 * (x / sigma) ** 2).astype(np.float32)


def _draw(rng: np.random.Generator, r: Range, size: int | None = None) -> float | np.ndarray:
    """A uniform draw from the range ``r``: one value, or ``size`` of them."""
    return rng.uniform(r[0], r[1], size)


def _texture(cfg: SimConfig, sigma_um: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field ``[Z, Y, X]`` (zero mean, unit std) with correlation length in µm."""
    return optics.smooth_noise(cfg.shape, tuple(sigma_um / p for p in cfg.pixel_size), rng)


def _lattice(extent_yx: tuple[float, float], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Seeds ``[n, 2]`` (y, x µm) of a jittered hexagonal lattice, randomly rotated and shifted,
    covering the FOV plus one spacing on each side (so border cells are cut, not missing)."""
    half = 0.5 * np.hypot(*extent_yx) + 2 * spacing
    n = int(np.ceil(half / spacing)) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    pts = np.stack([j * spacing * np.sqrt(3) / 2, i * spacing + (j % 2) * spacing / 2], -1).reshape(-1, 2)
    a = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + rng.uniform(0, spacing, 2) + np.array(extent_yx) / 2
    pts += rng.normal(0, 0.12 * spacing, pts.shape)
    keep = np.all((pts > -spacing) & (pts < np.array(extent_yx) + spacing), axis=1)
    return pts[keep]


def _splat(points_px: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Points ``[n, 3]`` (continuous voxel indices) accumulated into a volume, trilinearly."""
    vol = np.zeros(int(np.prod(shape)), np.float32)
    base = np.floor(points_px).astype(np.int64)
    frac = (points_px - base).astype(np.float32)
    for corner in np.ndindex(2, 2, 2):
        idx = base + np.array(corner)
        w = np.prod(np.where(np.array(corner), frac, 1 - frac), axis=1)
        ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
        flat = np.ravel_multi_index(idx[ok].T, shape)
        vol += np.bincount(flat, weights=w[ok], minlength=vol.size).astype(np.float32)
    return vol.reshape(shape)


# ----------------------------------------------------------------------------------------------
# The cell model


@dataclass
class _Layer:
    """The 2D layout of the monolayer and the per-cell parameters (arrays over lattice sites)."""

    seeds: np.ndarray  # [n, 2] µm
    alive: np.ndarray  # [n] bool: site holds a cell
    label: np.ndarray  # [Y, X] int: nearest site
    bdist: np.ndarray  # [Y, X] µm to the cell boundary (bisector with the second-nearest site)
    neighbour: np.ndarray  # [Y, X] int: second-nearest site
    top: np.ndarray  # [Y, X] µm: apical height above the basal plane (0 outside cells)
    z_basal: float  # µm


def _monolayer(cfg: SimConfig, rng: np.random.Generator) -> tuple[_Layer, dict]:
    """Voronoi cells, their domes and the per-cell parameters of nucleus, nucleoli and bundles."""
    nz, ny, nx = cfg.shape
    dz, dy, dx = cfg.pixel_size
    diameter, height = _draw(rng, cfg.cell_diameter), _draw(rng, cfg.cell_height)
    seeds = _lattice((ny * dy, nx * dx), diameter, rng)
    n = len(seeds)
    alive = rng.random(n) < _draw(rng, cfg.fill)

    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * dy, (np.arange(nx) + 0.5) * dx, indexing="ij")
    pix = np.stack([yy.ravel(), xx.ravel()], -1)
    tree = cKDTree(seeds)
    dist, idx = tree.query(pix, k=2)
    s1, s2 = seeds[idx[:, 0]], seeds[idx[:, 1]]
    bdist = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.linalg.norm(s2 - s1, axis=1))
    label = idx[:, 0].reshape(ny, nx)
    bdist = bdist.reshape(ny, nx).astype(np.float32)

    # per cell: apex height (up to 12 % below the FOV's), dome edge, nucleus
    r_in = tree.query(seeds, k=2)[0][:, 1] / 2  # inscribed radius: half the nearest-site distance
    h = height * rng.uniform(0.88, 1.0, n)
    edge = _draw(rng, cfg.dome_edge, n)
    u = np.clip(dist[:, 0].reshape(ny, nx) / (dist[:, 0].reshape(ny, nx) + bdist + 1e-6), 0, 1)
    top = h[label] * (edge[label] + (1 - edge[label]) * np.sqrt(1 - u**2))
    top = np.where(alive[label], top, 0).astype(np.float32)
    layer_top = float(top.max()) if top.max() > 0 else height
    lo, hi = cfg.margin_slices * dz, (nz - cfg.margin_slices) * dz - layer_top
    z_basal = rng.uniform(lo, max(lo, hi))

    frac = _draw(rng, cfg.nucleus_fraction, n)
    nuc = {
        "a": r_in * frac * rng.uniform(0.95, 1.05, n),  # lateral semi-axes, µm
        "b": r_in * frac * rng.uniform(0.80, 0.95, n),
        "theta": rng.uniform(0, np.pi, n),
        "cy": seeds[:, 0] + rng.normal(0, 0.06, n) * r_in,
        "cx": seeds[:, 1] + rng.normal(0, 0.06, n) * r_in,
    }
    nuc["c"] = h * rng.uniform(0.34, 0.40, n)  # axial semi-axis
    nuc["cz"] = z_basal + 0.5 * h * rng.uniform(0.95, 1.05, n)  # centre just below mid-height
    layer = _Layer(seeds, alive, label, bdist, idx[:, 1].reshape(ny, nx), top, z_basal)
    return layer, {"nucleus": nuc, "r_in": r_in, "height": h, "diameter": diameter}


def _structures(cfg: SimConfig, layer: _Layer, par: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Density ``[Z, Y, X]`` (peak about 1) of every compartment and structure of the model."""
    nz, ny, nx = cfg.shape
    dz, dy, dx = cfg.pixel_size
    lab, nuc = layer.label, par["nucleus"]
    alive2 = layer.alive[lab]
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * dy, (np.arange(nx) + 0.5) * dx, indexing="ij")
    hz = ((np.arange(nz) + 0.5) * dz - layer.z_basal)[:, None, None].astype(np.float32)  # [Z,1,1] above basal
    soft = 0.5 * min(cfg.pixel_size)

    # cell solid and membrane: lateral boundaries (Voronoi bisectors), apical dome, basal plane
    cell = _step(hz, soft) * _step(layer.top - hz, soft) * alive2
    # a lateral membrane reaches up to the apical edge of the taller of its two cells
    edge_h = np.maximum(np.where(layer.alive[lab], layer.top, 0),
                        np.where(layer.alive[layer.neighbour], par["height"][layer.neighbour] * 0.7, 0))
    lateral = _shell(layer.bdist, 0.15) * _step(hz, soft) * _step(edge_h - hz, soft)
    apical = _shell(hz - layer.top, 0.2) * alive2
    basal = 0.6 * _shell(hz, 0.2) * alive2
    membrane = np.maximum(np.maximum(lateral, apical), basal)

    # nucleus: ellipsoid in the cell's frame; distance to its surface ~ (rho^2 - 1) / |grad rho^2|
    c, s = np.cos(nuc["theta"])[lab], np.sin(nuc["theta"])[lab]
    ry, rx = yy - nuc["cy"][lab], xx - nuc["cx"][lab]
    u, v = c * rx + s * ry, -s * rx + c * ry
    a, b, cz_ax = nuc["a"][lab], nuc["b"][lab], nuc["c"][lab]
    w = (hz + layer.z_basal) - nuc["cz"][lab]  # [Z,Y,X]
    rho2 = (u / a) ** 2 + (v / b) ** 2 + (w / cz_ax) ** 2
    grad = 2 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / cz_ax**2) ** 2) + 1e-3
    sdist = ((rho2 - 1) / grad).astype(np.float32) * alive2 + (~alive2) * 10.0  # µm, < 0 inside
    nucleus = _step(-sdist, soft) * cell
    envelope = _shell(sdist, 0.12) * cell * (0.8 + 0.2 * _texture(cfg, 0.6, rng))

    # nucleoli: 1-3 irregular blobs well inside each nucleus
    n = len(layer.seeds)
    count = rng.choice([1, 2, 3], n, p=[0.3, 0.45, 0.25])
    wobble = _texture(cfg, 0.4, rng)
    nucleoli = np.zeros(cfg.shape, np.float32)
    for k in range(3):
        r = _draw(rng, cfg.nucleoli_radius, n)
        # a random point inside the ellipsoid at 0-45 % of its radii, then into the lab frame
        dirn = rng.normal(size=(n, 3))
        dirn *= (rng.uniform(0, 0.45, n) / np.linalg.norm(dirn, axis=1))[:, None]
        pu, pv = dirn[:, 0] * nuc["a"], dirn[:, 1] * nuc["b"]
        py = nuc["cy"] + np.sin(nuc["theta"]) * pu + np.cos(nuc["theta"]) * pv
        px = nuc["cx"] + np.cos(nuc["theta"]) * pu - np.sin(nuc["theta"]) * pv
        pz = nuc["cz"] + dirn[:, 2] * nuc["c"] * 0.6
        d = np.sqrt((yy - py[lab]) ** 2 + (xx - px[lab]) ** 2 + (hz + layer.z_basal - pz[lab]) ** 2)
        blob = _step(r[lab] * (1 + 0.2 * wobble) - d, soft) * (count[lab] > k)
        nucleoli = np.maximum(nucleoli, blob)
    nucleoli *= nucleus

    # DNA: chromatin texture, heterochromatin at the periphery and in foci, low in nucleoli
    chromatin = _texture(cfg, 0.35, rng)
    foci = np.clip(_texture(cfg, 0.3, rng) - 1.2, 0, None)
    periphery = _shell(sdist + 0.35, 0.3)
    per_cell = rng.uniform(0.75, 1.25, n)[lab]  # cell-cycle stage: DNA content varies
    dna = nucleus * per_cell * np.clip(0.65 + 0.2 * chromatin + 0.25 * periphery + 0.6 * foci, 0.2, None)
    dna *= 1 - 0.75 * nucleoli

    cytoplasm = cell * (1 - nucleus)
    mito = _mitochondria(cfg, cytoplasm, rng)
    actomyosin = _actomyosin(cfg, layer, par, hz, yy, xx, cell, rng)

    # the membrane dye is also taken up into small cytoplasmic vesicles
    vesicles = np.clip(_texture(cfg, 0.25, rng) - 2.2, 0, None)
    membrane = np.maximum(membrane, 0.5 * vesicles * cytoplasm)
    return {"cell": cell, "nucleus": nucleus, "cytoplasm": cytoplasm, "dna": dna, "membrane": membrane,
            "mito": mito, "envelope": envelope, "actomyosin": actomyosin, "nucleoli": nucleoli}


def _mitochondria(cfg: SimConfig, cytoplasm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tubular networks: persistent random walks (0.25 µm tubes) started in the cytoplasm, half of
    them branching off earlier tubes, each ending where it would leave the cytoplasm."""
    px = np.array(cfg.pixel_size, np.float32)
    inside = cytoplasm > 0.5
    volume = inside.sum() * float(np.prod(px))
    n_walks = int(volume / 100.0 * cfg.mito_walks_per_100um3)
    if n_walks == 0:
        return np.zeros(cfg.shape, np.float32)
    step = 0.4 * float(px.min())
    n_steps = int(np.ceil(cfg.mito_length[1] / step))
    starts = np.flatnonzero(inside)[rng.integers(0, inside.sum(), n_walks)]
    pos = (np.stack(np.unravel_index(starts, cfg.shape), -1) + rng.uniform(0, 1, (n_walks, 3))) * px
    paths = []
    for generation in range(2):  # generation 1 branches off the tubes of generation 0
        length = _draw(rng, cfg.mito_length, len(pos))
        direction = rng.normal(size=pos.shape)
        live = np.ones(len(pos), bool)
        trail = []
        for t in range(n_steps):
            direction += rng.normal(0, 0.15, direction.shape)
            direction[:, 0] *= 0.7  # flatter than tall: mitochondria spread laterally
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            pos = pos + step * direction
            vox = np.floor(pos / px).astype(np.int64)
            ok = np.all((vox >= 0) & (vox < np.array(cfg.shape)), axis=1)
            ok[ok] = inside[tuple(vox[ok].T)]
            live &= ok & (t * step < length)
            trail.append(pos[live])
        paths.append(np.concatenate(trail))
        if generation == 0 and len(paths[0]):
            pos = paths[0][rng.integers(0, len(paths[0]), n_walks // 2)]
    pts = np.concatenate(paths) / px - 0.5  # µm -> continuous voxel index
    density = _splat(pts, cfg.shape)
    density = ndimage.gaussian_filter(density, 0.12 / px)
    peak = np.quantile(density[density > 0], 0.99) if (density > 0).any() else 1.0
    return np.clip(density / peak, 0, 1.5) * cytoplasm


def _actomyosin(cfg: SimConfig, layer: _Layer, par: dict, hz: np.ndarray, yy: np.ndarray,
                xx: np.ndarray, cell: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MYH10 bundles: beaded strands parallel to each cell's edge and a few straight fibres
    across the cell, all close to the basal side, plus a faint cortical pool."""
    lab, n = layer.label, len(layer.seeds)
    sy, sx = yy - layer.seeds[lab, 0], xx - layer.seeds[lab, 1]
    angle = np.arctan2(sy, sx)
    strands = np.zeros(lab.shape, np.float32)
    for offset in (0.35, 0.75):  # µm inside the cell edge
        amp = np.zeros(lab.shape, np.float32)
        for m in (2, 3, 5, 8):
            amp += np.cos(m * angle + rng.uniform(0, 2 * np.pi, n)[lab]) / np.sqrt(m)
        strands += np.clip(0.4 + 0.6 * amp, 0, 1.2) * _shell(layer.bdist - offset, 0.12)
    fibres = np.zeros(lab.shape, np.float32)
    for _ in range(2):  # straight fibres that fade towards their ends
        psi = rng.uniform(0, np.pi, n)[lab]
        shift = (rng.uniform(-0.6, 0.6, n) * par["r_in"])[lab]
        along = (np.cos(psi) * sx + np.sin(psi) * sy) / par["r_in"][lab] - rng.uniform(-0.5, 0.5, n)[lab]
        across = -np.sin(psi) * sx + np.cos(psi) * sy - shift
        on = (rng.random(n) < 0.5)[lab] * rng.uniform(0.4, 0.9, n)[lab]
        fibres = np.maximum(fibres, _shell(across, 0.12) * _shell(along, 0.6) * on)
    fibres *= _step(layer.bdist - 0.4, 0.15)
    basal = np.exp(-np.clip(hz, 0, None) / 1.2)  # [Z,1,1]: bundles sit near the coverslip
    near = _shell(hz - 0.4, 0.45)
    cortex = 0.15 * _shell(layer.bdist, 0.4)
    return (cell * (strands * basal + fibres * near + cortex)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Imaging


def _brightfield(cfg: SimConfig, d: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The brightfield z-stack (photons) of the refractive-index and absorption model."""
    dz = cfg.pixel_size[0]
    scale = _draw(rng, cfg.dn_scale)
    granules = _texture(cfg, 0.25, rng)  # cytoplasmic texture
    dn = scale * (cfg.dn_cytoplasm * d["cell"] * (1 + 0.15 * granules)
                  + (cfg.dn_nucleus - cfg.dn_cytoplasm) * d["nucleus"]
                  + cfg.dn_nucleoli * d["nucleoli"] + cfg.dn_mito * d["mito"]
                  + cfg.dn_membrane * d["membrane"] + cfg.dn_actomyosin * d["actomyosin"])
    mu = cfg.mu_cytoplasm * d["cell"] + cfg.mu_nucleoli * d["nucleoli"]
    phase = 2 * np.pi * dz * dn / cfg.bf_wavelength
    intensity = optics.brightfield_stack(phase, mu * dz, cfg.pixel_size, wavelength_um=cfg.bf_wavelength,
                                         na_objective=cfg.na_objective, na_condenser=cfg.na_condenser,
                                         n_medium=cfg.n_medium)
    field = optics.illumination_field(cfg.shape[1:], _draw(rng, cfg.illumination), rng)
    flicker = 1 + rng.normal(0, 0.003, cfg.shape[0]).astype(np.float32)[:, None, None]  # lamp
    return np.clip(intensity, 0, None) * field * flicker * _draw(rng, cfg.bf_photons)


def _fluorescence(cfg: SimConfig, d: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Clean camera signal (ADU above offset) ``[6, Z, Y, X]`` of all targets: density x
    brightness + background, through the PSF at each channel's emission wavelength."""
    bright, emission = dict(cfg.brightness), dict(cfg.emission_um)
    truth = np.empty((len(TARGETS), *cfg.shape), np.float32)
    for i, name in enumerate(TARGETS):
        k = emission[name] / 0.52
        photons = d[name] * _draw(rng, bright[name]) + _draw(rng, cfg.background)
        sigma = (cfg.psf_sigma_z * k, cfg.psf_sigma_xy * k, cfg.psf_sigma_xy * k)
        truth[i] = cfg.gain * optics.blur(photons, sigma, cfg.pixel_size)
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
        (centre inside, or a third of the cell visible; ``cell``, ``y_um``, ``x_um``); ``masks``: bool ``cell``, ``nucleus``
        ``[Z, Y, X]`` and the int ``label`` ``[Y, X]`` (for tests and figures); ``labels``: the true
        instances, uint16 ``cells`` and ``nuclei`` ``[Z, Y, X]`` (0 = background, 1..N; the nucleus
        of cell k has id k; every cell with a voxel in the FOV, cut or not); ``pixel_size``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}: the tagged structure must be one of {STRUCTURES}")
    rng = np.random.default_rng(seed)
    layer, par = _monolayer(cfg, rng)
    dens = _structures(cfg, layer, par, rng)
    truth = _fluorescence(cfg, dens, rng)
    bf = _brightfield(cfg, dens, rng)
    cam = dict(gain=cfg.gain, offset=cfg.offset, read_noise=cfg.read_noise)
    out = {"brightfield": optics.camera(bf, rng, **cam)}
    for key, name in (("dna", "dna"), ("membrane", "membrane"), ("struct", structure)):
        out[key] = optics.camera(truth[TARGETS.index(name)] / cfg.gain, rng, **cam)
    cell = dens["cell"] > 0.5
    zs = np.flatnonzero(cell.any(axis=(1, 2)))
    if zs.size == 0:  # a FOV that shows only a gap in the colony: the layer's designed slices
        zs = np.arange(int(layer.z_basal / cfg.pixel_size[0]),
                       int(np.ceil((layer.z_basal + par["height"].max()) / cfg.pixel_size[0])))
    extent = np.array(cfg.shape[1:]) * np.array(cfg.pixel_size[1:])
    # the cells of the metadata: centre in the FOV, or at least a third of a cell's area visible
    # (so a FOV smaller than a cell still has its rows)
    area = np.bincount(layer.label.ravel(), minlength=len(layer.seeds)) * np.prod(cfg.pixel_size[1:])
    centred = np.all((layer.seeds >= 0) & (layer.seeds < extent), axis=1)
    inside = layer.alive & (centred | (area > np.pi * par["r_in"] ** 2 / 3))
    if not inside.any():
        inside[np.argmax(area * layer.alive)] = True
    cells = pd.DataFrame({"cell": np.flatnonzero(inside), "y_um": layer.seeds[inside, 0],
                          "x_um": layer.seeds[inside, 1]})
    out.update(truth=truth, focus_z_lo=int(zs.min()), focus_z_hi=int(zs.max()) + 1, cells=cells,
               masks={"cell": cell, "nucleus": dens["nucleus"] > 0.5, "label": layer.label},
               labels=_instance_labels(layer.label, cell, dens["nucleus"] > 0.5),
               pixel_size=tuple(cfg.pixel_size))
    return out


# ----------------------------------------------------------------------------------------------
# The Allen layout as a local quilt3 registry

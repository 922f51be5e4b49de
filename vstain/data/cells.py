"""The colony: which cell each voxel belongs to, the cells' shapes and their cell-cycle state.

Cells are the regions of a **power diagram** (a Voronoi partition weighted per cell, so cells
differ in size) whose sites lie on a jittered hexagonal lattice. The partition is evaluated in 3D:
every cell's axis is tilted by its own angle, and a smooth random displacement field makes the
walls undulate, so walls are irregular, tilted and not where the nuclei alone would put them.
Each nucleus sits off its cell's centre and is clipped by the cell's walls (nuclei fill tightly
packed hiPSCs). Every cell draws a cell-cycle phase: its DNA content (1 in G1, 1-2 in S, 2 in G2
and M), its size, and, in mitosis, a rounded shape with a condensed metaphase plate instead of a
nucleus.

All per-cell draws come from one generator in a fixed order that depends on the FOV's physical
extent only, so the same seed gives the same cells at any voxel size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .fields import draw, sample_um, smooth_field_um
from .simconfig import MITOTIC_PHASE, SimConfig

CANDIDATES = 7  # nearest lattice sites tried per column: tilts and wobble move walls well under a spacing


@dataclass
class Colony:
    """The partition of the FOV into cells and the per-cell parameters (arrays over lattice sites)."""

    seeds: np.ndarray  # [n, 2] µm (y, x) at mid-height
    alive: np.ndarray  # [n] bool: site holds a cell
    label: np.ndarray  # [Z, Y, X] int: the site each voxel belongs to
    neighbour: np.ndarray  # [Z, Y, X] int: the runner-up site (the cell across the nearest wall)
    bdist: np.ndarray  # [Z, Y, X] µm to the nearest wall
    centre: np.ndarray  # [Z, Y, X, 2] µm: the own cell's axis (y, x) at this height
    top: np.ndarray  # [Y, X] µm: apical height above the basal plane (0 outside cells)
    hz: np.ndarray  # [Z, 1, 1] µm above the basal plane
    z_basal: float  # µm
    r_in: np.ndarray  # [n] µm: inscribed radius of each cell
    height: np.ndarray  # [n] µm apex height
    phase: np.ndarray  # [n] int: 0 G1, 1 S, 2 G2, 3 M
    content: np.ndarray  # [n] DNA content, 1 (G1) to 2 (G2, M)
    nucleus: dict  # per-cell nucleus (or metaphase plate) ellipsoid: a, b, c, theta, cy, cx, cz

    @property
    def mitotic(self) -> np.ndarray:
        return self.phase == MITOTIC_PHASE


def lattice(extent_yx: tuple[float, float], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Sites ``[n, 2]`` (y, x µm) of a jittered hexagonal lattice, randomly rotated and shifted,
    covering the FOV plus two spacings on each side (so border cells are cut, not missing)."""
    half = 0.5 * np.hypot(*extent_yx) + 2 * spacing
    n = int(np.ceil(half / spacing)) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    pts = np.stack([j * spacing * np.sqrt(3) / 2, i * spacing + (j % 2) * spacing / 2], -1).reshape(-1, 2)
    a = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + rng.uniform(0, spacing, 2) + np.array(extent_yx) / 2
    pts += rng.normal(0, 0.12 * spacing, pts.shape)
    keep = np.all((pts > -2 * spacing) & (pts < np.array(extent_yx) + 2 * spacing), axis=1)
    return pts[keep]


def _cycle(cfg: SimConfig, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: the phase (G1, S, G2, M at ``cfg.cycle_fractions``) and the DNA content."""
    phase = rng.choice(4, n, p=cfg.cycle_fractions)
    content = np.select([phase == 0, phase == 1], [1.0, 1.0 + rng.uniform(0, 1, n)], 2.0)
    return phase, content


def colony(cfg: SimConfig, rng: np.random.Generator) -> Colony:
    """Draw the cells of one FOV and partition its voxels among them."""
    nz, ny, nx = cfg.shape
    dz, dy, dx = cfg.pixel_size
    extent = cfg.extent
    spacing, height = draw(rng, cfg.cell_diameter), draw(rng, cfg.cell_height)
    seeds = lattice((extent[1], extent[2]), spacing, rng)
    n = len(seeds)
    alive = rng.random(n) < draw(rng, cfg.fill)
    phase, content = _cycle(cfg, n, rng)
    mitotic = phase == MITOTIC_PHASE
    # sizes: a cell's power radius grows with its content (cell volume ~ DNA content, assumption)
    radius = 0.5 * spacing * content ** (1 / 3) * np.exp(rng.normal(0, cfg.size_cv, n)) / 1.26 ** (1 / 3)
    tilt_angle = np.deg2rad(rng.uniform(0, cfg.wall_tilt_deg, n))
    tilt_dir = rng.uniform(0, 2 * np.pi, n)
    tilt = np.tan(tilt_angle)[:, None] * np.stack([np.sin(tilt_dir), np.cos(tilt_dir)], 1)  # [n, 2] µm per µm
    spread = np.exp(np.clip(rng.normal(0, 1, n), -2, 2) * cfg.height_cv)
    h = height * spread * np.where(mitotic, cfg.mitotic_rounding, 1.0)
    edge = np.where(mitotic, 0.3, draw(rng, cfg.dome_edge, n))
    z_u = rng.uniform()
    wobble = [smooth_field_um(extent, cfg.wall_wobble_corr, rng) for _ in range(2)]

    # the layer's basal plane: anywhere that leaves the margins empty
    layer_top = float(h[alive].max()) if alive.any() else height
    lo, hi = cfg.margin_slices * dz, nz * dz - cfg.margin_slices * dz - layer_top
    z_basal = lo + z_u * max(0.0, hi - lo)
    zc = (np.arange(nz) + 0.5) * dz
    hz = (zc - z_basal).astype(np.float32)
    yc, xc = (np.arange(ny) + 0.5) * dy, (np.arange(nx) + 0.5) * dx

    # candidates per column from the untilted sites, then the power distance per voxel
    yy, xx = np.meshgrid(yc, xc, indexing="ij")
    cand = cKDTree(seeds).query(np.stack([yy.ravel(), xx.ravel()], -1), k=min(CANDIDATES, n))[1]
    cand = cand.reshape(ny, nx, -1)  # [Y, X, K]
    h_mid = 0.5 * height
    axis = (seeds[cand][None] + tilt[cand][None] * (np.clip(hz, 0, None) - h_mid)[:, None, None, None, None]
            ).astype(np.float32)  # [Z, Y, X, K, 2]
    Z, Y, X = np.meshgrid(zc, yc, xc, indexing="ij")
    py = yy[None] + cfg.wall_wobble * sample_um(*wobble[0], (Z, Y, X))
    px = xx[None] + cfg.wall_wobble * sample_um(*wobble[1], (Z, Y, X))
    power = (py[..., None] - axis[..., 0]) ** 2 + (px[..., None] - axis[..., 1]) ** 2
    power -= (radius[cand] ** 2).astype(np.float32)[None]  # [Z, Y, X, K]
    first = power.argmin(-1)[..., None]
    p1 = np.take_along_axis(power, first, -1)
    np.put_along_axis(power, first, np.inf, -1)
    second = power.argmin(-1)[..., None]
    p2 = np.take_along_axis(power, second, -1)[..., 0]
    candz = np.broadcast_to(cand[None], power.shape)
    label = np.take_along_axis(candz, first, -1)[..., 0]
    neighbour = np.take_along_axis(candz, second, -1)[..., 0]
    c1 = np.take_along_axis(axis, first[..., None], -2)[..., 0, :]
    c2 = np.take_along_axis(axis, second[..., None], -2)[..., 0, :]
    bdist = (p2 - p1[..., 0]) / (2 * np.linalg.norm(c2 - c1, axis=-1) + 1e-6)

    # the apical dome: the apex over the cell's axis, falling to `edge` of it at the walls
    z_top = min(max(int(round((z_basal + h_mid) / dz)), 0), nz - 1)
    lab2, b2, c2d = label[z_top], bdist[z_top], c1[z_top]
    r = np.linalg.norm(np.stack([yy, xx], -1) - c2d, axis=-1)
    u = np.clip(r / (r + b2 + 1e-6), 0, 1)
    top = h[lab2] * (edge[lab2] + (1 - edge[lab2]) * np.sqrt(1 - u**2))
    top = np.where(alive[lab2], top, 0).astype(np.float32)

    r_in = cKDTree(seeds).query(seeds, k=2)[0][:, 1] / 2 * radius / radius.mean()
    # each cell's centre at mid-height (the power diagram moves it off its site)
    present = np.bincount(lab2.ravel(), minlength=n) > 0
    centre = seeds.copy()
    if present.any():
        ids = np.flatnonzero(present)
        cy = np.bincount(lab2.ravel(), yy.ravel(), n)[ids] / np.bincount(lab2.ravel(), None, n)[ids]
        cx = np.bincount(lab2.ravel(), xx.ravel(), n)[ids] / np.bincount(lab2.ravel(), None, n)[ids]
        cut = (np.abs(np.stack([cy, cx], 1) - seeds[ids]) > spacing).any(1)  # cut by the FOV: keep the site
        centre[ids] = np.where(cut[:, None], seeds[ids], np.stack([cy, cx], 1))
    nucleus = _nuclei(cfg, centre, r_in, h, content, mitotic, z_basal, rng)
    return Colony(seeds, alive, label, neighbour, bdist.astype(np.float32), c1.astype(np.float32), top,
                  hz[:, None, None], z_basal, r_in, h, phase, content, nucleus)


def _nuclei(cfg: SimConfig, centre: np.ndarray, r_in: np.ndarray, h: np.ndarray, content: np.ndarray,
            mitotic: np.ndarray, z_basal: float, rng: np.random.Generator) -> dict:
    """Per cell: the nucleus ellipsoid (off-centre, volume growing with DNA content), or for a
    mitotic cell the metaphase plate: upright, as thick as the condensed DNA needs."""
    n = len(centre)
    grow = content ** (1 / 3) / 1.26 ** (1 / 3)  # nuclear volume ~ DNA content (assumption)
    lateral = draw(rng, cfg.nucleus_lateral, n) * r_in * grow
    a = lateral * rng.uniform(0.95, 1.05, n)
    b = lateral * rng.uniform(0.80, 0.95, n)
    c = h * draw(rng, cfg.nucleus_axial, n) * grow
    theta = rng.uniform(0, np.pi, n)
    off = cfg.nucleus_offset * np.sqrt(rng.uniform(0, 1, n))
    off_dir = rng.uniform(0, 2 * np.pi, n)
    cy, cx = centre[:, 0] + off * np.sin(off_dir), centre[:, 1] + off * np.cos(off_dir)
    cz = z_basal + 0.5 * h * rng.uniform(0.95, 1.05, n)
    # metaphase plate: the G2 nucleus' DNA compacted `chromatin_compaction`-fold into a disc of
    # the nucleus' width standing upright (the spindle lies parallel to the coverslip)
    interphase_volume = a * b * c
    plate_a = np.minimum(a, b)
    plate_c = interphase_volume / cfg.chromatin_compaction / plate_a**2
    a, b, c = (np.where(mitotic, plate_a, a), np.where(mitotic, plate_c, b), np.where(mitotic, plate_a, c))
    cy, cx = np.where(mitotic, centre[:, 0], cy), np.where(mitotic, centre[:, 1], cx)
    return {"a": a, "b": b, "c": c, "theta": theta, "cy": cy, "cx": cx, "cz": cz}
